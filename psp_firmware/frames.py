"""Per-frame ownership table (the PSP's PAMT), kept in PSP private memory.

Frame-state model
-----------------
Every 4 KiB host frame is in exactly one state. Frames the table does not
list (state byte 0) are HV; the firmware region is FW by construction (a
range, never listed: its state bytes stay 0).

    HV ----POOL_ADD----------------------------> POOL
    POOL --(table page taken by an update)-----> TABLE(h)
    TABLE(h) --DECOMMISSION (scrubbed)---------> POOL
    HV ----LAUNCH_START------------------------> VMSA(h)
    VMSA(h) --DECOMMISSION (scrubbed)----------> HV
    HV ----SET_PRIVATE_MEMORY------------------> PRIVATE(h)
    HV | PRIVATE(h) --UPDATE_NPT / LAUNCH_UPDATE_DATA--> MAPPED(h, gpa)
    MAPPED(h, gpa) --UNMAP---------------------> PRIVATE(h)
    PRIVATE(h) --RECLAIM (scrubbed)------------> HV
    MAPPED(h) | PRIVATE(h) --DECOMMISSION (scrubbed)--> HV

Representation: a structure of arrays, one element per frame, each over an
anonymous mmap (zero-filled lazily by the OS, so a large host costs memory
only for the frames actually touched), so that the C fast path can read and
write the table in place (native little-endian x86-64 layout):

    state_buf / states  u8 per frame, an `F` value (HV == 0)
    owner_buf / owner   u32 per frame, the guest handle (0 for HV and POOL)
    gpa_buf   / gpa     u64 per frame, the GPA of a MAPPED frame (0 otherwise)

`*_buf` are the mmaps, the others native memoryview casts of them (the u8
view is `states`: `state(pfn)` is the method that reads one frame).

Invariants (asserted by `check_invariants`, used by the tests and fuzzers):
a frame has one (valid) state; a MAPPED frame is mapped by exactly one
(handle, gpa); FW frames are never listed; TABLE/VMSA/PRIVATE/MAPPED name a
live handle; HV and POOL frames have owner 0 and gpa 0; frames that are not
MAPPED have gpa 0.

What each state means for an HPA the VMM hands in (the order of the checks
is the validation order of docs/psp.md): FW -> FIRMWARE_PAGE, TABLE or POOL ->
TABLE_PAGE, VMSA -> BAD_PAGE_STATE, MAPPED -> PAGE_OWNED (aliasing),
PRIVATE of another guest -> BAD_OWNER; HV or PRIVATE of the same guest is
accepted.
"""
import mmap
import struct
import sys
from array import array
from enum import IntEnum
from functools import lru_cache

from .status import Status

PAGE = 4096


class F(IntEnum):
    HV = 0
    FW = 1
    POOL = 2
    TABLE = 3
    VMSA = 4
    PRIVATE = 5
    MAPPED = 6


_HV = (F.HV, 0, 0)
_FW = (F.FW, 0, 0)
_FS = tuple(F)                         # state byte -> F
_GUEST = (F.TABLE, F.VMSA, F.PRIVATE, F.MAPPED)
_U32 = struct.Struct("=I")             # native order, as memoryview.cast("I")
_U32_MAX = (1 << 32) - 1

# scans go a chunk of frames at a time, skipping all-zero chunks with one memcmp
_CHUNK = 1 << 16
_Z = bytes(8 * _CHUNK)                 # zeros, long enough for a chunk of any array
_FEW = 2                               # ranges this short: frame by frame is faster
_GPA_RUN_CACHED = 1 << 12              # set_range builds gpa runs up to this long as one int


