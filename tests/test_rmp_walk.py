"""The RMP check of the rmp protection design (nptcore/rmp.py, csrc/npt.c).

Definition (nptcore/rmp.py): after a nested translation gpa -> hpa through a
leaf at `level`, the entry of frame hpa >> 12 must equal
assigned | level << 1 | (gpa & ~0xFFF) | asid << 48; otherwise the walk is a
nested fault with PF_P | PF_RMP (| PF_SIZEM when only the size differs) and
sets no A/D bit. Unit tests against that definition on both engines, then
hypothesis differential tests: the C walks (single, batch, 2D) against the
pure-Python twin over the same random tables and RMPs.
"""
import mmap
import random
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nptcore import available_backends, get_engine
from nptcore.bits import (A, ACC_R, ACC_W, ACC_X, D, MODE_LONG4, P, PF_FINAL, PF_ID, PF_P,
                          PF_RMP, PF_SIZEM, PF_U, PF_W, PF_WALK, PS, U, W, K_NPF)
from nptcore.rmp import RmpView, decode_entry, rmp_check, rmp_entry

MEM = 16 << 20
NFRAMES = MEM >> 12
ROOT = 0x1000
SPARES = 0x100000
DATA = 0x800000
ASID = 7


def _param(name):
    marks = [] if name in available_backends() else [
        pytest.mark.skip(reason=f"{name} backend not built")]
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=[_param(b) for b in ("c", "python")])
def backend(request):
    return request.param


class Env:
    def __init__(self, backend):
        self.mem = mmap.mmap(-1, MEM)
        self.eng = get_engine(self.mem, backend)
        self.rmp_buf = bytearray(8 * NFRAMES)
        self.rmp = RmpView(self.rmp_buf, ASID)
        self.next_spare = SPARES

    def install(self, gpa, hpa, level=1, flags=None):
        flags = (P | U | W) | (PS if level == 2 else 0) if flags is None else flags
        rc, need = self.eng.tables_needed(ROOT, gpa, level)
        spares = [self.next_spare + 0x1000 * i for i in range(need)]
        self.next_spare += 0x1000 * need
        rc, n = self.eng.install(ROOT, gpa, hpa, level, flags, spares)
        assert rc == 0, rc

    def assign(self, hpa, gpa, level, asid=ASID, npages=1):
        for i in range(npages):
            struct.pack_into("<Q", self.rmp_buf, 8 * ((hpa >> 12) + i),
                             rmp_entry(asid, gpa + 0x1000 * i, level))

    def close(self):
        self.eng.close()


@pytest.fixture
def env(backend):
    e = Env(backend)
    yield e
    e.close()


def _err(access, bits):
    return (PF_U | PF_FINAL | PF_P | bits | (PF_W if access == ACC_W else 0)
            | (PF_ID if access == ACC_X else 0))


def test_entry_format_round_trips():
    e = rmp_entry(0x1234, 0x7654_3210_9000, 2)
    assert e == 1 | (2 << 1) | 0x7654_3210_9000 | (0x1234 << 48)
    assert decode_entry(e) == {"assigned": True, "level": 2, "gpa": 0x7654_3210_9000,
                               "asid": 0x1234}


@pytest.mark.parametrize("access", [ACC_R, ACC_W, ACC_X])
def test_matching_entry_translates_as_plain_walk(env, access):
    env.install(0x5000, DATA)
    env.assign(DATA, 0x5000, 1)
    r = env.eng.walk_rmp(ROOT, 0x5123, access, env.rmp, set_ad=False)
    assert r == env.eng.walk(ROOT, 0x5123, access, set_ad=False)
    assert r.ok and r.hpa == DATA + 0x123


@pytest.mark.parametrize("what,bits", [
    ("unassigned", PF_RMP), ("other_guest", PF_RMP), ("other_gpa", PF_RMP),
    ("size_2m", PF_RMP | PF_SIZEM), ("frame_past_rmp", PF_RMP)])
def test_mismatch_is_a_nested_fault_that_writes_nothing(env, what, bits):
    gpa, hpa = 0x5000, DATA
    env.install(gpa, hpa)
    if what == "other_guest":
        env.assign(hpa, gpa, 1, asid=ASID + 1)
    elif what == "other_gpa":
        env.assign(hpa, gpa + 0x1000, 1)
    elif what == "size_2m":
        env.assign(hpa, gpa, 2)
    rmp = env.rmp
    if what == "frame_past_rmp":
        env.assign(hpa, gpa, 1)
        rmp = RmpView(env.rmp_buf[:8 * (hpa >> 12)], ASID)      # hpa's frame not covered
    before = env.mem[:]
    r = env.eng.walk_rmp(ROOT, gpa, ACC_W, rmp)
    assert not r.ok and r.hpa == 0 and r.level == 1
    assert r.errcode == _err(ACC_W, bits)
    assert r.entry == env.eng.walk(ROOT, gpa, ACC_R, set_ad=False).entry
    assert env.mem[:] == before                       # no A/D set on the fault
    assert rmp_check(rmp.entries, ASID, hpa, gpa, 1) == bits


