"""Run a toy guest in plain Unicorn: the "no NPT" speed baseline.

All guest RAM is one flat Unicorn mapping (GPA == Unicorn address), loaded
up front from the image; there is no nested paging, no demand faulting and no
per-instruction hook.  The boot state is the one `hv.loader` describes: for
ELF64 images long mode with the loader's identity page tables (CR3 = 0x2000)
and GDT (0x1000), for multiboot kernels 32-bit protected mode, paging off.

    run_flat_unicorn(image, ram_size, max_insns, tlb="flat"|"per_access", block_count=False,
                     fill=None|"c"|"python")
        -> (exit_code, serial, insn_count)

`image` is an `hv.loader.Image` or a path.  The result is a `FlatResult`,
a 3-tuple with extra attributes: `.reason` ("exit" port 0xF4, "hlt",
"budget" max_insns reached, "fault" CPU exception / triple fault / bad
memory access, with `.detail`), `.seconds` (wall time of emu_start), `.vga`
(the 80x25 text screen as str, if RAM covers 0xB8000).  `exit_code` is the
byte written to port 0xF4, 0 for hlt, None for "budget" and "fault".

Instruction counting (`count_insns=True`, the default): the run is a
series of emu_start calls with count=CHUNK (1 Mi instructions; Unicorn
compiles that counter into the translated code, so there is no Python call
per instruction or block).  A run that hits max_insns has retired exactly
max_insns.  A run that ends inside a chunk is replayed (guests are
deterministic): the completed chunks again without hooks, then the last
chunk under a basic-block hook with capstone instruction counts, which gives
the exact total.  `.seconds` covers the first run only.  The count
parameter costs Unicorn ~2-4x; for the pure speed baseline use
`count_insns=False` (insn_count None, max_insns still enforced through a
single emu_start count when non-zero, 0 = unlimited).
"""
from __future__ import annotations

import time

from unicorn import (UC_ARCH_X86, UC_HOOK_BLOCK, UC_HOOK_INSN, UC_HOOK_INTR, UC_HOOK_TLB_FILL,
                     UC_MODE_32, UC_MODE_64, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE,
                     UC_TLB_VIRTUAL, Uc, UcError)
from unicorn import x86_const as X

from hv.machine.boot_state import apply_boot_state

__all__ = ["run_flat_unicorn", "FlatResult", "COM1", "COM1_LSR", "EXIT_PORT"]

COM1 = 0x3F8
COM1_LSR = 0x3FD
EXIT_PORT = 0xF4
VGA = 0xB8000
CHUNK = 1 << 20             # instructions per emu_start when counting



class FlatResult(tuple):
    """(exit_code, serial_bytes, insn_count) plus .reason .detail .seconds .vga"""

    def __new__(cls, exit_code, serial, insn_count, reason, detail="", seconds=0.0, vga=""):
        self = tuple.__new__(cls, (exit_code, serial, insn_count))
        self.reason, self.detail, self.seconds, self.vga = reason, detail, seconds, vga
        return self

    exit_code = property(lambda self: self[0])
    serial = property(lambda self: self[1])
    insn_count = property(lambda self: self[2])

    def __repr__(self):
        return (f"FlatResult(exit_code={self[0]!r}, serial={self[1]!r}, insn_count={self[2]!r}, "
                f"reason={self.reason!r}, detail={self.detail!r}, seconds={self.seconds:.3f})")


# the permissions a TLB fill grants for each access kind (Unicorn's UC_MEM_*
# codes 16 read, 17 write, 18 fetch), as hv's fill hook grants them: write
# only after a write, execute only after a fetch, so a store to a page that
# was only read or fetched takes a fresh fill instead of Unicorn's
# self-modifying-code check on every store to a writable+executable page
_PER_ACCESS = {16: UC_PROT_READ, 17: UC_PROT_READ | UC_PROT_WRITE,
               18: UC_PROT_READ | UC_PROT_EXEC}


def _identity_fill(uc, va, typ, entry, _ud):
    """UC_HOOK_TLB_FILL of the per-access baseline: virtual == physical (the
    toy guests' own page tables are identity maps), the permissions of the
    access kind only."""
    entry.paddr = va & ~0xFFF
    entry.perms = _PER_ACCESS.get(typ, UC_PROT_READ)
    return True


def fill_hooks():
    """The identity fills usable here, default first: "c" (csrc/vcpu.c's
    identity_fill, registered straight with libunicorn as hv's own fill is)
    where hv's C vCPU module is built, and "python"."""
    from hv.machine.unicorn_hooks import available_hooks
    return ["c", "python"] if "c" in available_hooks() else ["python"]


