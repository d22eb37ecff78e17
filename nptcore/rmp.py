"""The RMP check of the `rmp` protection design (SEV-SNP's reverse map table).

The PSP keeps one 64-bit entry per 4 KiB host frame, and only the PSP
writes it (psp_firmware/rmp.py: RMP_ASSIGN / RMP_UNASSIGN, modelled on
RMPUPDATE). The CPU reads it: after every nested translation gpa -> hpa
through a leaf at `level`, the entry of the final frame must say
"assigned to this guest, at this GPA, with this page size". Entry format
(the same in csrc/npt.h):

    bit 0        assigned
    bits 1..2    page-size level of the mapping (1: 4 KiB, 2: 2 MiB)
    bits 12..47  GPA of this 4 KiB frame (for a 2 MiB page, each of its 512
                 frames holds its own GPA)
    bits 48..63  ASID (the guest handle; at most 0xFFFF)

A mismatch is a nested fault: the walk fails with PF_P | PF_RMP (plus
PF_SIZEM when only the size differs) and writes nothing (no A/D).

`RmpView(buf, asid)` is what a walk takes: the entries (any buffer, read
only is fine: the VMM maps the PSP's RMP read-only) and the guest checked.
`rmp_check` is the pure-Python twin of npt_rmp_check.
"""
from .bits import (PF_RMP, PF_SIZEM, RMP_ASID_MAX, RMP_ASID_SHIFT, RMP_ASSIGNED, RMP_GPA_MASK,
                   RMP_SIZE_MASK)

__all__ = ["RmpView", "rmp_entry", "rmp_check", "decode_entry"]


def rmp_entry(asid, gpa, level):
    """The entry that lets guest `asid` reach a frame at `gpa` through a leaf
    at `level` (1 or 2)."""
    return RMP_ASSIGNED | (level << 1) | (gpa & RMP_GPA_MASK) | (asid << RMP_ASID_SHIFT)


def decode_entry(e):
    """{assigned, level, gpa, asid} of an entry (for reports)."""
    return {"assigned": bool(e & RMP_ASSIGNED), "level": (e & RMP_SIZE_MASK) >> 1,
            "gpa": e & RMP_GPA_MASK, "asid": e >> RMP_ASID_SHIFT}


def rmp_check(entries, asid, hpa, gpa, level):
    """0 when frame hpa >> 12's entry lets guest `asid` reach it at `gpa`
    with page-size `level`, else the fault bits (npt_rmp_check's twin).
    entries: a sequence of ints (a memoryview cast to "Q")."""
    if asid > RMP_ASID_MAX:
        return PF_RMP
    want = rmp_entry(asid, gpa, level)
    pfn = hpa >> 12
    have = entries[pfn] if pfn < len(entries) else 0
    if have == want:
        return 0
    return PF_RMP if (have ^ want) & ~RMP_SIZE_MASK else PF_RMP | PF_SIZEM


class RmpView:
    """The CPU's view of the RMP for one guest: `entries` (u64 per frame,
    over `buf`) and `asid`. The C engine keeps its npt_rmp struct here."""

    __slots__ = ("buf", "entries", "nframes", "asid", "_c")

    def __init__(self, buf, asid):
        if isinstance(asid, bool) or not isinstance(asid, int) or asid < 0:
            raise ValueError(f"RmpView: asid must be a non-negative int, not {asid!r}")
        mv = memoryview(buf).cast("B")
        self.buf = buf
        self.entries = mv[: mv.nbytes & ~7].cast("Q")
        self.nframes = len(self.entries)
        self.asid = asid
        self._c = None

    def entry(self, hpa):
        pfn = hpa >> 12
        return self.entries[pfn] if 0 <= pfn < self.nframes else 0

    def check(self, hpa, gpa, level):
        return rmp_check(self.entries, self.asid, hpa, gpa, level)

    def for_asid(self, asid):
        """A view of the same entries for another guest."""
        return RmpView(self.buf, asid)
