"""The in-process transport's ring (hv.ring + Psp.run_ring) against the same
commands sent one by one.

InProcessTransport.call_batch packs a batch into a private ring buffer and
has the firmware's run_ring answer it, as the process transport's ring does.
A differential test drives random batches (valid UPDATE_NPTs and other
commands, malformed buffers, wrong lengths, bad command ids, batches larger
than the ring) through call_batch on one Vmm and call() item by item on a
twin, and compares every answer and the state left behind (host memory, the
PSP's status replies).

An entry whose buffer is longer than the ring's in area (RE_IN_SIZE bytes)
cannot be passed to the mailbox; the firmware answers it as the mailbox
answers that length (INVALID_COMMAND for an unknown command, else
INVALID_LENGTH) and counts it, so the ring and call() agree on every answer
and on PLATFORM_STATUS.commands. The process transport's ring does the same.
"""
import hashlib
import os
import struct
import threading
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv import Vmm
from hv.psp_link.ring import RING_BYTES, Ring
from nptcore import available_backends
from psp_firmware import Cmd, Status, encode
from psp_firmware import mailbox_layout as L
from psp_firmware.commands import _IN, MAX_NPAGES

PAGE = 4096
MB2 = 2 << 20
GPA_LIMIT = 1 << 48
RING_N = L.RING_ENTRIES
HUGE_FRAMES = 512            # block frames [0, 512): a 2 MiB-aligned run
FRESH_FIRST = 600            # block frames [600, ...): one fresh page per fresh update
FRESH_MAX = 2 * RING_N + 7
BLOCK = FRESH_FIRST + FRESH_MAX
FRESH_GPA = 0x1000_0000
EXAMPLES = int(os.environ.get("HV_RING_EXAMPLES", "20"))

CONFIGS = {
    # (nptcore backend, integrity, environment of the PSP)
    "c-merkle": ("c", None, {}),                               # psp_ring_fast
    "c-full": ("c", "full", {}),
    "c-merkle-nofast": ("c", None, {"HV_PSP_FAST": "0"}),      # run_ring's Python loop
    "python": ("python", None, {"HV_PSP_CORE": "python"}),
}


def _config(name):
    backend = CONFIGS[name][0]
    marks = [] if backend in available_backends() else [
        pytest.mark.skip(reason=f"{backend} backend not built")]
    return pytest.param(name, marks=marks, id=name)


def _setup(config):
    """A Vmm with two guests (one running, one still launching) and a block of
    HV frames; the same every time."""
    backend, integrity, env = CONFIGS[config]
    with mock.patch.dict(os.environ, env):
        v = Vmm(host_mem=64 << 20, backend=backend, integrity=integrity)
    try:
        vm1 = v.create_vm()
        v.load_page(vm1, 0x100000, b"image")
        v.launch_finish(vm1)
        vm2 = v.create_vm()
        block = v.alloc.alloc(BLOCK, align=MB2)
    except BaseException:
        v.close()
        raise
    ctx = {"handles": [vm1.handle, vm2.handle], "vmsa": [vm1.vmsa, vm2.vmsa], "block": block,
           "fw": v.fw_base, "size": v.mem.size}
    return v, ctx


def _state(v, ctx):
    """What the PSP and host memory look like: status replies of the platform
    and of every guest (handles beyond those made at setup too: LAUNCH_START
    in a batch makes more), and a hash of the frames the PSP can have written."""
    plat = v.psp.platform_status()
    guests = []
    for h in range(1, 8):
        for r in (v.psp.guest_status(h), v.psp.verify(h)):
            guests.append((r.status, r.fields))
    check = v.psp.check_all()
    end = ctx["block"] + BLOCK * PAGE
    mem = v.mem.buf
    digest = hashlib.sha256(mem[:end]).digest() + hashlib.sha256(mem[ctx["fw"]:]).digest()
    return plat.status, dict(plat.fields), guests, (check.status, check.fields), digest