def _setup(image, ram_size, tlb="flat", count=False, fill=None):
    """tlb "flat": all RAM one mapping, every page read/write/execute and no
    hook; "per_access": the same memory behind UC_TLB_VIRTUAL and an identity
    TLB-fill hook that grants each access kind's permissions only (what hv's
    vCPU does, without the NPT and the PSP). fill: that hook in "c" or
    "python" (None: the first of fill_hooks(); hv boot's fill is in C where
    it can be, and a Python call per fill would cost the baseline about a
    microsecond a page). count: count instructions with hv's own C block hook
    (hv.machine.unicorn_vcpu.BlockCounter), as `hv boot` does on every run
    (st["counter"])."""
    mode = UC_MODE_64 if image.mode == 64 else UC_MODE_32
    uc = Uc(UC_ARCH_X86, mode)
    uc.mem_map(0, ram_size)
    if tlb == "per_access":
        fill = fill or fill_hooks()[0]
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        if fill == "c":
            import ctypes
            from hv.machine.unicorn_hooks import _add_c_hook, _lib
            if _lib is None:
                raise RuntimeError("the C identity fill needs hv's C vCPU module (hv._vcpu_c)")
            _add_c_hook(uc, UC_HOOK_TLB_FILL, _lib.vcpu_identity_fill_addr(), ctypes.c_void_p(0))
        elif fill == "python":
            uc.hook_add(UC_HOOK_TLB_FILL, _identity_fill)
        else:
            raise ValueError(f"unknown fill {fill!r} (c or python)")
    elif tlb != "flat":
        raise ValueError(f"unknown tlb mode {tlb!r} (flat or per_access)")
    image.load(lambda gpa, data: uc.mem_write(gpa, data), include_zero=False)
    apply_boot_state(uc, image)

    st = {"serial": bytearray(), "exit": None, "fault": None, "mute": False, "counter": None}
    if count:
        from hv.machine.unicorn_hooks import BlockCounter
        st["counter"] = BlockCounter(uc, lambda a, n: bytes(uc.mem_read(a, n)), image.mode)

    def on_out(uc, port, size, value, _):
        if port == COM1:
            if not st["mute"]:
                st["serial"].append(value & 0xFF)
        elif port == EXIT_PORT:
            st["exit"] = value & 0xFF
            uc.emu_stop()

    def on_in(uc, port, size, _):
        return 0x60 if port == COM1_LSR else 0xFF

    def on_intr(uc, intno, _):
        # Unicorn reports CPU exceptions and INT n here instead of
        # delivering them through the IDT; the toy guests install no
        # handlers, so any of them ends the run as a triple fault would.
        st["fault"] = f"exception/interrupt {intno}"
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, X.UC_X86_INS_OUT)
    uc.hook_add(UC_HOOK_INSN, on_in, None, 1, 0, X.UC_X86_INS_IN)
    uc.hook_add(UC_HOOK_INTR, on_intr)
    pc_reg = X.UC_X86_REG_RIP if image.mode == 64 else X.UC_X86_REG_EIP
    return uc, st, pc_reg


def _until(image):
    return (1 << 64) - 1 if image.mode == 64 else (1 << 32) - 1


def _step(uc, st, pc_reg, image, count):
    """One emu_start from the current pc; returns an error string or None."""
    try:
        uc.emu_start(uc.reg_read(pc_reg), _until(image), count=count)
    except UcError as e:
        return f"{e} at {uc.reg_read(pc_reg):#x}"
    return None


def _ended(st, err):
    return st["exit"] is not None or err is not None or st["fault"] is not None


def _at_hlt(uc, pc):
    # Unicorn returns from emu_start after executing hlt: pc is past it.
    try:
        return bytes(uc.mem_read(pc - 1, 1)) == b"\xf4"
    except UcError:
        return False


def _outcome(uc, st, pc_reg, err, ram_size, halted):
    pc = uc.reg_read(pc_reg)
    if st["exit"] is not None:
        reason, code, detail = "exit", st["exit"], ""
    elif err or st["fault"]:
        reason, code, detail = "fault", None, err or f"{st['fault']} at {pc:#x}"
    elif halted:
        reason, code, detail = "hlt", 0, ""
    else:
        reason, code, detail = "budget", None, f"stopped at {pc:#x}"
    vga = ""
    if ram_size >= VGA + 4000:
        raw = bytes(uc.mem_read(VGA, 4000))
        rows = ["".join(chr(c) if 32 <= c < 127 else " " for c in raw[r * 160:(r + 1) * 160:2]).rstrip()
                for r in range(25)]
        vga = "\n".join(rows).rstrip("\n")
    return code, reason, detail, vga


