"""The firmware of each protection design (psp_firmware/designs.py): the
commands each answers, the validation its mapping command shares with
UPDATE_NPT, the rmp design's RMP state model against an oracle of its own
(random command sequences), the isolated design's own frames."""
import mmap
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nptcore.bits import A, D, P
from nptcore.rmp import rmp_entry
from psp_firmware import Cmd, Status, encode, make_psp
from psp_firmware.commands import _IN, decode_out
from psp_firmware.frames import F
from psp_firmware.protect import COMMANDS, DESIGNS

M = 64 << 20
FW = 4 << 20
REGION = 8 << 20
PAGE = 4096
MB2 = 2 << 20


def _psp(design, **kw):
    mem = mmap.mmap(-1, M, flags=mmap.MAP_SHARED)
    if design == "isolated":
        kw.setdefault("iso", (M - FW - REGION, REGION))
    p = make_psp(mem, protect=design, **kw)
    p.test_mem = mem
    return p


def box(p, cmd, **f):
    st, out = p.mailbox(int(cmd), encode(cmd, **f))
    return Status(st), decode_out(cmd, out, st)


def _platform(p, design):
    assert box(p, Cmd.PLATFORM_INIT, host_size=M, fw_base=M - FW, fw_size=FW)[0] == Status.SUCCESS
    if design == "digest":
        assert box(p, Cmd.POOL_ADD, hpa=1 << 20, npages=64)[0] == Status.SUCCESS


def _launch(p, design, vmsa):
    st, f = box(p, Cmd.LAUNCH_START, vmsa_hpa=0 if design == "isolated" else vmsa, policy=0)
    assert st == Status.SUCCESS
    return f["handle"]


def _map(p, design, h, gpa, hpa, level=1, npages=1):
    if design == "rmp":
        return box(p, Cmd.RMP_ASSIGN, handle=h, level=level, gpa=gpa, hpa=hpa, npages=npages)[0]
    return box(p, Cmd.UPDATE_NPT, handle=h, level=level, gpa=gpa, hpa=hpa, attrs=3,
               npages=npages)[0]


@pytest.mark.parametrize("design", DESIGNS)
def test_each_design_answers_its_commands_only(design):
    p = _psp(design)
    for cmd in Cmd:
        buf = bytes(struct.calcsize(_IN[cmd][0]))
        st, _ = p.mailbox(int(cmd), buf)
        if cmd not in COMMANDS[design]:
            assert st == Status.INVALID_COMMAND, cmd.name
        else:
            assert st != Status.INVALID_COMMAND, cmd.name


@pytest.mark.parametrize("design", ["digest", "isolated", "rmp"])
def test_mapping_command_refuses_what_update_npt_refuses(design):
    """UPDATE_NPT (digest, isolated) and RMP_ASSIGN (rmp) validate an HPA the
    same way, in the same order, and a refusal changes nothing."""
    p = _psp(design)
    _platform(p, design)
    v = _launch(p, design, 2 << 20)
    o = _launch(p, design, (2 << 20) + PAGE)
    assert _map(p, design, o, 0x100000, 8 << 20) == Status.SUCCESS
    assert box(p, Cmd.SET_PRIVATE_MEMORY, handle=o, hpa=9 << 20, npages=1)[0] == Status.SUCCESS
    fw = M - FW
    o_vmsa = box(p, Cmd.GUEST_STATUS, handle=o)[1]["vmsa"]
    cases = [
        (0x200000, fw, 1, 1, Status.FIRMWARE_PAGE),
        (0x200000, fw - PAGE, 1, 2, Status.FIRMWARE_PAGE),
        (0x200000, M, 1, 1, Status.OUT_OF_RANGE),
        (0x200000, (10 << 20) + 8, 1, 1, Status.MISALIGNED),
        (0x200000 + 16, 10 << 20, 1, 1, Status.MISALIGNED),
        (0x200000, 8 << 20, 1, 1, Status.PAGE_OWNED),           # the other guest's page
        (0x200000, 9 << 20, 1, 1, Status.BAD_OWNER),            # its private memory
        (0x200000, o_vmsa, 1, 1, Status.BAD_PAGE_STATE),        # its control page
        (0x200000, 10 << 20, 1, 0, Status.INVALID_PARAM),
        (0x200000, (1 << 64) - PAGE, 1, 2, Status.RANGE_OVERFLOW),
        ((1 << 48) - PAGE, 10 << 20, 1, 2, Status.RANGE_OVERFLOW),
        (0x400000, 8 << 20, 2, 1, Status.PAGE_OWNED),            # 2 MiB over a mapped frame
        (0x200000, 10 << 20, 3, 1, Status.INVALID_PARAM),
    ]
    before = (p._frames.snapshot(), bytes(p.rmp._mm) if design == "rmp" else None)
    for gpa, hpa, level, n, want in cases:
        assert _map(p, design, v, gpa, hpa, level, n) == want, (gpa, hpa, level, n)
    assert (p._frames.snapshot(), bytes(p.rmp._mm) if design == "rmp" else None) == before
    p._check_invariants()