def _items(ctx):
    """Strategy for one batch item, in the (cmd, buf) form call_batch takes."""
    h, block = ctx["handles"], ctx["block"]
    u64 = st.integers(0, (1 << 64) - 1)
    hpas = st.sampled_from(
        [block + i * PAGE for i in range(6)] + [block + (HUGE_FRAMES + i) * PAGE for i in range(6)]
        + [block, ctx["fw"], 0, ctx["size"], block + 1, ctx["vmsa"][0], 1 << 60])
    gpas = st.sampled_from(
        [0x200000 + i * PAGE for i in range(6)] + [0x4000_0000 + j * MB2 for j in range(3)]
        + [0x100000, 0x201001, GPA_LIMIT - PAGE, GPA_LIMIT, FRESH_GPA])
    fields = {
        "handle": st.sampled_from(h + [max(h) + 1, 0, 0xFFFF_FFFF]),
        "level": st.sampled_from([1, 1, 1, 2, 0, 3]),
        "gpa": gpas, "hpa": hpas, "vmsa_hpa": hpas,
        "attrs": st.sampled_from([3, 3, 1, 0, 2, 7]),
        "npages": st.sampled_from([1, 1, 1, 2, 3, 0, MAX_NPAGES, MAX_NPAGES + 1]),
        "policy": st.sampled_from([0, 0, 1]),
        "host_size": u64, "fw_base": u64, "fw_size": u64,
    }

    def valid(cmd):
        names = _IN[cmd][1]
        return st.fixed_dictionaries({n: fields[n] for n in names}).map(
            lambda f: (cmd, encode(cmd, **f)))

    well_formed = st.sampled_from(list(Cmd)).flatmap(valid)
    updates = valid(Cmd.UPDATE_NPT)
    bad_ids = st.one_of(
        st.sampled_from([0, 0x99, 0x40, 0xFFFF_FFFF, 1 << 32, int(Cmd.UPDATE_NPT) + (1 << 32),
                         int(Cmd.NOP) + (1 << 32), -1, -int(Cmd.NOP), 1 << 64, 1 << 70]),
        st.integers(-(1 << 40), 1 << 40))
    cmd_ids = st.one_of(st.sampled_from(list(Cmd)), bad_ids)
    sizes = st.sampled_from([0, 1, 5, 31, 32, 33, 112, 113, 128, 200, 300, 5000])

    malformed = st.one_of(
        st.tuples(cmd_ids, st.binary(max_size=300)),                      # any bytes
        st.tuples(cmd_ids, sizes.map(bytes)),                             # zeros, any length
        st.tuples(st.sampled_from(list(Cmd)), sizes).flatmap(             # right length, random
            lambda cs: st.tuples(st.just(cs[0]), st.binary(min_size=_len(cs[0]),
                                                           max_size=_len(cs[0])))),
        st.tuples(well_formed, st.sampled_from([-1, 1, 100])).map(        # wrong length
            lambda t: (t[0][0], t[0][1][:t[1]] if t[1] < 0 else t[0][1] + b"\x00" * t[1])),
        st.tuples(bad_ids, updates).map(lambda t: (t[0], t[1][1])),        # bad id, good buffer
    )
    item = st.one_of(well_formed, updates, updates, st.just((Cmd.NOP, b"")), malformed)

    def wrap(t):
        (cmd, buf), how = t
        if how == 1:
            cmd = int(cmd)
        elif how == 2:
            buf = bytearray(buf)
        elif how == 3:
            buf = memoryview(buf)
        elif how == 4 and len(buf) % 4 == 0:
            buf = memoryview(buf).cast("I")      # len() counts words: bytes() does not
        return cmd, buf
    return st.tuples(item, st.integers(0, 4)).map(wrap)


def _len(cmd):
    return struct.calcsize(_IN[cmd][0])


def _fresh(ctx, n):
    """n ordinary UPDATE_NPTs (fresh GPA, fresh frame): the ring's fast path."""
    h, block = ctx["handles"][0], ctx["block"]
    return [(Cmd.UPDATE_NPT, encode(Cmd.UPDATE_NPT, handle=h, level=1, gpa=FRESH_GPA + i * PAGE,
                                    hpa=block + (FRESH_FIRST + i) * PAGE, attrs=3, npages=1))
            for i in range(n)]


def _buf_len(buf):
    return len(bytes(buf))


@pytest.mark.parametrize("config", [_config(c) for c in CONFIGS])
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_ring_batch_matches_calls_one_by_one(config, data):
    a, ctx = _setup(config)          # call_batch
    try:
        b, ctx_b = _setup(config)    # call(), item by item
        try:
            assert ctx == ctx_b
            extra = data.draw(st.lists(_items(ctx), max_size=40), label="items")
            n_fresh = data.draw(st.sampled_from([0, 0, 8, RING_N - 2, RING_N + 3, FRESH_MAX]),
                                label="fresh")
            where = data.draw(st.lists(st.integers(0, n_fresh), min_size=len(extra),
                                       max_size=len(extra)), label="where")
            fresh = _fresh(ctx, n_fresh)
            slots = [[] for _ in range(n_fresh + 1)]
            for w, it in zip(where, extra):
                slots[w].append(it)
            items = list(slots[0])
            for f, more in zip(fresh, slots[1:]):
                items.append(f)
                items.extend(more)

            ring = a.transport.call_batch(items)
            calls = [b.transport.call(c, x) for c, x in items]
            assert len(ring) == len(calls) == len(items)
            for i, ((c, x), r, one) in enumerate(zip(items, ring, calls)):
                assert type(r[0]) is int and type(r[1]) is bytes, (i, r)
                assert r == one, (i, c, _buf_len(x), r, one)
            sa, sb = _state(a, ctx), _state(b, ctx)
            assert sa == sb
        finally:
            b.close()
    finally:
        a.close()


