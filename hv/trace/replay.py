"""Replay a fault trace through the VMM's NPF path.

The hot loop is the engine's batch walk (C when built): it translates
accesses until the first NPT miss, the VMM asks the PSP to map, and the walk
resumes at the missing access. No Python object is made per access.

With the C engine the loop calls its batch walk (csrc/npt.c's
npt_walk_batch, the function `eng.walk_batch` wraps) directly, on pointers
into the trace's arrays taken once: resuming after an NPF costs one C call,
not the wrapper's per-call buffer exports and result objects (most of the
VMM's time per NPF when every access faults).
"""
import time
from array import array
from bisect import bisect_right

from nptcore.bits import PF_FINAL, PF_U, PF_W, PF_ID, ACC_W, ACC_X

from hv.errors import VmStopped

try:                      # the trace parser's C module also finds straddling rows
    from hv import _trace_c
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


class _Miss:
    __slots__ = ("errcode",)


def _batch_walker(eng, gpas, accs, out, rmp=None):
    """(walk, miss): walk(root, i, end) walks gpas[i:end] (translations into
    out[i:end]) up to the first NPT miss and returns how many hit; after a
    miss at i + that count, miss.errcode is its NPF error code. rmp (the rmp
    design's RmpView): every translation is checked against it, a mismatch
    is a miss with PF_RMP.

    With the C engine this is npt_walk_batch(_rmp) itself on pointers taken
    once (_c_batch_walk); else eng.walk_batch(_rmp) on slices."""
    walk, miss = _c_batch_walk(eng, gpas, accs, out, rmp)
    if walk is not None:
        return walk, miss
    gv, av, ov = memoryview(gpas), memoryview(accs), memoryview(out)
    miss = _Miss()
    if rmp is None:
        batch = eng.walk_batch
    else:
        def batch(root, g, a, o):
            return eng.walk_batch_rmp(root, g, a, o, rmp)

    def walk(root, i, end):
        k, m = batch(root, gv[i:end], av[i:end], ov[i:end])
        if m is not None:
            miss.errcode = m.errcode
        return k
    return walk, miss


def _c_batch_walk(eng, gpas, accs, out, rmp=None):
    """_batch_walker's C version, or (None, None) when the engine is not the
    C one or the arrays are not of the types its walk_batch takes."""
    try:
        from nptcore.cengine import CEngine, ffi, lib
    except ImportError:       # pragma: no cover - depends on the build
        return None, None
    if not isinstance(eng, CEngine) or not len(gpas):
        return None, None
    with memoryview(gpas) as g, memoryview(accs) as a, memoryview(out) as o:
        if (g.itemsize, a.itemsize, o.itemsize) != (8, 1, 8) or not len(accs) == len(gpas) <= len(out):
            return None, None
    gp = ffi.from_buffer("uint64_t[]", gpas)
    ap = ffi.from_buffer("uint8_t[]", accs)
    op = ffi.from_buffer("uint64_t[]", out, require_writable=True)
    miss = ffi.new("npt_walk_result *")
    cbuf, mem_size = eng._cbuf, eng.mem_size
    if rmp is not None:
        batch_rmp, rc = lib.npt_walk_batch_rmp, CEngine._rmp_c(rmp)

        def walk(root, i, end):
            return batch_rmp(cbuf, mem_size, root, gp + i, ap + i, op + i, end - i, 1, rc, miss)
        return walk, miss
    batch = lib.npt_walk_batch

    def walk(root, i, end):
        return batch(cbuf, mem_size, root, gp + i, ap + i, op + i, end - i, 1, miss)
    return walk, miss


def replay(vmm, vm, trace, progress=None, chunk=1 << 16):
    """Replay `trace` into `vm`. Returns a dict of counters.

    `progress(done, total)` is called now and then when given."""
    gpas, accs, index_map = expand_straddles(trace)
    n = len(gpas)
    out = array("Q", bytes(8 * n)) if n else array("Q")
    walk, miss = _batch_walker(vmm.engine, gpas, accs, out, getattr(vm, "rmp", None))
    rips = getattr(trace, "rip", None)
    insns = getattr(trace, "insn", None)
    npt_root, handle_npf = vmm.npt_root, vmm.handle_npf
    i = 0
    stopped = None
    t0 = time.perf_counter()
    next_report = chunk
    while i < n:
        end = min(n, i + chunk) if progress else n
        i += walk(npt_root(vm), i, end)
        if progress and i >= next_report:
            progress(i, n)
            next_report = i + chunk
        if i == end:
            continue
        row = index_map[i] if index_map is not None else i
        try:
            handle_npf(vm, gpas[i], accs[i], miss.errcode,
                       rips[row] if rips else None, insns[row] if insns else None)
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
