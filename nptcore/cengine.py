"""C NPT engine: a thin wrapper over the cffi module nptcore._npt_c.

All the work is in csrc/npt.c; this file only converts arguments and results.
Arguments the C types cannot hold are mapped to the same outcome the Python
twin gives (INST_BAD_ARG, or OverflowError for walks).
"""
from ._npt_c import ffi, lib
from .bits import (
    GPA_LIMIT, HPA_LIMIT, INST_BAD_ARG, MODES, WalkResult, Walk2DResult,
)

_U64 = (1 << 64) - 1
_new = ffi.new
_from_buffer = ffi.from_buffer
_unpack = ffi.unpack
_walk_v = lib.npt_walk_v
_walk2d = lib.npt_walk2d
_walk_rmp_v = lib.npt_walk_rmp_v
_tnew = tuple.__new__          # namedtuple construction without its __new__
_WALK_RESULT_P = ffi.typeof("npt_walk_result *")
_WALK2D_RESULT_P = ffi.typeof("npt_walk2d_result *")


def _u64_or(x, bad):
    """x if it fits in a uint64_t, else `bad` (a value the C checks reject)."""
    return x if 0 <= x <= _U64 else bad


def _check_batch(gpas, accesses, out_hpas):
    """walk_batch's argument checks (with or without the RMP); returns the count."""
    n = len(gpas)
    if len(accesses) != n or len(out_hpas) < n:
        raise ValueError("walk_batch: accesses must have the length of gpas "
                         "and out_hpas at least that length")
    with memoryview(gpas) as g, memoryview(accesses) as a, memoryview(out_hpas) as o:
        if g.itemsize != 8 or a.itemsize != 1 or o.itemsize != 8:
            raise TypeError("walk_batch: gpas and out_hpas must be array('Q'), "
                            "accesses bytes or array('B')")
    return n


