"""The PSP's frame table (psp_firmware/frames.py): array-backed, same semantics
as the dict it replaced (kept below as the reference model)."""
import gc
import os
import struct
import sys
import weakref
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psp_firmware import frames as frames_mod
from psp_firmware.frames import PAGE, F, FrameTable
from psp_firmware.status import Status

GUEST = (F.TABLE, F.VMSA, F.PRIVATE, F.MAPPED)


# ----------------------------------------------------------------------------
# reference model: the dict-based table (pfn -> (state, handle, gpa); absent == HV)
class RefTable:
    REFUSAL = {F.FW: Status.FIRMWARE_PAGE, F.POOL: Status.TABLE_PAGE,
               F.TABLE: Status.TABLE_PAGE, F.VMSA: Status.BAD_PAGE_STATE,
               F.MAPPED: Status.PAGE_OWNED, F.PRIVATE: Status.BAD_OWNER}

    def __init__(self, host_size, fw_base, fw_size):
        self.nframes = host_size // PAGE
        self.fw_lo, self.fw_hi = fw_base // PAGE, (fw_base + fw_size) // PAGE
        self.f = {}

    def get(self, pfn):
        if self.fw_lo <= pfn < self.fw_hi:
            return (F.FW, 0, 0)
        return self.f.get(pfn, (F.HV, 0, 0))

    def counts(self):
        out = {s.name: 0 for s in F}
        for st_, _h, _g in self.f.values():
            out[F(st_).name] += 1
        out["FW"] = self.fw_hi - self.fw_lo
        out["HV"] = self.nframes - out["FW"] - len(self.f)
        return out

    def frames_of(self, handle):
        return sorted(p for p, (s, h, _g) in self.f.items() if h == handle and s in GUEST)

    def check_assignable(self, hpa, nbytes, handle):
        lo = hpa // PAGE
        hi = lo + nbytes // PAGE
        if lo < self.fw_hi and hi > self.fw_lo:
            return Status.FIRMWARE_PAGE
        for pfn in range(lo, hi):
            s, h, _g = self.get(pfn)
            if s == F.HV or (s == F.PRIVATE and h == handle):
                continue
            return self.REFUSAL[s]
        return Status.SUCCESS

    def check_all_in(self, hpa, nbytes, state, requester=None):
        lo = hpa // PAGE
        for pfn in range(lo, lo + nbytes // PAGE):
            s, h, _g = self.get(pfn)
            if s == state and (state in (F.HV, F.POOL, F.FW) or h == requester):
                continue
            if s in (F.FW, F.TABLE, F.POOL):
                return self.REFUSAL[s]
            if s in (F.PRIVATE, F.MAPPED) and requester is not None and h != requester:
                return Status.BAD_OWNER
            if s == F.MAPPED and requester is None:
                return Status.PAGE_OWNED
            return Status.BAD_PAGE_STATE
        return Status.SUCCESS

    def set(self, pfn, state, handle=0, gpa=0):
        if state == F.HV:
            self.f.pop(pfn, None)
        else:
            self.f[pfn] = (state, handle, gpa)

    def set_range(self, hpa, nbytes, state, handle=0, gpa=None):
        lo = hpa // PAGE
        for i in range(nbytes // PAGE):
            self.set(lo + i, state, handle, 0 if gpa is None else gpa + i * PAGE)

    def invariants_hold(self, live):
        seen = set()
        for pfn, (s, h, g) in self.f.items():
            if self.fw_lo <= pfn < self.fw_hi or s not in (F.POOL,) + GUEST:
                return False
            if s in GUEST and h not in live:
                return False
            if (s == F.POOL and h) or (s != F.MAPPED and g):
                return False
            if s == F.MAPPED:
                if (h, g) in seen:
                    return False
                seen.add((h, g))
        return True


def _invariants_hold(ft, live):
    try:
        ft.check_invariants(live)
    except AssertionError:
        return False
    return True


# ----------------------------------------------------------------------------
# layout and lifetime
def test_layout_is_flat_native_arrays():
    ft = FrameTable(64 * PAGE, 8 * PAGE, 4 * PAGE)
    assert (len(ft.state_buf), len(ft.owner_buf), len(ft.gpa_buf)) == (64, 256, 512)
    assert (ft.states.format, ft.owner.format, ft.gpa.format) == ("B", "I", "Q")
    assert len(ft.states) == len(ft.owner) == len(ft.gpa) == 64
    assert ft.state_buf[:] == bytes(64)          # FW frames are not listed either
    ft.set(3, F.MAPPED, 0x01020304, 0x1122_3344_5566_7000)
    assert ft.state_buf[3] == F.MAPPED
    assert struct.unpack_from("=I", ft.owner_buf, 4 * 3)[0] == 0x01020304
    assert struct.unpack_from("=Q", ft.gpa_buf, 8 * 3)[0] == 0x1122_3344_5566_7000
    if sys.byteorder == "little":
        assert ft.owner_buf[12:16] == bytes([4, 3, 2, 1])
    # writes through the buffers (as the C side does) are what the methods read
    ft.state_buf[5] = F.PRIVATE
    struct.pack_into("=I", ft.owner_buf, 4 * 5, 9)
    assert ft.get(5) == (F.PRIVATE, 9, 0)
    ft.close()


def test_close_is_idempotent_and_optional():
    ft = FrameTable(16 * PAGE, 0, PAGE)
    ft.set_range(4 * PAGE, 4 * PAGE, F.POOL)
    ft.close()
    ft.close()
    assert ft.states is None and ft.owner is None and ft.gpa is None
    assert ft.state_buf.closed and ft.owner_buf.closed and ft.gpa_buf.closed
    # never closed: collected with everything it maps
    ft2 = FrameTable(16 * PAGE, 0, PAGE)
    ft2.set(3, F.VMSA, 1)
    ref = weakref.ref(ft2)
    del ft2
    gc.collect()
    assert ref() is None


def test_empty_host():
    ft = FrameTable(0, 0, 0)
    assert ft.nframes == 0 and len(ft.states) == 0
    assert ft.counts()["HV"] == 0 and ft.snapshot() == {} and ft.frames_of(1) == []
    ft.check_invariants(set())
    ft.close()


def _rss_kib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_huge_host_costs_only_the_touched_frames():
    host = 64 << 30                                  # 16M frames
    warm = FrameTable(1 << 24, 0, PAGE)              # warm caches and allocators first
    warm.set_range(64 * PAGE, 512 * PAGE, F.MAPPED, 1, 0)
    warm.check_assignable(1024 * PAGE, 512 * PAGE, 1)
    warm.close()
    gc.collect()
    before = _rss_kib()
    if before is None:
        pytest.skip("no VmRSS in /proc/self/status")
    ft = FrameTable(host, 1 << 20, 1 << 20)
    assert ft.nframes == 1 << 24
    ft.set(5, F.VMSA, 1)
    ft.set_range(40 << 30, 512 * PAGE, F.MAPPED, 1, 0x4000_0000)
    ft.set_range(63 << 30, 512 * PAGE, F.PRIVATE, 1)
    ft.set_range(host - 2 * PAGE, 2 * PAGE, F.POOL)
    assert ft.check_assignable(50 << 30, 512 * PAGE, 1) == Status.SUCCESS
    assert ft.check_assignable(63 << 30, 512 * PAGE, 1) == Status.SUCCESS
    assert ft.check_all_in(40 << 30, 512 * PAGE, F.MAPPED, requester=1) == Status.SUCCESS
    assert ft.get((40 << 30) // PAGE + 3) == (F.MAPPED, 1, 0x4000_0000 + 3 * PAGE)
    # whole-table scans read never-written pages: those must not cost memory
    c = ft.counts()
    assert (c["VMSA"], c["MAPPED"], c["PRIVATE"], c["POOL"], c["FW"]) == (1, 512, 512, 2, 256)
    assert c["HV"] == (1 << 24) - 256 - 1027
    assert len(ft.frames_of(1)) == 1025 and len(ft.snapshot()) == 1027
    ft.check_invariants({1})
    grown = _rss_kib() - before
    assert grown < 8 << 10, f"RSS grew by {grown} KiB"
    ft.close()


# ----------------------------------------------------------------------------
# the state machine
def test_state_machine_through_set_and_set_range():
    ft = FrameTable(64 * PAGE, 8 * PAGE, 4 * PAGE)
    h = 7
    assert ft.get(0) == (F.HV, 0, 0) and ft.state(9) == F.FW and ft.get(9) == (F.FW, 0, 0)
    assert ft.get(-1) == (F.HV, 0, 0) and ft.get(64) == (F.HV, 0, 0)   # outside: HV, as before
    ft.set_range(16 * PAGE, 4 * PAGE, F.POOL)                           # POOL_ADD
    assert [ft.state(p) for p in range(15, 21)] == [F.HV] + [F.POOL] * 4 + [F.HV]
    ft.set(16, F.TABLE, h)                                              # table page taken
    ft.set(30, F.VMSA, h)                                               # LAUNCH_START
    ft.set_range(32 * PAGE, 8 * PAGE, F.PRIVATE, h)                     # SET_PRIVATE_MEMORY
    ft.set_range(32 * PAGE, 2 * PAGE, F.MAPPED, h, 0x10_0000)           # UPDATE_NPT (PRIVATE)
    ft.set_range(44 * PAGE, 3 * PAGE, F.MAPPED, h, 0x20_0000)           # UPDATE_NPT (HV)
    assert ft.get(16) == (F.TABLE, h, 0)
    assert ft.get(30) == (F.VMSA, h, 0)
    assert ft.get(33) == (F.MAPPED, h, 0x10_1000)
    assert ft.get(34) == (F.PRIVATE, h, 0)
    assert [ft.get(p)[2] for p in range(44, 47)] == [0x20_0000, 0x20_1000, 0x20_2000]
    assert all(type(s) is F for s, _h, _g in ft.snapshot().values())
    assert ft.counts() == {"HV": 64 - 4 - 16, "FW": 4, "POOL": 3, "TABLE": 1, "VMSA": 1,
                           "PRIVATE": 6, "MAPPED": 5}
    assert ft.frames_of(h) == [16, 30] + list(range(32, 40)) + [44, 45, 46]
    assert ft.frames_of(h + 1) == [] and ft.frames_of(0) == []
    ft.check_invariants({h})
    ft.set_range(44 * PAGE, 1 * PAGE, F.PRIVATE, h)                     # UNMAP
    assert ft.get(44) == (F.PRIVATE, h, 0)
    ft.set_range(36 * PAGE, 4 * PAGE, F.HV)                             # RECLAIM
    assert ft.get(37) == (F.HV, 0, 0)
    for pfn in ft.frames_of(h):                                         # DECOMMISSION
        ft.set(pfn, F.POOL if ft.state(pfn) == F.TABLE else F.HV)
    assert ft.snapshot() == {p: (F.POOL, 0, 0) for p in range(16, 20)}
    assert ft.owner_buf[:] == bytes(4 * 64) and ft.gpa_buf[:] == bytes(8 * 64)
    ft.check_invariants(set())
    with pytest.raises(AssertionError):
        ft.set(8, F.POOL)
    with pytest.raises(AssertionError):
        ft.set_range(4 * PAGE, 5 * PAGE, F.POOL)
    ft.set_range(20 * PAGE, PAGE - 1, F.POOL)                           # less than a frame
    assert ft.state(20) == F.HV


def test_check_range():
    ft = FrameTable(64 * PAGE, 0, PAGE)
    assert ft.check_range(PAGE, PAGE) == Status.SUCCESS
    assert ft.check_range(PAGE + 1, PAGE) == Status.MISALIGNED
    assert ft.check_range(PAGE, 0) == Status.INVALID_PARAM
    assert ft.check_range(PAGE, (1 << 64)) == Status.RANGE_OVERFLOW
    assert ft.check_range(63 * PAGE, 2 * PAGE) == Status.OUT_OF_RANGE
    assert ft.check_range(64 * PAGE, PAGE) == Status.OUT_OF_RANGE


# ----------------------------------------------------------------------------
# refusal codes, at the boundaries of the range
LO, HI = 20, 30            # the range checked: frames [20, 30)
ME, OTHER = 1, 2

# kind -> (setup, check_assignable(ME), check_all_in(HV, ME), check_all_in(HV, None))
KINDS = {
    "pool": (lambda ft, p: ft.set(p, F.POOL), Status.TABLE_PAGE, Status.TABLE_PAGE, Status.TABLE_PAGE),
    "table": (lambda ft, p: ft.set(p, F.TABLE, OTHER), Status.TABLE_PAGE, Status.TABLE_PAGE,
              Status.TABLE_PAGE),
    "my_table": (lambda ft, p: ft.set(p, F.TABLE, ME), Status.TABLE_PAGE, Status.TABLE_PAGE,
                 Status.TABLE_PAGE),
    "vmsa": (lambda ft, p: ft.set(p, F.VMSA, OTHER), Status.BAD_PAGE_STATE, Status.BAD_PAGE_STATE,
             Status.BAD_PAGE_STATE),
    "mapped": (lambda ft, p: ft.set(p, F.MAPPED, OTHER, 0x5000), Status.PAGE_OWNED, Status.BAD_OWNER,
               Status.PAGE_OWNED),
    "my_mapped": (lambda ft, p: ft.set(p, F.MAPPED, ME, 0x5000), Status.PAGE_OWNED,
                  Status.BAD_PAGE_STATE, Status.PAGE_OWNED),
    "private": (lambda ft, p: ft.set(p, F.PRIVATE, OTHER), Status.BAD_OWNER, Status.BAD_OWNER,
                Status.BAD_PAGE_STATE),
    "my_private": (lambda ft, p: ft.set(p, F.PRIVATE, ME), Status.SUCCESS, Status.BAD_PAGE_STATE,
                   Status.BAD_PAGE_STATE),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("where", [LO, HI - 1, LO + 4])
@pytest.mark.parametrize("width", ["one", "range"])
def test_refusals_inside_the_range(kind, where, width):
    setup, assign, hv_me, hv_platform = KINDS[kind]
    lo, hi = (where, where + 1) if width == "one" else (LO, HI)
    ft = FrameTable(64 * PAGE, 8 * PAGE, 4 * PAGE)
    setup(ft, where)
    args = (lo * PAGE, (hi - lo) * PAGE)
    assert ft.check_assignable(*args, ME) == assign
    assert ft.check_all_in(*args, F.HV, requester=ME) == hv_me
    assert ft.check_all_in(*args, F.HV) == hv_platform


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("where", [LO - 1, HI])
def test_frames_just_outside_the_range_do_not_matter(kind, where):
    ft = FrameTable(64 * PAGE, 8 * PAGE, 4 * PAGE)
    KINDS[kind][0](ft, where)
    args = (LO * PAGE, (HI - LO) * PAGE)
    assert ft.check_assignable(*args, ME) == Status.SUCCESS
    assert ft.check_all_in(*args, F.HV, requester=ME) == Status.SUCCESS
    assert ft.check_all_in(*args, F.HV) == Status.SUCCESS


@pytest.mark.parametrize("lo,hi,hits", [
    (0, 9, True), (0, 8, False), (11, 20, True), (12, 20, False), (8, 12, True),
    (9, 10, True), (7, 8, False), (12, 13, False), (0, 64, True)])
def test_firmware_frames_at_the_boundaries(lo, hi, hits):
    ft = FrameTable(64 * PAGE, 8 * PAGE, 4 * PAGE)                       # FW = [8, 12)
    args = (lo * PAGE, (hi - lo) * PAGE)
    want = Status.FIRMWARE_PAGE if hits else Status.SUCCESS
    assert ft.check_assignable(*args, ME) == want
    assert ft.check_all_in(*args, F.HV, requester=ME) == want
    assert ft.check_all_in(*args, F.HV) == want
    if lo >= 8 and hi <= 12:
        assert ft.check_all_in(*args, F.FW) == Status.SUCCESS


def test_first_bad_frame_names_the_refusal():
    ft = FrameTable(64 * PAGE, 8 * PAGE, 4 * PAGE)
    ft.set(21, F.PRIVATE, OTHER)
    ft.set(22, F.POOL)
    assert ft.check_assignable(20 * PAGE, 10 * PAGE, ME) == Status.BAD_OWNER
    assert ft.check_all_in(20 * PAGE, 10 * PAGE, F.HV, requester=ME) == Status.BAD_OWNER
    ft.set(20, F.VMSA, OTHER)
    assert ft.check_assignable(20 * PAGE, 10 * PAGE, ME) == Status.BAD_PAGE_STATE
    # check_assignable refuses firmware before looking at any frame
    assert ft.check_assignable(11 * PAGE, 19 * PAGE, ME) == Status.FIRMWARE_PAGE
    # check_all_in goes in frame order: a bad frame before the firmware wins
    ft.set(6, F.MAPPED, OTHER, 0)
    assert ft.check_all_in(0, 12 * PAGE, F.HV) == Status.PAGE_OWNED
    assert ft.check_all_in(7 * PAGE, 5 * PAGE, F.HV) == Status.FIRMWARE_PAGE


def test_guest_state_ranges_check_every_owner():
    ft = FrameTable(4096 * PAGE, 0, PAGE)
    ft.set_range(100 * PAGE, 1000 * PAGE, F.PRIVATE, ME)
    assert ft.check_all_in(100 * PAGE, 1000 * PAGE, F.PRIVATE, requester=ME) == Status.SUCCESS
    assert ft.check_assignable(100 * PAGE, 1000 * PAGE, ME) == Status.SUCCESS
    for bad in (100, 101, 577, 1098, 1099):
        ft.set(bad, F.PRIVATE, OTHER)
        assert ft.check_all_in(100 * PAGE, 1000 * PAGE, F.PRIVATE, requester=ME) == Status.BAD_OWNER
        assert ft.check_all_in(100 * PAGE, 1000 * PAGE, F.PRIVATE) == Status.BAD_PAGE_STATE
        assert ft.check_assignable(100 * PAGE, 1000 * PAGE, ME) == Status.BAD_OWNER
        assert ft.check_assignable(100 * PAGE, 1000 * PAGE, OTHER) == Status.BAD_OWNER
        ft.set(bad, F.PRIVATE, ME)
    ft.set(1099, F.MAPPED, ME, 0)
    assert ft.check_all_in(100 * PAGE, 1000 * PAGE, F.PRIVATE, requester=ME) == Status.BAD_PAGE_STATE
    assert ft.check_assignable(100 * PAGE, 1000 * PAGE, ME) == Status.PAGE_OWNED


# ----------------------------------------------------------------------------
# invariants
@pytest.mark.parametrize("corrupt,msg", [
    (lambda ft: ft.set(20, F.TABLE, 9), "dead handle"),
    (lambda ft: (ft.set(20, F.MAPPED, 1, 0x1000), ft.set(40, F.MAPPED, 1, 0x1000)), "mapped twice"),
    (lambda ft: ft.state_buf.__setitem__(9, F.POOL), "firmware frame"),
    (lambda ft: ft.state_buf.__setitem__(30, 1), "invalid state"),
    (lambda ft: ft.state_buf.__setitem__(30, 9), "invalid state"),
    (lambda ft: ft.owner.__setitem__(31, 1), "has owner"),
    (lambda ft: ft.gpa.__setitem__(60, PAGE), "has gpa"),
    (lambda ft: ft.set(20, F.POOL, 1), "has owner"),
    (lambda ft: ft.set(20, F.PRIVATE, 1, PAGE), "has gpa"),
    (lambda ft: ft.set_range(20 * PAGE, 1 * PAGE, F.VMSA, 1, 0), None),
    (lambda ft: ft.set_range(20 * PAGE, 2 * PAGE, F.VMSA, 1, 0), "has gpa"),   # 0, PAGE
])
@pytest.mark.parametrize("chunk", [3, 1 << 16])
def test_invariant_violations_are_caught(corrupt, msg, chunk):
    with mock.patch.object(frames_mod, "_CHUNK", chunk):
        ft = FrameTable(64 * PAGE, 8 * PAGE, 4 * PAGE)
        ft.set_range(16 * PAGE, 2 * PAGE, F.POOL)
        ft.set_range(50 * PAGE, 4 * PAGE, F.MAPPED, 1, 0x10_0000)
        ft.check_invariants({1})
        corrupt(ft)
        if msg is None:          # a gpa of 0: nothing wrong
            ft.check_invariants({1})
            return
        with pytest.raises(AssertionError, match=msg):
            ft.check_invariants({1})


# ----------------------------------------------------------------------------
# differential: random operation sequences against the dict model
NF, FW_LO, FW_HI = 40, 16, 20
HANDLES = [0, 1, 2, 3, (1 << 32) - 1]
GPAS = [0, PAGE, 2 * PAGE, 5 * PAGE, 0x7FFF_FFFF_F000]
states = st.sampled_from(list(F))
handles = st.sampled_from(HANDLES)
free_pfns = st.integers(0, NF - 1).filter(lambda p: not FW_LO <= p < FW_HI)
hpas = st.one_of(st.integers(-3, NF + 3).map(lambda p: p * PAGE),
                 st.integers(-3 * PAGE, (NF + 3) * PAGE))
lengths = st.one_of(st.integers(0, NF + 4).map(lambda n: n * PAGE),
                    st.integers(-PAGE, (NF + 4) * PAGE))


@st.composite
def free_ranges(draw, segments=((0, FW_LO), (FW_HI, NF))):
    """(hpa, nbytes) inside one of `segments` (frame ranges), sometimes unaligned."""
    seg_lo, seg_hi = draw(st.sampled_from(segments))
    lo = draw(st.integers(seg_lo, seg_hi - 1))
    n = draw(st.integers(0, seg_hi - lo))
    return lo * PAGE + draw(st.sampled_from([0, 0, 5])), n * PAGE + draw(st.sampled_from([0, 0, 7]))


# ranges to check: mostly clear of the firmware, some across it, some wild
check_ranges = st.one_of(free_ranges(), free_ranges(), free_ranges(), free_ranges(((0, NF),)),
                         st.tuples(hpas, lengths))

ops = st.one_of(
    st.tuples(st.just("set"), free_pfns, states, handles, st.sampled_from(GPAS)),
    st.tuples(st.just("set_range"), free_ranges(), states, handles,
              st.one_of(st.none(), st.sampled_from(GPAS))),
    st.tuples(st.just("set_range"), free_ranges(), st.sampled_from([F.PRIVATE, F.MAPPED]),
              st.sampled_from([1, 2]), st.one_of(st.none(), st.sampled_from(GPAS))),
    st.tuples(st.just("assign"), check_ranges, st.one_of(handles, st.none())),
    st.tuples(st.just("all_in"), check_ranges, states, st.one_of(handles, st.none())),
    st.tuples(st.just("all_in"), check_ranges, st.sampled_from(GUEST), st.sampled_from([1, 2])),
    st.tuples(st.just("frames_of"), st.one_of(handles, st.just(-1))),
    st.tuples(st.just("inv"), st.frozensets(handles)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.lists(ops, max_size=40), chunk=st.sampled_from([3, 8, 1 << 16]))
def test_differential_against_dict_model(seq, chunk):
    with mock.patch.object(frames_mod, "_CHUNK", chunk):
        ref = RefTable(NF * PAGE, FW_LO * PAGE, (FW_HI - FW_LO) * PAGE)
        ft = FrameTable(NF * PAGE, FW_LO * PAGE, (FW_HI - FW_LO) * PAGE)
        for op in seq:
            kind = op[0]
            if kind == "set":
                _, pfn, s, h, g = op
                ref.set(pfn, s, h, g)
                ft.set(pfn, s, h, g)
            elif kind == "set_range":
                _, (hpa, nbytes), s, h, g = op
                ref.set_range(hpa, nbytes, s, h, g)
                ft.set_range(hpa, nbytes, s, h, g)
            elif kind == "assign":
                _, (hpa, nbytes), h = op
                assert ft.check_assignable(hpa, nbytes, h) == ref.check_assignable(hpa, nbytes, h), op
            elif kind == "all_in":
                _, (hpa, nbytes), s, h = op
                assert (ft.check_all_in(hpa, nbytes, s, requester=h)
                        == ref.check_all_in(hpa, nbytes, s, requester=h)), op
            elif kind == "frames_of":
                assert ft.frames_of(op[1]) == ref.frames_of(op[1])
            elif kind == "inv":
                assert _invariants_hold(ft, op[1]) == ref.invariants_hold(op[1]), (op, ref.f)
            assert ft.snapshot() == ref.f
            assert ft.counts() == ref.counts()
            assert [ft.get(p) for p in range(-2, NF + 2)] == [ref.get(p) for p in range(-2, NF + 2)]
            assert [ft.state(p) for p in range(NF)] == [ref.get(p)[0] for p in range(NF)]
        ft.close()


def test_first_owner_difference_is_exact():
    ft = FrameTable(300 * PAGE, 0, 0)
    ft.set_range(0, 300 * PAGE, F.PRIVATE, ME)
    for n in (1, 2, 3, 7, 64, 299):
        assert ft._first_owner_diff(1, n, ME) == n
        assert ft._first_owner_diff(1, n, OTHER) == 0
        assert ft._first_owner_diff(1, n, None) == 0
        for bad in sorted({0, 1, n // 2, n - 2, n - 1} - {-1}):
            if 0 <= bad < n:
                ft.set(1 + bad, F.PRIVATE, OTHER)
                assert ft._first_owner_diff(1, n, ME) == bad
                ft.set(1 + bad, F.PRIVATE, ME)
