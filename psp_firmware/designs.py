"""Protection designs the firmware runs (`--protect`), side by side.

    digest    the patent (Hygon CSV3's method): the PSP installs every NPT
              entry and keeps a SHA-256 digest of the table (full or merkle);
              every update re-checks it, and so does the periodic check.
    isolated  Hygon CSV3 / Intel TDX Secure EPT / Arm CCA RTTs: the PSP
              installs every entry, validated as under digest, into table
              pages (and control pages) that live in PSP-owned memory the
              VMM can only read (psp_firmware/isolated.py). No digest.
    rmp       AMD SEV-SNP: the VMM writes the NPT itself; the PSP keeps a
              reverse map, one entry per host frame, changed only by its
              RMPUPDATE-like commands; the CPU checks every translation
              against it (psp_firmware/rmp.py, nptcore/rmp.py). No digest.
    none      plain KVM: the VMM writes the NPT, nothing checks it. The
              firmware only registers guests and measures their launch.

`make_psp(membuf, protect=..., **kw)` builds the firmware of a design. Each
design's commands are the ones its handler table lists; any other command
id is INVALID_COMMAND ("not a command of this design").
"""
from .isolated import IsolatedPsp
from .none import NonePsp
from .protect import COMMANDS, DEFAULT_DESIGN, DESIGNS, NoIntegrity, check_design
from .psp import Psp
from .rmp import RmpPsp

__all__ = ["DESIGNS", "DEFAULT_DESIGN", "COMMANDS", "NoIntegrity", "check_design", "make_psp",
           "private_bytes"]


def make_psp(membuf, protect=DEFAULT_DESIGN, iso=None, seal=False, **kw):
    """The firmware of design `protect` over host memory `membuf`.

    iso: (base, size) of the isolated design's PSP-owned frame range (its
    NPT and control pages); seal: put that range, and the rmp design's RMP,
    in sealed memfds the VMM can map read-only only (the PSP process does
    this; in the VMM's own process it would protect nothing). Other keyword
    arguments go to Psp (backend, integrity, core, scrub, fast, mem_fd,
    holes)."""
    check_design(protect)
    if protect == "digest":
        if iso is not None:
            raise ValueError("iso= is the isolated design's")
        return Psp(membuf, **kw)
    if kw.get("integrity") not in (None, "none"):
        raise ValueError(f"--integrity is the digest design's sub-option, not {protect}'s")
    kw.pop("integrity", None)
    if protect == "isolated":
        if iso is None:
            raise ValueError("the isolated design needs iso=(base, size)")
        return IsolatedPsp(membuf, iso_base=iso[0], iso_size=iso[1], seal=seal, **kw)
    if iso is not None:
        raise ValueError("iso= is the isolated design's")
    if protect == "rmp":
        return RmpPsp(membuf, seal=seal, **kw)
    return NonePsp(membuf, **kw)


def private_bytes(psp):
    """The payload bytes of a firmware's private state, by kind (hv compare's
    psp_bytes_per_gib): what its data structures hold, not Python's object
    overhead. Introspection for benchmarks, like Psp._check_invariants: the
    VMM never calls it (it holds a transport, not the Psp)."""
    out = {"frame_table": 0, "shadow": 0, "hashes": 0, "tables": 0, "rmp": 0, "gpa_maps": 0}
    ft = psp._frames
    if ft is None:
        return out
    counts = ft.counts()
    listed = sum(counts.get(k, 0) for k in ("TABLE", "VMSA", "PRIVATE", "MAPPED"))
    if psp.protect != "none":
        out["frame_table"] = 13 * listed        # state u8, owner u32, gpa u64 per listed frame
    for g in psp._guests.values():
        npages = len(g.npt.pages)
        if psp.protect in ("digest", "isolated"):
            out["shadow"] += 4096 * npages      # the PSP's canonical copy of each table page
        integ = g.integrity
        if integ.mode == "full":
            out["hashes"] += 32
        elif integ.mode == "merkle":
            out["hashes"] += (sum(len(v) for v in integ.chunk_h.values()) + 32 * len(integ.node_h)
                              + sum(len(v) for v in integ.line_h.values())
                              + sum(len(v) for v in integ.slots.values())
                              + 8 * 512 * len(integ.kids))
        if psp.protect == "isolated":
            out["tables"] += 4096 * (npages + 1)  # the table (and control page) live in PSP memory
        if psp.protect == "rmp":
            out["gpa_maps"] += 16 * (len(g.rmp_4k) + len(g.rmp_2m))
    if psp.protect == "rmp":
        out["rmp"] = 8 * counts.get("MAPPED", 0)  # entries of mapped frames (the RMP covers all
        #                                          host memory: 8 bytes per host frame)
    out["total"] = sum(out.values())
    return out