class CEngine:
    name = "c"

    def __init__(self, buf):
        self._cbuf = _from_buffer("uint8_t[]", buf, require_writable=True)
        self.mem_size = len(self._cbuf)
        if self.mem_size < 4096:
            raise ValueError("nptcore: host memory smaller than one page")

    def close(self):
        """Release the buffer export (so the mmap can be closed)."""
        ffi.release(self._cbuf)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ walk
    def walk(self, root, gpa, access, set_ad=True):
        # by-value result: no ffi.new; a bool converts slowly, hence 1/0
        r = _walk_v(self._cbuf, self.mem_size, root, gpa, access,
                    1 if set_ad else 0)
        lv = r.level
        if lv > 0:
            return _tnew(WalkResult, (True, r.hpa, lv, r.entry, 0))
        return _tnew(WalkResult, (False, 0, -lv, r.entry, r.errcode))

    def walk_batch(self, root, gpas, accesses, out_hpas, set_ad=True):
        n = _check_batch(gpas, accesses, out_hpas)
        miss = _new(_WALK_RESULT_P)
        k = lib.npt_walk_batch(
            self._cbuf, self.mem_size, root,
            _from_buffer("uint64_t[]", gpas),
            _from_buffer("uint8_t[]", accesses),
            _from_buffer("uint64_t[]", out_hpas, require_writable=True),
            n, 1 if set_ad else 0, miss)
        if k == n:
            return n, None
        return k, WalkResult(False, 0, miss.level, miss.entry, miss.errcode)

    # ------------------------------------------------------ walks with the RMP
    @staticmethod
    def _rmp_c(rmp):
        """The npt_rmp struct of an RmpView (made once, kept in the view)."""
        c = rmp._c
        if c is None:
            arr = _from_buffer("uint64_t[]", rmp.buf)
            c = _new("npt_rmp *")
            c.entries = arr
            c.nframes = rmp.nframes
            c.asid = rmp.asid if rmp.asid <= _U64 else _U64
            rmp._c = c = (c, arr)
        return c[0]

    def walk_rmp(self, root, gpa, access, rmp, set_ad=True):
        """walk() with the RMP check (nptcore/rmp.py) on the translation."""
        r = _walk_rmp_v(self._cbuf, self.mem_size, root, gpa, access,
                        1 if set_ad else 0, self._rmp_c(rmp))
        lv = r.level
        if lv > 0:
            return _tnew(WalkResult, (True, r.hpa, lv, r.entry, 0))
        return _tnew(WalkResult, (False, 0, -lv, r.entry, r.errcode))

    def walk_batch_rmp(self, root, gpas, accesses, out_hpas, rmp, set_ad=True):
        """walk_batch() with the RMP check on every translation."""
        n = _check_batch(gpas, accesses, out_hpas)
        miss = _new(_WALK_RESULT_P)
        k = lib.npt_walk_batch_rmp(
            self._cbuf, self.mem_size, root,
            _from_buffer("uint64_t[]", gpas),
            _from_buffer("uint8_t[]", accesses),
            _from_buffer("uint64_t[]", out_hpas, require_writable=True),
            n, 1 if set_ad else 0, self._rmp_c(rmp), miss)
        if k == n:
            return n, None
        return k, WalkResult(False, 0, miss.level, miss.entry, miss.errcode)

    def walk2d_rmp(self, root, cr3, va, access, mode, rmp, set_ad=True):
        """walk2d() with the RMP check on every nested translation."""
        r = _new(_WALK2D_RESULT_P)
        rc = lib.npt_walk2d_rmp(self._cbuf, self.mem_size, root, cr3, va, access, mode,
                                1 if set_ad else 0, self._rmp_c(rmp), r)
        if rc < 0:
            raise ValueError("walk2d: bad mode %r" % (mode,))
        if rc:
            return Walk2DResult(True, r.hpa, r.gpa, r.kind, 0, r.level)
        return Walk2DResult(False, 0, r.gpa, r.kind, r.errcode, r.level)

    def floor_walk_batch(self, root, gpas, out_hpas):
        """Benchmark floor: four dependent loads per GPA, no checks at all.
        Only for well-formed 4-level 4 KiB trees (unsafe otherwise)."""
        n = len(gpas)
        if len(out_hpas) < n:
            raise ValueError("floor_walk_batch: out_hpas too short")
        return lib.npt_floor_walk_batch(
            self._cbuf, root, _from_buffer("uint64_t[]", gpas),
            _from_buffer("uint64_t[]", out_hpas, require_writable=True), n)

    # --------------------------------------------------------- install/clear
    def tables_needed(self, root, gpa, level):
        if (level != 1 and level != 2) or not (0 <= root <= _U64 and 0 <= gpa <= _U64):
            return INST_BAD_ARG, 0
        n = _new("int *")
        rc = lib.npt_tables_needed(self._cbuf, self.mem_size, root, gpa, level, n)
        return rc, n[0]

    def install(self, root, gpa, hpa, level, leaf_flags, spare_tables):
        if ((level != 1 and level != 2)
                or not (0 <= root <= _U64 and 0 <= gpa < GPA_LIMIT
                        and 0 <= hpa < HPA_LIMIT and 0 <= leaf_flags <= _U64)):
            return INST_BAD_ARG, 0
        # at most 3 tables are ever needed; 1 is a value the C checks reject
        spares = [_u64_or(s, 1) for s in spare_tables[:3]]
        n_used = _new("int *")
        rc = lib.npt_install(self._cbuf, self.mem_size, root, gpa, hpa, level,
                             leaf_flags, _new("uint64_t[]", spares or [0]),
                             len(spares), n_used)
        return rc, n_used[0]

    def clear(self, root, gpa, level):
        if (level != 1 and level != 2) or not (0 <= root <= _U64 and 0 <= gpa <= _U64):
            return INST_BAD_ARG, 0
        old = _new("uint64_t *")
        rc = lib.npt_clear(self._cbuf, self.mem_size, root, gpa, level, old)
        return rc, old[0]

    # -------------------------------------------------------------- traversal
    def mappings(self, root):
        if not 0 <= root <= _U64:
            return []
        cap = 1024
        while True:
            arr = _new("uint64_t[]", 4 * cap)
            total = lib.npt_mappings(self._cbuf, self.mem_size, root, arr, cap)
            if total < 0:
                raise MemoryError("npt_mappings: out of memory")
            if total <= cap:
                break
            cap = total
        v = _unpack(arr, 4 * total)
        return list(zip(v[0::4], v[1::4], v[2::4], v[3::4]))

    def table_pages(self, root):
        if not 0 <= root <= _U64:
            return []
        cap = 256
        while True:
            hpas = _new("uint64_t[]", cap)
            levels = _new("uint8_t[]", cap)
            total = lib.npt_table_pages(self._cbuf, self.mem_size, root,
                                        hpas, levels, cap)
            if total < 0:
                raise MemoryError("npt_table_pages: out of memory")
            if total <= cap:
                break
            cap = total
        return list(zip(_unpack(hpas, total), _unpack(levels, total)))

    def canon_page(self, hpa):
        out = _new("uint8_t[4096]")
        if not 0 <= hpa <= _U64 or lib.npt_canon_page(self._cbuf, self.mem_size, hpa, out):
            raise ValueError("canon_page: hpa %#x misaligned or outside memory" % hpa)
        return ffi.buffer(out)[:]

    # ----------------------------------------------------------------- walk2d
    def walk2d(self, root, cr3, va, access, mode, set_ad=True):
        r = _new(_WALK2D_RESULT_P)
        rc = _walk2d(self._cbuf, self.mem_size, root, cr3, va, access, mode,
                     1 if set_ad else 0, r)
        if rc < 0:
            raise ValueError("walk2d: bad mode %r" % (mode,))
        if rc:
            return Walk2DResult(True, r.hpa, r.gpa, r.kind, 0, r.level)
        return Walk2DResult(False, 0, r.gpa, r.kind, r.errcode, r.level)


assert set(MODES) == {2, 3, 4}