def test_long_entries_count():
    """Entries longer than a ring entry's in area, spelled out: answered and
    counted as call() answers and counts them."""
    a, ctx = _setup("python" if "c" not in available_backends() else "c-merkle")
    try:
        t = a.transport
        items = [(0x99, b"\x00" * (L.RE_IN_SIZE + 1)), (0x99, b"\x00" * L.RE_IN_SIZE),
                 (Cmd.NOP, b"\x00" * (L.RE_IN_SIZE + 1)), (1 << 40, b"\x00" * 500)]
        want = [Status.INVALID_COMMAND, Status.INVALID_COMMAND, Status.INVALID_LENGTH,
                Status.INVALID_COMMAND]
        before = a.psp.platform_status().commands
        assert t.call_batch(items) == [(s, b"") for s in want]
        assert a.psp.platform_status().commands == before + 1 + len(items)
        assert [t.call(c, x)[0] for c, x in items] == want
    finally:
        a.close()


def test_inprocess_batches_from_threads(backend):
    """The private ring buffer is one per transport: batches from several
    threads at once each get their own answers."""
    v = Vmm(host_mem=64 << 20, backend=backend)
    try:
        vm = v.create_vm()
        v._donate_pool(64)
        gs = encode(Cmd.GUEST_STATUS, handle=vm.handle)
        base = v.alloc.alloc(4 * 40 * 7)
        errors = []

        def worker(k):
            try:
                for j in range(40):
                    n = 5 + k + j % 3
                    frame = base + ((k * 40 + j) * 7) * PAGE
                    items = [(Cmd.NOP, b"")] * n + [(Cmd.GUEST_STATUS, gs), (0x99 + k, b"")]
                    items += [(Cmd.UPDATE_NPT, encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1,
                                                      gpa=0x1000_0000 + (frame - base) + i * PAGE,
                                                      hpa=frame + i * PAGE, attrs=3, npages=1))
                              for i in range(k + 1)]
                    if j % 10 == 9:
                        items = items * (RING_N // len(items) + 1)     # several chunks
                    out = v.transport.call_batch(items)
                    assert len(out) == len(items)
                    for (c, _), (s, o) in zip(items, out):
                        if c == Cmd.NOP:
                            assert (s, o) == (0, b"")
                        elif c == Cmd.GUEST_STATUS:
                            assert s == 0 and len(o) == 96
                        elif c == Cmd.UPDATE_NPT:
                            assert s in (0, Status.GPA_MAPPED, Status.PAGE_OWNED) and \
                                (len(o) == 8 if s == 0 else True)
                        else:
                            assert (s, o) == (Status.INVALID_COMMAND, b"")
            except Exception as e:     # pragma: no cover - reported below
                errors.append(e)
        ths = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        assert not errors, errors
        assert v.psp.verify(vm.handle).ok
    finally:
        v.close()


def test_ring_object():
    """hv.ring.Ring over a plain buffer: packing, the alike and mixed answers,
    bounds."""
    import mmap
    with pytest.raises(ValueError):
        Ring(bytearray(RING_BYTES - 1), 0)
    buf = mmap.mmap(-1, RING_BYTES + 64)
    r = Ring(buf, 64)
    try:
        r.pack([(Cmd.NOP, b"ab"), (1 << 40, bytearray(b"\xff" * 200)), (-3, memoryview(b"x"))])
        assert L.ENTRY_ALL.unpack_from(buf, 64) == (int(Cmd.NOP), 2, 0, 0)
        assert buf[64 + L.RE_IN:64 + L.RE_IN + 3] == b"ab\x00"
        e1 = 64 + L.RING_ENTRY_SIZE
        assert L.ENTRY_ALL.unpack_from(buf, e1) == (0xFFFF_FFFF, 200, 0, 0)
        assert buf[e1 + L.RE_IN:e1 + L.RE_IN + L.RE_IN_SIZE] == b"\xff" * L.RE_IN_SIZE
        assert buf[e1 + L.RE_OUT:e1 + L.RE_OUT + 4] == b"\x00" * 4
        assert L.ENTRY_HDR.unpack_from(buf, e1 + L.RING_ENTRY_SIZE) == (0xFFFF_FFFF, 1)
        # answers: all alike with equal outputs, then one differing
        for i in range(3):
            e = 64 + i * L.RING_ENTRY_SIZE
            L.ENTRY_RESULT.pack_into(buf, e + L.RE_STATUS, L.DONE | 0, 8)
            buf[e + L.RE_OUT:e + L.RE_OUT + 8] = b"12345678"
        assert r.results(3) == [(0, b"12345678")] * 3
        assert all(type(o) is bytes for _, o in r.results(3))
        buf[64 + 2 * L.RING_ENTRY_SIZE + L.RE_OUT] = ord("x")
        assert r.results(3) == [(0, b"12345678")] * 2 + [(0, b"x2345678")]
        with pytest.raises(TypeError):
            r.pack([(Cmd.NOP, None)])
    finally:
        r.release()
        buf.close()