def test_asid_beyond_16_bits_never_matches(env):
    env.install(0x5000, DATA)
    env.assign(DATA, 0x5000, 1, asid=1)
    r = env.eng.walk_rmp(ROOT, 0x5000, ACC_R, RmpView(env.rmp_buf, 1 + (1 << 16)))
    assert not r.ok and r.errcode & PF_RMP


def test_2m_leaf_checks_the_accessed_frame(env):
    gpa, hpa = 0x4000_0000, 0xA00000
    env.install(gpa, hpa, level=2)
    env.assign(hpa, gpa, 2, npages=512)
    assert env.eng.walk_rmp(ROOT, gpa + 0x3_4567, ACC_R, env.rmp).hpa == hpa + 0x3_4567
    # one frame inside the 2 MiB page now says another GPA: only its accesses fault
    env.assign(hpa + 0x3_4000, gpa, 2)
    r = env.eng.walk_rmp(ROOT, gpa + 0x3_4567, ACC_R, env.rmp)
    assert not r.ok and r.level == 2 and r.errcode == _err(ACC_R, PF_RMP)
    assert env.eng.walk_rmp(ROOT, gpa + 0x3_5000, ACC_R, env.rmp).ok


def test_batch_stops_at_the_first_rmp_fault(env):
    for i in range(40):
        env.install(0x10000 + 0x1000 * i, DATA + 0x1000 * i)
        env.assign(DATA + 0x1000 * i, 0x10000 + 0x1000 * i, 1)
    env.assign(DATA + 0x1000 * 30, 0x10000, 1)        # frame 30 claims GPA 0x10000
    gpas = array("Q", [0x10000 + 0x1000 * i for i in range(40)])
    out = array("Q", bytes(8 * 40))
    k, miss = env.eng.walk_batch_rmp(ROOT, gpas, bytes(40), out, env.rmp)
    assert k == 30 and miss.errcode == _err(ACC_R, PF_RMP)
    assert list(out[:30]) == [DATA + 0x1000 * i for i in range(30)]


def test_2d_walk_checks_guest_table_reads(env):
    # guest 4-level table at GPA 0x100000.. identity-mapping va 0x200000
    gt = [0x100000 + 0x1000 * i for i in range(4)]
    for i, g in enumerate(gt + [0x200000]):
        env.install(g, DATA + 0x1000 * i)
        env.assign(DATA + 0x1000 * i, g, 1)
    for lvl in range(4):
        nxt = gt[lvl + 1] if lvl < 3 else 0x200000
        slot = (0x200000 >> (12 + 9 * (3 - lvl))) & 511
        struct.pack_into("<Q", env.mem, DATA + 0x1000 * lvl + 8 * slot, nxt | P | W | U)
    r = env.eng.walk2d_rmp(ROOT, gt[0], 0x200000, ACC_R, MODE_LONG4, env.rmp)
    assert r.ok and r.hpa == DATA + 0x4000
    env.assign(DATA + 0x2000, gt[2], 1, asid=ASID + 1)     # the guest's PD frame
    r = env.eng.walk2d_rmp(ROOT, gt[0], 0x200000, ACC_R, MODE_LONG4, env.rmp)
    assert not r.ok and r.kind == K_NPF and r.gpa == gt[2] + 8 * ((0x200000 >> 21) & 511)
    assert r.errcode & (PF_RMP | PF_WALK) == PF_RMP | PF_WALK and not r.errcode & PF_FINAL


# ---------------------------------------------------------------------------
# differential: C against Python on the same random tables and RMPs

needs_c = pytest.mark.skipif("c" not in available_backends(), reason="C backend not built")