def test_rmp_accepts_what_it_cannot_know_is_a_table_page():
    """Documented: the VMM's NPT pages are hypervisor pages to the RMP."""
    p = _psp("rmp")
    _platform(p, "rmp")
    v = _launch(p, "rmp", 2 << 20)
    assert _map(p, "rmp", v, 0x200000, 12 << 20) == Status.SUCCESS
    assert p.rmp.entry((12 << 20) >> 12) == rmp_entry(v, 0x200000, 1)


def test_isolated_region_is_the_psps():
    p = _psp("isolated")
    _platform(p, "isolated")
    lo = (M - FW - REGION) // PAGE
    assert all(p._frames.state(pfn) == F.POOL for pfn in range(lo, lo + REGION // PAGE))
    assert box(p, Cmd.LAUNCH_START, vmsa_hpa=2 << 20, policy=0)[0] == Status.INVALID_PARAM
    h = _launch(p, "isolated", 0)
    g = box(p, Cmd.GUEST_STATUS, handle=h)[1]
    assert lo <= g["vmsa"] // PAGE < lo + REGION // PAGE and lo <= g["root"] // PAGE
    assert _map(p, "isolated", h, 0x5000, 16 << 20) == Status.SUCCESS
    assert _map(p, "isolated", h, 0x6000, g["root"]) == Status.TABLE_PAGE
    assert _map(p, "isolated", h, 0x7000, M - FW - PAGE) == Status.TABLE_PAGE   # a free pool frame
    from nptcore import get_engine
    eng = get_engine(p.test_mem)
    pages = eng.table_pages(g["root"])
    assert all(lo <= t // PAGE for t, _l in pages)
    for t, lvl in pages:            # every entry the PSP wrote has A (and a leaf D) set
        for i in range(512):
            e = struct.unpack_from("<Q", p.test_mem, t + 8 * i)[0]
            if e & P:
                assert e & A and (lvl > 1 or e & D), hex(e)
    eng.close()


def test_isolated_region_must_sit_below_the_firmware():
    p = _psp("isolated", iso=(M - FW - REGION + PAGE, REGION))
    assert box(p, Cmd.PLATFORM_INIT, host_size=M, fw_base=M - FW, fw_size=FW)[0] == \
        Status.RANGE_OVERLAP
    p = _psp("isolated", iso=(M - FW - REGION + 8, REGION))
    assert box(p, Cmd.PLATFORM_INIT, host_size=M, fw_base=M - FW, fw_size=FW)[0] == \
        Status.MISALIGNED


def test_isolated_region_runs_out():
    p = _psp("isolated", iso=(M - FW - 3 * PAGE, 3 * PAGE))
    _platform(p, "isolated")
    h = _launch(p, "isolated", 0)          # root + control page: one frame left
    assert _map(p, "isolated", h, 0x5000, 16 << 20) == Status.RESOURCE_EXHAUSTED   # needs 3
    assert box(p, Cmd.LAUNCH_START, vmsa_hpa=0, policy=0)[0] == Status.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("design", DESIGNS)
def test_launch_measurement_is_the_same_under_every_design(design):
    p = _psp(design)
    _platform(p, design)
    h = _launch(p, design, 2 << 20)
    for i in range(3):
        p.test_mem[(20 << 20) + i * PAGE:(20 << 20) + i * PAGE + 5] = b"page%d" % i
        assert box(p, Cmd.LAUNCH_UPDATE_DATA, handle=h, gpa=0x1000 * i, hpa=(20 << 20) + i * PAGE,
                   npages=1)[0] == Status.SUCCESS
    m = box(p, Cmd.LAUNCH_FINISH, handle=h)[1]["measurement"]
    q = _psp("digest")
    _platform(q, "digest")
    h2 = _launch(q, "digest", 2 << 20)
    for i in range(3):
        q.test_mem[(20 << 20) + i * PAGE:(20 << 20) + i * PAGE + 5] = b"page%d" % i
        box(q, Cmd.LAUNCH_UPDATE_DATA, handle=h2, gpa=0x1000 * i, hpa=(20 << 20) + i * PAGE,
            npages=1)
    assert box(q, Cmd.LAUNCH_FINISH, handle=h2)[1]["measurement"] == m


# ---------------------------------------------------------------------------
# the RMP state model (psp_firmware/rmp.py) against an oracle


def _gpa_clash(owner, h, gpa, level, n):
    """Does guest h already have a frame at a GPA of the range (a 4 KiB page
    inside an assigned 2 MiB one, or the reverse, counts)?"""
    mine = [o for o in owner.values() if o[0] == h]
    pages = {o[1] >> 12 for o in mine if o[2] == 1}
    blocks = {o[1] >> 21 for o in mine if o[2] == 2}
    if level == 2:
        return any((gpa >> 21) + i in blocks | {q >> 9 for q in pages} for i in range(n))
    return any((gpa >> 12) + i in pages or ((gpa >> 12) + i) >> 9 in blocks for i in range(n))

OPS = st.lists(st.tuples(st.sampled_from(["assign", "unassign", "private", "reclaim", "decom",
                                          "launch"]),
                         st.integers(0, 2), st.integers(0, 40), st.integers(0, 40),
                         st.sampled_from([1, 1, 1, 2]), st.integers(1, 3)),
               min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_rmp_follows_its_state_model(ops):
    """Random RMP_ASSIGN / RMP_UNASSIGN / SET_PRIVATE_MEMORY / RECLAIM /
    DECOMMISSION: after each, every RMP entry is what the model says (an
    assignment recorded only when the command succeeded), the invariants
    hold, and an assignment is refused exactly when the oracle says it
    conflicts."""
    p = _psp("rmp")
    _platform(p, "rmp")
    handles = [_launch(p, "rmp", (2 << 20) + i * PAGE) for i in range(2)]
    vmsas = {h: (2 << 20) + i * PAGE for i, h in enumerate(handles)}
    owner = {}          # pfn -> (handle, gpa of the frame, level): assigned
    private = {}        # pfn -> handle
    base = 16 << 20
    for op, gi, a, b, level, n in ops:
        if op == "launch":
            h = _launch(p, "rmp", (3 << 20) + len(vmsas) * PAGE)
            vmsas[h] = (3 << 20) + (len(vmsas)) * PAGE
            handles.append(h)
            continue
        if not handles:
            continue
        h = handles[gi % len(handles)]
        size = PAGE << (9 * (level - 1))
        hpa = base + a * (MB2 if level == 2 else PAGE)
        gpa = 0x40000000 + b * size
        frames = range(hpa // PAGE, hpa // PAGE + n * size // PAGE)
        if op == "assign":
            st_ = _map(p, "rmp", h, gpa, hpa, level, n)
            in_memory = hpa + n * size <= M - FW
            bad_frame = any(pf in owner or (pf in private and private[pf] != h) for pf in frames)
            assert (st_ == Status.SUCCESS) == (in_memory and not bad_frame
                                               and not _gpa_clash(owner, h, gpa, level, n)), st_
            if st_ == Status.SUCCESS:
                for k, pf in enumerate(frames):
                    owner[pf] = (h, gpa + k * PAGE, level)
                    private.pop(pf, None)
        elif op == "unassign":
            st_ = box(p, Cmd.RMP_UNASSIGN, handle=h, level=level, hpa=hpa, npages=n)[0]
            whole = all(owner.get(pf, (None,))[0] == h and owner[pf][2] == level for pf in frames)
            assert (st_ == Status.SUCCESS) == whole, st_
            if st_ == Status.SUCCESS:
                for pf in frames:
                    del owner[pf]
                assert p.test_mem[hpa:hpa + n * size] == bytes(n * size)      # scrubbed
        elif op == "private":
            st_ = box(p, Cmd.SET_PRIVATE_MEMORY, handle=h, hpa=hpa, npages=n)[0]
            ok = hpa + n * PAGE <= M - FW and all(
                pf not in owner and pf not in private for pf in range(hpa // PAGE, hpa // PAGE + n))
            assert (st_ == Status.SUCCESS) == ok
            if ok:
                for pf in range(hpa // PAGE, hpa // PAGE + n):
                    private[pf] = h
        elif op == "reclaim":
            st_ = box(p, Cmd.RECLAIM, handle=h, hpa=hpa, npages=n)[0]
            ok = all(private.get(pf) == h for pf in range(hpa // PAGE, hpa // PAGE + n))
            assert (st_ == Status.SUCCESS) == ok
            if ok:
                for pf in range(hpa // PAGE, hpa // PAGE + n):
                    del private[pf]
        elif op == "decom":
            assert box(p, Cmd.DECOMMISSION, handle=h)[0] == Status.SUCCESS
            handles.remove(h)
            owner = {pf: o for pf, o in owner.items() if o[0] != h}
            private = {pf: o for pf, o in private.items() if o != h}
        # the RMP is exactly the model
        want = {pf: rmp_entry(*o) for pf, o in owner.items()}
        got = {pf: e for pf, e in enumerate(p.rmp.q) if e}
        assert got == want
    p._check_invariants()


# ---------------------------------------------------------------------------
# the isolated design through the C UPDATE_NPT fast path (no line hashes,
# A|D in every leaf) against its Python handler

needs_c = pytest.mark.skipif(not __import__("psp_firmware.core", fromlist=["x"]).available(),
                             reason="C core not built")

UPDATES = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 700), st.integers(0, 90),
                             st.sampled_from([1, 1, 1, 2]), st.sampled_from([0, 1, 2, 3, 8]),
                             st.sampled_from([1, 1, 2, 5, 512]), st.booleans()),
                   min_size=1, max_size=40)


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=UPDATES)
def test_isolated_fast_path_commits_what_the_handler_commits(ops):
    variants = [_psp("isolated", core="python", fast=False), _psp("isolated", core="c", fast=False),
                _psp("isolated", core="c", fast=True)]
    assert [p.fast for p in variants] == [False, False, True]
    handles = []
    for p in variants:
        _platform(p, "isolated")
        handles.append([_launch(p, "isolated", 0) for _ in range(2)])
    assert handles[0] == handles[1] == handles[2]
    for gi, page, frame, level, attrs, n, ring in ops:
        size = PAGE << (9 * (level - 1))
        gpa = 0x40000000 + page * size // (8 if level == 2 else 1) // size * size
        hpa = (16 << 20) + frame * (MB2 if level == 2 else PAGE)
        cmd = encode(Cmd.UPDATE_NPT, handle=handles[0][gi], level=level, gpa=gpa, hpa=hpa,
                     attrs=attrs, npages=n)
        outs = []
        for p in variants:
            if ring:       # the same command through a ring of one (psp_ring_fast)
                from psp_firmware import mailbox_layout as L
                buf = bytearray(L.RING_ENTRY_SIZE)
                L.ENTRY_HDR.pack_into(buf, 0, int(Cmd.UPDATE_NPT), len(cmd))
                buf[L.RE_IN:L.RE_IN + len(cmd)] = cmd
                p.run_ring(memoryview(buf), 1)
                word, olen = L.ENTRY_RESULT.unpack_from(buf, L.RE_STATUS)
                outs.append((word & L.STATUS_MASK, bytes(buf[L.RE_OUT:L.RE_OUT + olen])))
            else:
                outs.append(p.mailbox(int(Cmd.UPDATE_NPT), cmd))
        assert outs[0] == outs[1] == outs[2], (gpa, hpa, level, attrs, n)
    mems = [bytes(p.test_mem) for p in variants]
    assert mems[0] == mems[1] == mems[2]
    snaps = [p._frames.snapshot() for p in variants]
    assert snaps[0] == snaps[1] == snaps[2]
    for p in variants:
        p._check_invariants()
        for h in handles[0]:
            assert box(p, Cmd.GUEST_STATUS, handle=h)[1]["mapped_pages"] == \
                box(variants[0], Cmd.GUEST_STATUS, handle=h)[1]["mapped_pages"]


@needs_c
def test_isolated_updates_take_the_c_fast_path():
    p = _psp("isolated", core="c", fast=True)
    _platform(p, "isolated")
    h = _launch(p, "isolated", 0)
    lib, commits = p._c, []

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def psp_mailbox_update(self, ctx, buf):
            r = lib.psp_mailbox_update(ctx, buf)
            commits.append(r)
            return r
    p._c = Spy()
    assert _map(p, "isolated", h, 0x5000, 16 << 20) == Status.SUCCESS     # new tables: Python
    assert _map(p, "isolated", h, 0x6000, (16 << 20) + PAGE) == Status.SUCCESS
    assert commits == [0, 1]            # declined (tables needed), then committed in C
    from nptcore import get_engine
    eng = get_engine(p.test_mem)
    root = box(p, Cmd.GUEST_STATUS, handle=h)[1]["root"]
    assert eng.walk(root, 0x6000, 1, set_ad=False).entry & (A | D) == A | D
    eng.close()
