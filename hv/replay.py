"""Replay a fault trace through the VMM's NPF path.

The hot loop is the engine's batch walk (C when built): it translates
accesses until the first NPT miss, the VMM asks the PSP to map, and the walk
resumes at the missing access. No Python object is made per access.
"""
import time
from array import array
from bisect import bisect_right

from nptcore.bits import PF_FINAL, PF_U, PF_W, PF_ID, ACC_W, ACC_X

from .vmm import VmStopped

try:                      # the trace parser's C module also finds straddling rows
    from . import _trace_c
    if not hasattr(_trace_c.lib, "trace_straddles"):
        _trace_c = None
except ImportError:       # pragma: no cover - depends on the build
    _trace_c = None

PAGE_MASK = ~0xFFF


def _straddling_rows(gpa, size):
    """Indices of the rows crossing a page boundary (C when built)."""
    n = len(gpa)
    if _trace_c is not None and n and gpa.typecode == "Q" and size.typecode == "I":
        ffi, lib = _trace_c.ffi, _trace_c.lib
        g, s = ffi.from_buffer("uint64_t[]", gpa), ffi.from_buffer("uint32_t[]", size)
        cap = 1024
        while True:
            out = array("Q", bytes(8 * cap))
            m = lib.trace_straddles(g, s, n, ffi.from_buffer("uint64_t[]", out), cap)
            if m <= cap:
                return out[:m]
            cap = m
    return [i for i in range(n) if (gpa[i] & 0xFFF) + size[i] > 0x1000]


def expand_straddles(trace):
    """(gpas, accesses, index_map): an access that crosses a page boundary
    touches both pages, so it becomes two walks (the second at the next
    page's base). index_map[k] is the trace row of walk k, or None when no
    access straddles (the common case)."""
    gpa, size, acc = trace.gpa, trace.size, trace.access
    straddles = trace.straddling_rows() if hasattr(trace, "straddling_rows") else \
        _straddling_rows(gpa, size)
    if not len(straddles):
        return gpa, acc, None
    g2, a2, extra = array("Q"), array("B"), array("Q")
    prev = 0
    for i in straddles:
        g2.extend(gpa[prev:i + 1])
        a2.extend(acc[prev:i + 1])
        last_page = (gpa[i] + size[i] - 1) & PAGE_MASK
        p = (gpa[i] & PAGE_MASK) + 0x1000
        while p <= last_page:
            extra.append(len(g2))
            g2.append(p)
            a2.append(acc[i])
            p += 0x1000
        prev = i + 1
    g2.extend(gpa[prev:])
    a2.extend(acc[prev:])
    return g2, a2, _RowMap(extra)


class _RowMap:
    """walk index -> trace row, without one entry per access: `extra` holds
    the (sorted) walk indices of the added second-page walks."""
    __slots__ = ("extra",)

    def __init__(self, extra):
        self.extra = extra

    def __getitem__(self, k):
        return k - bisect_right(self.extra, k)


def npf_errcode(access):
    e = PF_U | PF_FINAL
    if access == ACC_W:
        e |= PF_W
    elif access == ACC_X:
        e |= PF_ID
    return e


def replay(vmm, vm, trace, progress=None, chunk=1 << 16):
    """Replay `trace` into `vm`. Returns a dict of counters.

    `progress(done, total)` is called now and then when given."""
    gpas, accs, index_map = expand_straddles(trace)
    n = len(gpas)
    out = array("Q", bytes(8 * n)) if n else array("Q")
    gv, av, ov = memoryview(gpas), memoryview(accs), memoryview(out)
    eng = vmm.engine
    rips = getattr(trace, "rip", None)
    insns = getattr(trace, "insn", None)
    i = 0
    stopped = None
    t0 = time.perf_counter()
    next_report = chunk
    while i < n:
        end = min(n, i + chunk) if progress else n
        k, miss = eng.walk_batch(vmm.npt_root(vm), gv[i:end], av[i:end], ov[i:end])
        i += k
        if progress and i >= next_report:
            progress(i, n)
            next_report = i + chunk
        if miss is None:
            continue
        row = index_map[i] if index_map is not None else i
        rip = rips[row] if rips else None
        insn = insns[row] if insns else None
        try:
            vmm.handle_npf(vm, gpas[i], accs[i], miss.errcode, rip=rip, insn=insn)
        except VmStopped as e:
            stopped = e
            break
    if progress:
        progress(i, n)
    elapsed = time.perf_counter() - t0
    return dict(
        accesses=len(trace),
        walks=i,
        npf=vm.npf,
        pages_mapped=vm.pages_mapped,
        elapsed_s=elapsed,
        stopped=stopped,
    )