def _build(seed, n, bad_ratio):
    """Two engines (C, Python) over copies of one random table, with one RMP."""
    rnd = random.Random(seed)
    envs = [Env("c"), Env("python")]
    maps = []
    used = set()
    for _ in range(n):
        if rnd.random() < 0.1:
            gpa = rnd.randrange(1, 64) << 21
            hpa = 0xA00000 if (gpa >> 21) % 2 else 0xC00000
            level = 2
        else:
            gpa = rnd.randrange(1, 1 << 14) << 12
            hpa = DATA + (rnd.randrange(0, 512) << 12)
            level = 1
        if (gpa >> 21) in used or gpa in used:
            continue
        used.add(gpa if level == 1 else gpa >> 21)
        used.add(gpa >> 21) if level == 2 else None
        flags = P | U | (W if rnd.random() < 0.8 else 0) | (A if rnd.random() < 0.5 else 0) \
            | (D if rnd.random() < 0.3 else 0) | (PS if level == 2 else 0)
        ok = all(e.eng.tables_needed(ROOT, gpa, level)[0] == 0 for e in envs)
        if not ok:
            continue
        for e in envs:
            e.install(gpa, hpa, level, flags)
        maps.append((gpa, hpa, level))
    rmp = bytearray(8 * NFRAMES)
    for gpa, hpa, level in maps:
        for i in range(512 if level == 2 else 1):
            r = rnd.random()
            g = gpa + 0x1000 * i
            if r < bad_ratio / 4:
                v = rmp_entry(ASID + 1, g, level)
            elif r < bad_ratio / 2:
                v = rmp_entry(ASID, g ^ 0x1000, level)
            elif r < 3 * bad_ratio / 4:
                v = rmp_entry(ASID, g, 3 - level)
            elif r < bad_ratio:
                v = 0
            else:
                v = rmp_entry(ASID, g, level)
            struct.pack_into("<Q", rmp, 8 * ((hpa >> 12) + i), v)
    for e in envs:
        e.rmp_buf[:] = rmp
    return rnd, envs, maps


def _gpas(rnd, maps, n):
    out = []
    for _ in range(n):
        if maps and rnd.random() < 0.9:
            gpa, _h, level = rnd.choice(maps)
            out.append(gpa + rnd.randrange(0, (1 << 21) if level == 2 else 4096))
        else:
            out.append(rnd.randrange(0, 1 << 27))
    return out


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32), n=st.integers(1, 120), bad=st.sampled_from([0.0, 0.02, 0.3]),
       nw=st.integers(1, 300), set_ad=st.booleans())
def test_batch_c_equals_python(seed, n, bad, nw, set_ad):
    rnd, envs, maps = _build(seed, n, bad)
    try:
        gpas = array("Q", _gpas(rnd, maps, nw))
        accs = bytes(rnd.choice((ACC_R, ACC_W, ACC_X)) for _ in range(nw))
        res = []
        for e in envs:
            out = array("Q", bytes(8 * nw))
            res.append((e.eng.walk_batch_rmp(ROOT, gpas, accs, out, e.rmp, set_ad), out.tolist()))
        (kc, mc), oc = res[0]
        (kp, mp), op = res[1]
        assert (kc, mc) == (kp, mp)
        assert oc[:kc] == op[:kp]
        assert envs[0].mem[:] == envs[1].mem[:]
        # the oracle, from the definition: the first GPA whose plain walk
        # fails or whose final frame's entry is not (ASID, GPA, level)
        want = nw
        for i, g in enumerate(gpas):
            r = envs[1].eng.walk(ROOT, g, accs[i], set_ad=False)
            if not r.ok or rmp_check(envs[1].rmp.entries, ASID, r.hpa, g, r.level):
                want = i
                break
        assert kc == want
    finally:
        for e in envs:
            e.close()


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32), n=st.integers(1, 60), bad=st.sampled_from([0.05, 0.4]))
def test_single_and_2d_c_equal_python(seed, n, bad):
    rnd, envs, maps = _build(seed, n, bad)
    try:
        for gpa in _gpas(rnd, maps, 40):
            acc = rnd.choice((ACC_R, ACC_W, ACC_X))
            a = [e.eng.walk_rmp(ROOT, gpa, acc, e.rmp) for e in envs]
            assert a[0] == a[1]
            # a 2D walk whose guest "tables" are whatever the mapped frames hold
            cr3 = rnd.choice(maps)[0] & ~0xFFF if maps else 0
            va = rnd.randrange(0, 1 << 48)
            b = [e.eng.walk2d_rmp(ROOT, cr3, va, acc, MODE_LONG4, e.rmp) for e in envs]
            assert b[0] == b[1]
        assert envs[0].mem[:] == envs[1].mem[:]
    finally:
        for e in envs:
            e.close()


@needs_c
@settings(max_examples=200, deadline=None)
@given(have=st.integers(0, (1 << 64) - 1) | st.builds(rmp_entry, st.integers(0, 0xFFFF),
                                                      st.integers(0, (1 << 48) - 1),
                                                      st.integers(1, 3)),
       asid=st.integers(0, 0x1FFFF), gpa=st.integers(0, (1 << 48) - 1), level=st.integers(1, 3),
       pfn=st.integers(0, 3))
def test_check_c_equals_python(have, asid, gpa, level, pfn):
    from nptcore.cengine import ffi, lib
    entries = array("Q", [have, 0, have ^ 6])
    view = RmpView(entries, asid)
    c = ffi.new("npt_rmp *")
    arr = ffi.from_buffer("uint64_t[]", entries)
    c.entries, c.nframes, c.asid = arr, 3, asid
    assert lib.npt_rmp_check(c, pfn << 12, gpa, level) == view.check(pfn << 12, gpa, level)
