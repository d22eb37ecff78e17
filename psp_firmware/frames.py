"""Per-frame ownership table (the PSP's PAMT), kept in PSP private memory.

Frame-state model
-----------------
Every 4 KiB host frame is in exactly one state. Frames the table does not
list are HV; the firmware region is FW by construction (a range, never
listed).

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

Invariants (asserted by `check_invariants`, used by the tests and fuzzers):
a frame has one state; a MAPPED frame is mapped by exactly one (handle, gpa);
FW frames are never listed; TABLE/VMSA/PRIVATE/MAPPED name a live handle.

What each state means for an HPA the VMM hands in (the order of the checks
is the validation order of DESIGN.md): FW -> FIRMWARE_PAGE, TABLE or POOL ->
TABLE_PAGE, VMSA -> BAD_PAGE_STATE, MAPPED -> PAGE_OWNED (aliasing),
PRIVATE of another guest -> BAD_OWNER; HV or PRIVATE of the same guest is
accepted.
"""
from enum import IntEnum

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


class FrameTable:
    def __init__(self, host_size, fw_base, fw_size):
        self.host_size = host_size
        self.nframes = host_size // PAGE
        self.fw_lo = fw_base // PAGE
        self.fw_hi = (fw_base + fw_size) // PAGE
        self._f = {}            # pfn -> (state, handle, gpa); absent == HV

    # -- reading ---------------------------------------------------------
    def get(self, pfn):
        if self.fw_lo <= pfn < self.fw_hi:
            return (F.FW, 0, 0)
        return self._f.get(pfn, _HV)

    def state(self, pfn):
        return self.get(pfn)[0]

    def counts(self):
        out = {s.name: 0 for s in F}
        for st, _h, _g in self._f.values():
            out[F(st).name] += 1
        out["FW"] = self.fw_hi - self.fw_lo
        out["HV"] = self.nframes - out["FW"] - len(self._f)
        return out

    def frames_of(self, handle):
        return [pfn for pfn, (st, h, _g) in self._f.items()
                if h == handle and st in (F.TABLE, F.VMSA, F.PRIVATE, F.MAPPED)]

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

    def check_assignable(self, hpa, nbytes, handle):
        """May frames [hpa, hpa+nbytes) be mapped into guest `handle`?"""
        lo = hpa // PAGE
        hi = lo + nbytes // PAGE
        if lo < self.fw_hi and hi > self.fw_lo:
            return Status.FIRMWARE_PAGE
        get = self._f.get
        for pfn in range(lo, hi):
            ent = get(pfn)
            if ent is None:
                continue
            st, h, _g = ent
            if st == F.PRIVATE and h == handle:
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
        for pfn in range(lo, lo + nbytes // PAGE):
            st, h, _g = self.get(pfn)
            if st == state and (state in (F.HV, F.POOL, F.FW) or h == requester):
                continue
            if st in (F.FW, F.TABLE, F.POOL):
                return _REFUSAL[st]
            if st in (F.PRIVATE, F.MAPPED) and requester is not None and h != requester:
                return Status.BAD_OWNER
            if st == F.MAPPED and requester is None:
                return Status.PAGE_OWNED
            return Status.BAD_PAGE_STATE
        return Status.SUCCESS

    # -- commit (callers validated first) --------------------------------
    def set(self, pfn, state, handle=0, gpa=0):
        assert not (self.fw_lo <= pfn < self.fw_hi), "firmware frames never change state"
        if state == F.HV:
            self._f.pop(pfn, None)
        else:
            self._f[pfn] = (state, handle, gpa)

    def set_range(self, hpa, nbytes, state, handle=0, gpa=None):
        lo = hpa // PAGE
        n = nbytes // PAGE
        if n <= 0:
            return
        hi = lo + n
        assert not (lo < self.fw_hi and hi > self.fw_lo), "firmware frames never change state"
        f = self._f
        if state == F.HV:
            for pfn in range(lo, hi):
                f.pop(pfn, None)
        elif gpa is None:
            f.update(dict.fromkeys(range(lo, hi), (state, handle, 0)))
        else:
            f.update(zip(range(lo, hi), [(state, handle, gpa + i * PAGE) for i in range(n)]))

    # -- invariants ------------------------------------------------------
    def check_invariants(self, live_handles):
        seen = {}
        for pfn, (st, h, g) in self._f.items():
            assert 0 <= pfn < self.nframes, f"frame {pfn:#x} outside host memory"
            assert not (self.fw_lo <= pfn < self.fw_hi), f"firmware frame {pfn:#x} listed"
            assert st != F.HV, "HV frames are never listed"
            if st in (F.TABLE, F.VMSA, F.PRIVATE, F.MAPPED):
                assert h in live_handles, f"frame {pfn:#x} owned by dead handle {h}"
            if st == F.MAPPED:
                key = (h, g)
                assert key not in seen, f"gpa {g:#x} of guest {h} mapped twice"
                seen[key] = pfn


_REFUSAL = {
    F.FW: Status.FIRMWARE_PAGE,
    F.POOL: Status.TABLE_PAGE,
    F.TABLE: Status.TABLE_PAGE,
    F.VMSA: Status.BAD_PAGE_STATE,
    F.MAPPED: Status.PAGE_OWNED,
    F.PRIVATE: Status.BAD_OWNER,
}