def _anon(size):
    """Anonymous zero-filled memory. Private, not mmap's default shared: a read
    of a never-written page of a private mapping maps the kernel's zero page,
    while a shared (shmem) one allocates, so scans would cost host-size RSS."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    return mmap.mmap(-1, size)


def _is_u32(v):
    return isinstance(v, int) and 0 <= v <= _U32_MAX


def _zeros(n):
    return _Z[:n] if n <= len(_Z) else bytes(n)


@lru_cache(maxsize=16)
def _gpa_run(n):
    """(sum of 2**(64*i), sum of i*PAGE * 2**(64*i)) for i < n, in the native order:
    gpa * first + second is the u64 array gpa, gpa + PAGE, ... as one integer."""
    ones = ((1 << (64 * n)) - 1) // ((1 << 64) - 1)
    steps = int.from_bytes(array("Q", range(0, n * PAGE, PAGE)).tobytes(), sys.byteorder)
    return ones, steps


def _mask(ones):
    """A bytes.translate table: the byte values in `ones` -> 1, others -> 0."""
    t = bytearray(256)
    for v in ones:
        t[v] = 1
    return bytes(t)


_M_NONZERO = _mask(range(1, 256))
_M_GUEST = _mask(_GUEST)
_M_NOT_MAPPED = _mask(v for v in range(256) if v != F.MAPPED)
_M_HV_POOL = _mask((F.HV, F.POOL))
_M_INVALID = _mask(v for v in range(256) if v not in (F.HV, F.POOL) + _GUEST)
_M_NOT_ASSIGNABLE = _mask(v for v in range(256) if v not in (F.HV, F.PRIVATE))
_M_EQ = {v: _mask((v,)) for v in F}
_M_NE = {v: _mask(w for w in range(256) if w != v) for v in F}


def _runs(b, table):
    """(start, end) of each maximal run of bytes of `b` that `table` maps to 1."""
    t = b.translate(table)
    n = len(t)
    i = t.find(1)
    while i >= 0:
        j = t.find(0, i)
        if j < 0:
            j = n
        yield i, j
        i = t.find(1, j)


class FrameTable:
    def __init__(self, host_size, fw_base, fw_size):
        self.host_size = host_size
        self.nframes = n = host_size // PAGE
        self.fw_lo = fw_base // PAGE
        self.fw_hi = (fw_base + fw_size) // PAGE
        m = max(n, 1)                  # an mmap cannot be empty
        self.state_buf = _anon(m)
        self.owner_buf = _anon(4 * m)
        self.gpa_buf = _anon(8 * m)
        self.states = memoryview(self.state_buf)[:n].cast("B")
        self.owner = memoryview(self.owner_buf)[:4 * n].cast("I")
        self.gpa = memoryview(self.gpa_buf)[:8 * n].cast("Q")

    def close(self):
        """Release the views and unmap the arrays; the table is unusable after.

        Safe to call twice; never needed (the mmaps go with the object). Raises
        BufferError while someone else (a cffi from_buffer) still holds one."""
        for name in ("states", "owner", "gpa"):
            v = getattr(self, name, None)
            if v is not None:
                v.release()
                setattr(self, name, None)
        for name in ("state_buf", "owner_buf", "gpa_buf"):
            b = getattr(self, name, None)
            if b is not None:
                b.close()

    # -- reading ---------------------------------------------------------
    def get(self, pfn):
        if self.fw_lo <= pfn < self.fw_hi:
            return _FW
        if not 0 <= pfn < self.nframes:
            return _HV
        st = self.states[pfn]
        if not st:
            return _HV
        return (_FS[st], self.owner[pfn], self.gpa[pfn])

    def state(self, pfn):
        return self.get(pfn)[0]

    def _nonzero_chunks(self):
        """(first pfn, state bytes) of each chunk that lists a frame."""
        buf, n = self.state_buf, self.nframes
        for c0 in range(0, n, _CHUNK):
            c1 = min(c0 + _CHUNK, n)
            sc = buf[c0:c1]
            if sc != _zeros(c1 - c0):
                yield c0, sc

    def counts(self):
        out = {s.name: 0 for s in F}
        listed = 0
        for _c0, sc in self._nonzero_chunks():
            for s in F:
                if s:
                    k = sc.count(s)
                    out[s.name] += k
                    listed += k
        out["FW"] = self.fw_hi - self.fw_lo
        out["HV"] = self.nframes - out["FW"] - listed
        return out

    def frames_of(self, handle):
        """The frames in a guest state owned by `handle`, in pfn order."""
        if not _is_u32(handle):
            return []
        pat = _U32.pack(handle)
        ob, owner = self.owner_buf, self.owner
        out = []
        for c0, sc in self._nonzero_chunks():
            for a, b in _runs(sc, _M_GUEST):
                a += c0
                b += c0
                if ob[4 * a:4 * b] == pat * (b - a):
                    out.extend(range(a, b))
                else:
                    out.extend(a + i for i, h in enumerate(owner[a:b]) if h == handle)
        return out

    def snapshot(self):
        """{pfn: (F state, handle, gpa)} for every listed (non-HV) frame."""
        out = {}
        for c0, sc in self._nonzero_chunks():
            for a, b in _runs(sc, _M_NONZERO):
                a += c0
                b += c0
                out.update(zip(range(a, b),
                               zip(map(_FS.__getitem__, self.states[a:b]),
                                   self.owner[a:b], self.gpa[a:b])))
        return out

    # -- validation (no side effects) ------------------------------------
    def check_range(self, hpa, nbytes):
        """Address checks shared by every command that takes an HPA range."""
        if hpa % PAGE:
            return Status.MISALIGNED
        if nbytes <= 0:
            return Status.INVALID_PARAM
        end = hpa + nbytes
        if end > (1 << 64):
            return Status.RANGE_OVERFLOW
        if hpa >= self.host_size or end > self.host_size:
            return Status.OUT_OF_RANGE
        return Status.SUCCESS

    def _first_owner_diff(self, lo, n, handle):
        """Index in [0, n] of the first of frames lo.. whose owner is not `handle`."""
        if n <= 0:
            return n
        if not _is_u32(handle):
            return 0
        ob, pat = self.owner_buf, _U32.pack(handle)
        a, b = 0, n                    # owners [0, a) match; the first miss is in [a, b]
        if ob[4 * lo:4 * (lo + n)] == pat * n:
            return n
        while b - a > 1:               # [a, b) holds a miss
            mid = (a + b) // 2
            if ob[4 * (lo + a):4 * (lo + mid)] == pat * (mid - a):
                a = mid
            else:
                b = mid
        return a

    def check_assignable(self, hpa, nbytes, handle):
        """May frames [hpa, hpa+nbytes) be mapped into guest `handle`?"""
        lo = hpa // PAGE
        hi = lo + nbytes // PAGE
        if lo < self.fw_hi and hi > self.fw_lo:
            return Status.FIRMWARE_PAGE
        if hi <= lo:
            return Status.SUCCESS
        if hi - lo <= _FEW or lo < 0 or hi > self.nframes:
            return self._check_assignable_slow(lo, hi, handle)
        s = self.state_buf[lo:hi]
        if s == _zeros(hi - lo):
            return Status.SUCCESS      # all HV: the common case
        bad = s.translate(_M_NOT_ASSIGNABLE).find(1)
        end = bad if bad >= 0 else hi - lo
        # PRIVATE frames before the first frame in another state: any of
        # another guest is the first refusal
        for a, b in _runs(s[:end], _M_EQ[F.PRIVATE]):
            if self._first_owner_diff(lo + a, b - a, handle) < b - a:
                return Status.BAD_OWNER
        if bad >= 0:
            return _REFUSAL[s[bad]]
        return Status.SUCCESS

    def _check_assignable_slow(self, lo, hi, handle):
        for pfn in range(lo, hi):
            st, h, _g = self.get(pfn)
            if st == F.HV or (st == F.PRIVATE and h == handle):
                continue
            return _REFUSAL[st]
        return Status.SUCCESS

    def check_all_in(self, hpa, nbytes, state, requester=None):
        """Every frame is in `state`; for guest states, owned by `requester`.

        The refusal names what the frame is instead: FIRMWARE_PAGE,
        TABLE_PAGE, BAD_OWNER (another guest's frame, when a guest asks),
        PAGE_OWNED (a mapped frame, when the platform asks), or
        BAD_PAGE_STATE for anything else."""
        lo = hpa // PAGE
        hi = lo + nbytes // PAGE
        if hi <= lo:
            return Status.SUCCESS
        if hi - lo <= _FEW or lo < 0 or hi > self.nframes or state not in _M_NE:
            return self._check_all_in_slow(lo, hi, state, requester)
        n = hi - lo
        s = self.state_buf[lo:hi]
        a, b = max(lo, self.fw_lo), min(hi, self.fw_hi)
        if a < b:                      # FW frames are a range, not listed: overlay them
            s = s[:a - lo] + bytes((F.FW,)) * (b - a) + s[b - lo:]
        if state in (F.HV, F.POOL, F.FW):
            if s == bytes((state,)) * n:
                return Status.SUCCESS
            k = s.translate(_M_NE[state]).find(1)
        else:
            i = s.translate(_M_NE[state]).find(1)
            if i < 0:
                i = n
            if requester is None:
                k = 0
            else:
                k = self._first_owner_diff(lo, i, requester)
            if k == n:
                return Status.SUCCESS
        return self._refuse_all_in(s[k], self.owner[lo + k], state, requester)

    @staticmethod
    def _refuse_all_in(st, h, state, requester):
        """The refusal for a frame (st, h) that is not in `state` for `requester`."""
        if st in (F.FW, F.TABLE, F.POOL):
            return _REFUSAL[st]
        if st in (F.PRIVATE, F.MAPPED) and requester is not None and h != requester:
            return Status.BAD_OWNER
        if st == F.MAPPED and requester is None:
            return Status.PAGE_OWNED
        return Status.BAD_PAGE_STATE

    def _check_all_in_slow(self, lo, hi, state, requester):
        for pfn in range(lo, hi):
            st, h, _g = self.get(pfn)
            if st == state and (state in (F.HV, F.POOL, F.FW) or h == requester):
                continue
            return self._refuse_all_in(st, h, state, requester)
        return Status.SUCCESS

    # -- commit (callers validated first) --------------------------------
    def set(self, pfn, state, handle=0, gpa=0):
        assert not (self.fw_lo <= pfn < self.fw_hi), "firmware frames never change state"
        assert 0 <= pfn < self.nframes, f"frame {pfn:#x} outside host memory"
        if state == F.HV:
            handle = gpa = 0
        self.states[pfn] = state
        self.owner[pfn] = handle
        self.gpa[pfn] = gpa

    def set_range(self, hpa, nbytes, state, handle=0, gpa=None):
        lo = hpa // PAGE
        n = nbytes // PAGE
        if n <= 0:
            return
        hi = lo + n
        assert not (lo < self.fw_hi and hi > self.fw_lo), "firmware frames never change state"
        assert 0 <= lo and hi <= self.nframes, f"frames {lo:#x}..{hi:#x} outside host memory"
        self.state_buf[lo:hi] = bytes((state,)) * n
        if state == F.HV:
            self.owner_buf[4 * lo:4 * hi] = bytes(4 * n)
            self.gpa_buf[8 * lo:8 * hi] = bytes(8 * n)
            return
        self.owner_buf[4 * lo:4 * hi] = _U32.pack(handle) * n
        if gpa is None:
            self.gpa_buf[8 * lo:8 * hi] = bytes(8 * n)
        elif n <= _GPA_RUN_CACHED:
            # gpa, gpa + PAGE, ... as one integer: no carry between the u64s
            # because each stays below 2**64
            ones, steps = _gpa_run(n)
            self.gpa_buf[8 * lo:8 * hi] = (gpa * ones + steps).to_bytes(8 * n, sys.byteorder)
        else:
            self.gpa[lo:hi] = array("Q", range(gpa, gpa + n * PAGE, PAGE))

    # -- invariants ------------------------------------------------------
    def check_invariants(self, live_handles):
        sb, ob, gb = self.state_buf, self.owner_buf, self.gpa_buf
        owner, gpa = self.owner, self.gpa
        nf = self.nframes
        seen = set()
        for c0 in range(0, nf, _CHUNK):
            c1 = min(c0 + _CHUNK, nf)
            n = c1 - c0
            sc = sb[c0:c1]
            if sc == _zeros(n):
                # all HV: no owner, no gpa (a memcmp per array, the common case)
                if ob[4 * c0:4 * c1] != _zeros(4 * n) or gb[8 * c0:8 * c1] != _zeros(8 * n):
                    self._hv_runs_clean(c0, sc)
                continue
            a, b = max(c0, self.fw_lo), min(c1, self.fw_hi)
            if a < b:
                i = sc[a - c0:b - c0].translate(_M_NONZERO).find(1)
                assert i < 0, f"firmware frame {a + i:#x} listed"
            i = sc.translate(_M_INVALID).find(1)
            assert i < 0, f"frame {c0 + i:#x} in invalid state {sc[i]}"
            self._hv_runs_clean(c0, sc)
            for a, b in _runs(sc, _M_NOT_MAPPED):
                a += c0
                b += c0
                if gb[8 * a:8 * b] != _zeros(8 * (b - a)):
                    pfn = next(a + k for k, g in enumerate(gpa[a:b]) if g)
                    raise AssertionError(f"frame {pfn:#x} in state {self.state(pfn).name} "
                                         f"has gpa {gpa[pfn]:#x}")
            for a, b in _runs(sc, _M_GUEST):
                a += c0
                b += c0
                dead = set(owner[a:b]).difference(live_handles)
                if dead:
                    pfn = next(a + k for k, h in enumerate(owner[a:b]) if h in dead)
                    raise AssertionError(f"frame {pfn:#x} owned by dead handle {owner[pfn]}")
            for a, b in _runs(sc, _M_EQ[F.MAPPED]):
                a += c0
                b += c0
                keys = list(zip(owner[a:b], gpa[a:b]))
                if len(set(keys)) == len(keys) and seen.isdisjoint(keys):
                    seen.update(keys)
                else:
                    for key in keys:
                        h, g = key
                        assert key not in seen, f"gpa {g:#x} of guest {h} mapped twice"
                        seen.add(key)

    def _hv_runs_clean(self, c0, sc):
        """HV and POOL frames of the chunk at c0 have owner 0 and gpa 0."""
        ob, gb = self.owner_buf, self.gpa_buf
        for a, b in _runs(sc, _M_HV_POOL):
            a += c0
            b += c0
            for buf, size, what in ((ob, 4, "owner"), (gb, 8, "gpa")):
                if buf[size * a:size * b] != _zeros(size * (b - a)):
                    vals = (self.owner if size == 4 else self.gpa)[a:b]
                    pfn = next(a + k for k, v in enumerate(vals) if v)
                    raise AssertionError(f"frame {pfn:#x} in state {self.state(pfn).name} "
                                         f"has {what} {vals[pfn - a]:#x}")


_REFUSAL = {
    F.FW: Status.FIRMWARE_PAGE,
    F.POOL: Status.TABLE_PAGE,
    F.TABLE: Status.TABLE_PAGE,
    F.VMSA: Status.BAD_PAGE_STATE,
    F.MAPPED: Status.PAGE_OWNED,
    F.PRIVATE: Status.BAD_OWNER,
}