def _tail_count(image, ram_size, prefix, limit):
    """Re-run the guest (deterministic) for `prefix` instructions without
    hooks, then count the rest (at most `limit`) with a basic-block hook."""
    import capstone
    md = capstone.Cs(capstone.CS_ARCH_X86,
                     capstone.CS_MODE_64 if image.mode == 64 else capstone.CS_MODE_32)
    uc, st, pc_reg = _setup(image, ram_size)
    st["mute"] = True
    if prefix:
        _step(uc, st, pc_reg, image, prefix)
    cache, acc = {}, {"n": 0, "last": None}

    def ninsns(addr, size):
        k = cache.get((addr, size))
        if k is None:
            k = cache[(addr, size)] = sum(1 for _ in md.disasm_lite(bytes(uc.mem_read(addr, size)), addr))
        return k

    def on_block(uc, addr, size, _):
        if acc["last"] is not None:
            acc["n"] += ninsns(*acc["last"])
        acc["last"] = (addr, size)

    uc.hook_add(UC_HOOK_BLOCK, on_block)
    uc.ctl_flush_tb()
    err = _step(uc, st, pc_reg, image, limit)
    if acc["last"] is not None:
        # The block the run stopped in: the instructions before the final
        # pc.  After the out to 0xF4 (and after hlt) pc is already past the
        # instruction; a faulting instruction leaves pc on itself and counts
        # as executed (as Unicorn's count does).
        addr, size = acc["last"]
        pc = uc.reg_read(pc_reg)
        done = 0
        for a, sz, _, _ in md.disasm_lite(bytes(uc.mem_read(addr, size)), addr):
            if a >= pc:
                break
            done += 1
        if (err or st["fault"]) and st["exit"] is None and addr <= pc < addr + size:
            done += 1
        acc["n"] += done
    return prefix + acc["n"]


def run_flat_unicorn(image, ram_size, max_insns=100_000_000, count_insns=True,
                     chunk=CHUNK, tlb="flat", block_count=False, fill=None):
    """Run an ELF64 (or multiboot) guest in plain, flat Unicorn.  See module doc."""
    from hv.machine.loader import load_image
    if not hasattr(image, "segments"):
        image = load_image(image, ram_size)
    elif image.ram_size != ram_size:
        image = load_image(image.path, ram_size, name=image.name)
    max_insns = int(max_insns or 0)
    uc, st, pc_reg = _setup(image, ram_size, tlb, count=block_count, fill=fill)
    err = None
    t0 = time.perf_counter()
    if not count_insns:
        err = _step(uc, st, pc_reg, image, max_insns)
        seconds = time.perf_counter() - t0
        if st["counter"] is not None:
            st["counter"].close()
        # (with a budget, a run that stops right after an instruction ending
        # in byte 0xF4 would look like hlt; the counting path rules that out)
        halted = not _ended(st, err) and _at_hlt(uc, uc.reg_read(pc_reg))
        code, reason, detail, vga = _outcome(uc, st, pc_reg, err, ram_size, halted)
        return FlatResult(code, bytes(st["serial"]), None, reason, detail, seconds, vga)
    done = 0                      # instructions retired in completed chunks
    count = None
    halted = False
    while True:
        n = chunk if not max_insns else min(chunk, max_insns - done)
        if n <= 0:
            break
        err = _step(uc, st, pc_reg, image, n)
        if _ended(st, err):
            break
        if _at_hlt(uc, uc.reg_read(pc_reg)):
            # Either the guest executed hlt or the chunk ran out right after
            # an instruction whose last byte is 0xF4: the replay tells.
            count = _tail_count(image, ram_size, done, n)
            if count < done + n:
                halted = True
                break
            count = None
        done += n
    seconds = time.perf_counter() - t0
    code, reason, detail, vga = _outcome(uc, st, pc_reg, err, ram_size, halted)
    if reason == "budget":
        count = done
    elif count is None:
        count = _tail_count(image, ram_size, done, chunk)
    return FlatResult(code, bytes(st["serial"]), count, reason, detail, seconds, vga)


if __name__ == "__main__":
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    ap = argparse.ArgumentParser(description="run a toy guest in flat Unicorn")
    ap.add_argument("image")
    ap.add_argument("--ram", type=lambda s: int(s, 0), default=64 << 20)
    ap.add_argument("--max-insns", type=int, default=100_000_000)
    ap.add_argument("--no-count", action="store_true", help="fastest run, no instruction count")
    a = ap.parse_args()
    r = run_flat_unicorn(a.image, a.ram, a.max_insns, count_insns=not a.no_count)
    sys.stdout.write(r.serial.decode("latin-1"))
    if r.vga:
        print("--- VGA ---\n" + r.vga)
    print(repr(r))
