"""The VMM side of the NPF path, against simple references: the frame
allocator, the replay loop (C fast path vs the engine's walk_batch vs one
walk per access), handle_npf's 4 KiB fast path, the PSP client's
update_npt_fast and the in-process transport."""
import bisect
import logging
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import hv.trace.replay as replay_mod
from hv import Vmm
from hv.vmm.alloc import PAGE, FrameAllocator, OutOfMemory
from hv.psp_link.inprocess import InProcessTransport
from hv.psp_link.client import PspClient, Reply
from hv.trace.replay import replay
from hv.trace import Trace
from nptcore import available_backends
from psp_firmware import Status
from psp_firmware.commands import Cmd, decode_out, encode

HYP = settings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# the frame allocator

class _RefAllocator:
    """The allocator as it was before its fast paths (first fit over a
    sorted extent list, re-sorted on every cut), verbatim in behaviour."""

    def __init__(self, base, limit):
        self._starts = [base]
        self._ends = {base: limit}
        self.allocated = 0

    def alloc(self, n=1, align=PAGE):
        size = n * PAGE
        for i, s in enumerate(self._starts):
            e = self._ends[s]
            a = (s + align - 1) // align * align
            if a + size <= e:
                self._take(i, s, e, a, a + size)
                self.allocated += n
                return a
        raise OutOfMemory("exhausted")

    def _take(self, i, s, e, a, b):
        del self._starts[i]
        del self._ends[s]
        if s < a:
            self._insert(s, a)
        if b < e:
            self._insert(b, e)

    def _insert(self, s, e):
        bisect.insort(self._starts, s)
        self._ends[s] = e

    def reserve(self, hpa, n=1):
        b = hpa + n * PAGE
        for i, s in enumerate(self._starts):
            e = self._ends[s]
            if s <= hpa and b <= e:
                self._take(i, s, e, hpa, b)
                self.allocated += n
                return hpa
        raise OutOfMemory("not free")

    def free(self, hpa, n=1):
        s, e = hpa, hpa + n * PAGE
        i = bisect.bisect_left(self._starts, s)
        if i > 0:
            ps = self._starts[i - 1]
            if self._ends[ps] > s:
                raise ValueError("double free")
            if self._ends[ps] == s:
                s = ps
                del self._starts[i - 1]
                del self._ends[ps]
                i -= 1
        if i < len(self._starts):
            ns = self._starts[i]
            if ns < e:
                raise ValueError("double free")
            if ns == e:
                e = self._ends.pop(ns)
                del self._starts[i]
        self._insert(s, e)
        self.allocated -= n


def _extents(a):
    return [(s, a._ends[s]) for s in a._starts]


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except (OutOfMemory, ValueError) as e:
        return (type(e).__name__,)


BASE, LIMIT = 1 << 20, (1 << 20) + 96 * PAGE
_ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 20), st.sampled_from([PAGE, 2 * PAGE, 4 * PAGE, 16 * PAGE])),
    st.tuples(st.just("free_last"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("free_any"), st.integers(0, 120), st.integers(1, 6)),
    st.tuples(st.just("reserve"), st.integers(0, 120), st.integers(1, 6)),
), max_size=80)


@HYP
@given(_ops)
def test_allocator_matches_reference(ops):
    """Same addresses, same errors, same extents, same counters as the
    allocator without fast paths; and every extent list stays sorted and
    disjoint."""
    a, ref = FrameAllocator(BASE, LIMIT), _RefAllocator(BASE, LIMIT)
    held = []
    for op, x, y in ops:
        if op == "alloc":
            got, want = _outcome(a.alloc, x, y), _outcome(ref.alloc, x, y)
            if got[0] == "ok" and x:
                held.append((got[1], x))
        elif op == "free_last":
            if not held:
                continue
            hpa, n = held.pop(-1 - x % len(held))
            got, want = _outcome(a.free, hpa, n), _outcome(ref.free, hpa, n)
        elif op == "free_any":         # double frees included
            hpa = BASE + x * PAGE
            got, want = _outcome(a.free, hpa, y), _outcome(ref.free, hpa, y)
        else:
            hpa = BASE + x * PAGE
            got, want = _outcome(a.reserve, hpa, y), _outcome(ref.reserve, hpa, y)
        assert got == want, (op, x, y)
        assert _extents(a) == _extents(ref)
        assert a.allocated == ref.allocated
        assert a._starts == sorted(a._ends) and len(a._starts) == len(set(a._starts))


@HYP
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2 ** 32 - 1)), max_size=12),
       st.sampled_from(["list", "tuple"]))
def test_alloc_each_and_free_each_are_frame_by_frame(rounds, how):
    """alloc_each(k) gives what k alloc(1) give; free_each(frames) leaves
    the allocator as freeing each frame alone does, for frames in a run, in
    any order, or a mix (double frees refused the same way)."""
    import random
    a, ref = FrameAllocator(BASE, LIMIT), FrameAllocator(BASE, LIMIT)
    held = []
    for k, seed in rounds:
        got = a.alloc_each(k)
        want = []
        for _ in range(k):
            try:
                want.append(ref.alloc(1))
            except OutOfMemory:
                break
        assert got == want
        held += got
        rnd = random.Random(seed)
        give = held[:rnd.randrange(len(held) + 1)]
        if seed % 3 == 1:
            rnd.shuffle(give)
        elif seed % 3 == 2 and give:
            give.append(give[0])                  # a double free
        held = held[len(give) if seed % 3 != 2 else len(give) - 1:]
        r1 = _outcome(a.free_each, tuple(give) if how == "tuple" else give)
        r2 = ("ok", None)
        for h in give:
            r2 = _outcome(ref.free, h, 1)
            if r2[0] != "ok":
                break
        assert r1[0] == r2[0]
        if r1[0] != "ok":
            return                                  # both refused the same frame
        assert _extents(a) == _extents(ref) and a.allocated == ref.allocated


@HYP
@given(st.lists(st.tuples(st.integers(1, 9), st.sampled_from([PAGE, 8 * PAGE])), max_size=40))
def test_allocator_first_fit_is_lowest_free_run(reqs):
    """Against a page-set model: alloc(n, align) returns the lowest aligned
    address whose n pages are all free."""
    a = FrameAllocator(BASE, LIMIT)
    free = set(range(BASE, LIMIT, PAGE))
    held = []
    for k, (n, align) in enumerate(reqs):
        if k % 3 == 2 and held:                # free one now and then
            hpa, m = held.pop(k % len(held))
            a.free(hpa, m)
            free.update(range(hpa, hpa + m * PAGE, PAGE))
            continue
        want = next((x for x in range(BASE, LIMIT, PAGE) if x % align == 0 and
                     all(x + i * PAGE in free for i in range(n))), None)
        if want is None:
            with pytest.raises(OutOfMemory):
                a.alloc(n, align)
            continue
        assert a.alloc(n, align) == want
        free.difference_update(range(want, want + n * PAGE, PAGE))
        held.append((want, n))
        assert a.free_pages() == len(free)


def test_allocator_fast_path_from_the_first_extent():
    a = FrameAllocator(BASE, LIMIT)
    assert [a.alloc() for _ in range(3)] == [BASE, BASE + PAGE, BASE + 2 * PAGE]
    assert _extents(a) == [(BASE + 3 * PAGE, LIMIT)]
    a.free(BASE + PAGE)                        # a hole below: first fit takes it next
    assert a.alloc() == BASE + PAGE
    assert a.alloc(96 - 3) == BASE + 3 * PAGE  # the whole rest: no extent left
    assert _extents(a) == [] and a.free_pages() == 0
    with pytest.raises(OutOfMemory):
        a.alloc()


# ---------------------------------------------------------------------------
# replay: the C fast path, the engine's walk_batch, and one walk per access

def _ref_replay(vmm, vm, trace):
    """The semantics: every access walks; a miss is an NPF, then the walk again."""
    gpas, accs, index_map = replay_mod.expand_straddles(trace)
    walks = 0
    for i in range(len(gpas)):
        r = vmm.engine.walk(vmm.npt_root(vm), gpas[i], accs[i])
        if not r.ok:
            row = index_map[i] if index_map is not None else i
            try:
                vmm.handle_npf(vm, gpas[i], accs[i], r.errcode,
                               trace.rip[row] if trace.rip else None,
                               trace.insn[row] if trace.insn else None)
            except replay_mod.VmStopped as e:
                return dict(walks=walks, npf=vm.npf, pages_mapped=vm.pages_mapped, stopped=e)
            assert vmm.engine.walk(vmm.npt_root(vm), gpas[i], accs[i]).ok
        walks += 1
    return dict(walks=walks, npf=vm.npf, pages_mapped=vm.pages_mapped, stopped=None)


def _state(vmm, vm, res):
    return dict(
        walks=res["walks"], npf=res["npf"], pages_mapped=res["pages_mapped"],
        stopped=None if res["stopped"] is None else (res["stopped"].status, str(res["stopped"])),
        mapped=set(vm.mapped), huge_blocks=set(vm.huge_blocks), spb=dict(vm.small_per_block),
        hpa_of=dict(vm.hpa_of), vm_pages=vm.pages_mapped,
        # every leaf with its A/D bits: the walks set them identically
        leaves=vmm.engine.mappings(vmm.npt_root(vm)),
        digest=vmm.guest_digest(vm), commands=vmm.psp.commands, refused=vmm.psp.refused,
        by_status=dict(vmm.psp.by_status), free=vmm.alloc.free_pages())


def _run(backend, trace, how, vmopts, premap=(), fatal=False, progress=None):
    vmm = Vmm(host_mem=128 << 20, backend=backend)
    try:
        vm = vmm.create_vm(**vmopts)
        for g in premap:
            vmm.touch(vm, g)
        if fatal:
            vm.fatal = Status.GUEST_STOPPED
        if how == "ref":
            res = _ref_replay(vmm, vm, trace)
        elif how == "generic":
            saved = replay_mod._c_batch_walk
            replay_mod._c_batch_walk = lambda *a: (None, None)
            try:
                res = replay(vmm, vm, trace, progress=progress, chunk=7)
            finally:
                replay_mod._c_batch_walk = saved
        else:
            res = replay(vmm, vm, trace, progress=progress, chunk=7)
        return _state(vmm, vm, res)
    finally:
        vmm.close()


_rows = st.lists(st.tuples(st.sampled_from([0, 1, 2]),
                           st.one_of(st.integers(0, (4 << 20) - 1),
                                     st.integers(0x4000_0000, 0x4000_0000 + (4 << 20))),
                           st.integers(1, 64)), min_size=1, max_size=120)
_vmopts = st.sampled_from([{}, {"fault_around": 16}, {"fault_around": 5}, {"huge": True},
                           {"huge": True, "fault_around": 8}, {"ram_size": 3 << 20}])


@HYP
@given(_rows, _vmopts, st.booleans())
def test_replay_paths_agree(backend, rows, vmopts, with_progress):
    """Same walks, NPFs, mappings (A/D included), digest and counters from
    the replay loop (C direct and walk_batch) as from walking every access."""
    t = Trace([a for a, _, _ in rows], [g for _, g, _ in rows], [s for _, _, s in rows],
              rip=[0x1000 + i for i in range(len(rows))])
    calls = []
    ref = _run(backend, t, "ref", vmopts)
    fast = _run(backend, t, "fast", vmopts, progress=(lambda d, n: calls.append((d, n)))
                if with_progress else None)
    assert fast == ref
    if backend == "c":
        assert _run(backend, t, "generic", vmopts) == ref
    if with_progress:
        assert calls and calls[-1][0] == ref["walks"] and all(n == calls[0][1] for _, n in calls)


def test_replay_stops_where_the_reference_stops(backend):
    t = Trace([0] * 6, [0x1000, 0x2000, 0x1000, 0x9000, 0x2000, 0xA000])
    ref = _run(backend, t, "ref", {}, premap=(0x1000, 0x2000), fatal=True)
    assert ref["stopped"][0] == Status.GUEST_STOPPED and ref["walks"] == 3
    assert _run(backend, t, "fast", {}, premap=(0x1000, 0x2000), fatal=True) == ref
    assert _run(backend, t, "generic", {}, premap=(0x1000, 0x2000), fatal=True) == ref


def test_replay_passes_rip_and_insn_of_the_trace_row(backend):
    """A straddling access is two walks of one trace row: both NPFs get that
    row's rip and instruction bytes."""
    t = Trace([0, 1, 2], [0x5000, 0x1FFE, 0x9000], [8, 4, 1], rip=[0x11, 0x22, 0x33],
              insn=[b"\x90", b"\x0f\x0b", b"\xc3"])
    vmm = Vmm(host_mem=128 << 20, backend=backend)
    try:
        vm = vmm.create_vm()
        seen = []
        real = vmm.handle_npf

        def spy(vm_, gpa, access, errcode, rip=None, insn=None, mode=64):
            seen.append((gpa, access, rip, insn))
            return real(vm_, gpa, access, errcode, rip, insn, mode)
        vmm.handle_npf = spy
        res = replay(vmm, vm, t)
    finally:
        vmm.close()
    assert res["walks"] == 4 and res["npf"] == 4 and res["accesses"] == 3
    assert seen == [(0x5000, 0, 0x11, b"\x90"), (0x1FFE, 1, 0x22, b"\x0f\x0b"),
                    (0x2000, 1, 0x22, b"\x0f\x0b"), (0x9000, 2, 0x33, b"\xc3")]


def test_replay_arrays_the_fast_path_does_not_take(backend):
    """Columns of other widths go to the engine's walk_batch, as before."""
    t = Trace(array("B", [0, 0]), array("I", [0x1000, 0x2000]))
    vmm = Vmm(host_mem=128 << 20, backend=backend)
    try:
        vm = vmm.create_vm()
        if backend == "c":
            with pytest.raises(TypeError):
                replay(vmm, vm, t)
        else:
            assert replay(vmm, vm, t)["npf"] == 2
        assert replay(vmm, vm, Trace([], []))["walks"] == 0
    finally:
        vmm.close()


# ---------------------------------------------------------------------------
# handle_npf

def test_handle_npf_4k_fast_path_is_choose_range(backend):
    vmm = Vmm(host_mem=128 << 20, backend=backend)
    try:
        vm = vmm.create_vm(ram_size=64 << 20)
        for gpa in (0, 0x1234, 0x3FF_FFFF, 0x20_0FFF):
            want = vmm._choose_range(vm, gpa)
            assert want == (gpa & ~0xFFF, 1, 1)
            assert vmm.handle_npf(vm, gpa, 0, 0) is Status.SUCCESS
            hpa = vm.hpa_of[gpa >> 12][0]
            assert vm.hpa_of[gpa >> 12] == (hpa, 1, 1)
            assert vmm.engine.walk(vmm.npt_root(vm), gpa, 0).hpa == hpa + (gpa & 0xFFF)
        assert vm.mapped == {0, 0x1, 0x3FFF, 0x200} and vm.pages_mapped == 4
        assert vm.small_per_block == {0: 2, 1: 1, 0x1F: 1}
    finally:
        vmm.close()


def test_npf_mappings_do_not_run_on_npt_change_but_launch_does():
    vmm = Vmm(host_mem=128 << 20)
    try:
        vm = vmm.create_vm()
        calls = []
        vm.on_npt_change.append(lambda: calls.append(1))
        vmm.load_page(vm, 0x1000, b"x")
        assert calls == [1]
        vmm.touch(vm, 0x5000)
        vm.fault_around = 16
        vmm.touch(vm, 0x9000)
        vm.huge = True
        vmm.touch(vm, 0x40_0000)
        assert calls == [1] and vm.pages_mapped == 1 + 1 + 10 + 512    # 0x6000..0xF000
    finally:
        vmm.close()


def test_handle_npf_refusal_frees_the_frame_and_reports_fields():
    vmm = Vmm(host_mem=128 << 20)
    try:
        vm = vmm.create_vm()
        vmm.touch(vm, 0x3000)
        free = vmm.alloc.free_pages()
        before = dict(vmm.psp.by_status)
        vmm.psp.decommission(vm.handle)
        with pytest.raises(replay_mod.VmStopped) as ei:
            vmm.handle_npf(vm, 0x4000, 0, 0)
        assert ei.value.status == Status.INVALID_HANDLE and "INVALID_HANDLE" in str(ei.value)
        assert vmm.alloc.free_pages() == free
        assert vmm.psp.by_status[int(Status.INVALID_HANDLE)] == before.get(int(Status.INVALID_HANDLE), 0) + 1
    finally:
        vmm.close()


def test_handle_npf_logs_success_as_before(caplog):
    vmm = Vmm(host_mem=128 << 20)
    try:
        vm = vmm.create_vm()
        with caplog.at_level(logging.INFO, logger="hv.npf"):
            vmm.handle_npf(vm, 0x7123, 1, 6, rip=0x10, insn=lambda: b"\x90", mode=64)
        assert any("npf gpa=0x7123 access=w err=0x6 level=4K" in m and "status=SUCCESS" in m
                   and "insn=" in m for m in caplog.messages)
    finally:
        vmm.close()


def test_handle_npf_pool_exhaustion_donates_and_sends_once_more():
    vmm = Vmm(host_mem=128 << 20)
    try:
        vm = vmm.create_vm()
        # drain the PSP's table pool: a mapping in each new GiB takes two
        # table pages, and 0x1000 will need two more
        k = 1
        while vmm.psp.update_npt(vm.handle, k << 30, vmm.alloc.alloc(1)).ok:
            k += 1
        n = vmm.psp.commands
        exhausted = vmm.psp.by_status.get(int(Status.RESOURCE_EXHAUSTED), 0)
        vmm.handle_npf(vm, 0x1000, 0, 0)
        # UPDATE_NPT refused once, POOL_ADD, UPDATE_NPT again
        assert vmm.psp.commands == n + 3
        assert vmm.psp.by_status[int(Status.RESOURCE_EXHAUSTED)] == exhausted + 1
        assert vmm.engine.walk(vmm.npt_root(vm), 0x1000, 0).ok
    finally:
        vmm.close()


# ---------------------------------------------------------------------------
# the PSP client and the in-process transport

class _Scripted:
    """A transport answering from a script of (status, out)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.sent = []

    def call(self, cmd, buf):
        self.sent.append((cmd, bytes(buf)))
        return self.answers.pop(0)


_ANSWERS = [
    (0, struct.pack("<II", 1, 2)), (0, b""), (0, b"short"), (int(Status.GPA_MAPPED), b""),
    (int(Status.INTEGRITY_FAILURE), struct.pack("<IQIQQ", 0, 0x5000, 3, 0x1007, 0x2007)),
    (int(Status.RESOURCE_EXHAUSTED), b""), (0x99, b"??"), (int(Status.GUEST_STOPPED), b"\0" * 8),
]


@pytest.mark.parametrize("answer", _ANSWERS)
def test_update_npt_fast_is_update_npt(answer):
    args = (7, 0x4000_0000, 0x20_0000, 1, 3, 1)
    a, b = PspClient(_Scripted([answer])), PspClient(_Scripted([answer]))
    want = a.update_npt(*args)
    got = b.update_npt_fast(*args)
    assert b.transport.sent == a.transport.sent == [(int(Cmd.UPDATE_NPT), encode(
        Cmd.UPDATE_NPT, handle=7, level=1, gpa=0x4000_0000, hpa=0x20_0000, attrs=3, npages=1))]
    assert (a.commands, a.refused, a.by_status) == (b.commands, b.refused, b.by_status)
    if want.status == Status.SUCCESS:
        assert got is None
    else:
        assert isinstance(got, Reply) and got == want
        assert type(got.status) is type(want.status) and got.name == want.name
        assert got.fields == decode_out(Cmd.UPDATE_NPT, answer[1], want.status)


def test_update_npt_fast_errors_as_call():
    for bad in ((1 << 32, 0, 0), (1, -1, 0), (1, 0, 1 << 64), ("x", 0, 0)):
        a, b = PspClient(_Scripted([])), PspClient(_Scripted([]))
        with pytest.raises(ValueError) as ea:
            a.update_npt(*bad)
        with pytest.raises(ValueError) as eb:
            b.update_npt_fast(*bad)
        assert str(ea.value) == str(eb.value)
        assert a.commands == b.commands == 0


def test_refusals_reach_on_refusal_from_every_path():
    """hv.attacks sees every refused reply (the NPF path's update_npt_fast
    included) through on_refusal; successes do not call it."""
    c = PspClient(_Scripted([(int(Status.INTEGRITY_FAILURE), b""), (0, b""),
                             (int(Status.GPA_MAPPED), b""), (0, b"")]))
    seen = []
    c.on_refusal = seen.append
    r = c.update_npt_fast(1, 0x1000, 0x2000)
    assert r.status == Status.INTEGRITY_FAILURE
    assert c.update_npt_fast(1, 0x2000, 0x3000) is None
    r2 = c.update_npt(1, 0x3000, 0x4000)
    assert r2.status == Status.GPA_MAPPED
    assert c.nop().ok
    assert seen == [r, r2]
    assert [x.status for x in seen] == [Status.INTEGRITY_FAILURE, Status.GPA_MAPPED]


def test_inprocess_transport_hands_the_firmware_int_and_bytes():
    got = []

    class Fw:
        def mailbox(self, cmd, buf):
            got.append((type(cmd), cmd, type(buf), buf))
            return 0, b""

        def run_ring(self, ring, n, progress=None):
            # call_batch's ring (hv.ring), read as the firmware reads it
            from psp_firmware import mailbox_layout as L
            assert progress is None and n <= len(ring) // L.RING_ENTRY_SIZE
            for i in range(n):
                e = L.entry_off(i) - L.RING_OFF
                cmd, in_len = L.ENTRY_HDR.unpack_from(ring, e)
                st, out = self.mailbox(cmd, bytes(ring[e + L.RE_IN:e + L.RE_IN + in_len]))
                L.ENTRY_RESULT.pack_into(ring, e + L.RE_STATUS, st | L.DONE, len(out))
            return 0
    t = InProcessTransport(Fw())
    for cmd, buf in ((Cmd.NOP, b""), (0x3F, bytearray(b"ab")), (0x3F, memoryview(b"cd")), (0x3F, b"ef")):
        assert t.call(cmd, buf) == (0, b"")
    assert t.call_batch([(Cmd.NOP, bytearray(b"x")), (5, b"y")]) == [(0, b""), (0, b"")]
    assert all(tc is int and tb is bytes for tc, _, tb, _ in got)
    assert [(c, b) for _, c, _, b in got] == [(0x3F, b""), (0x3F, b"ab"), (0x3F, b"cd"), (0x3F, b"ef"),
                                             (0x3F, b"x"), (5, b"y")]


# ---------------------------------------------------------------------------
# the vCPU's TLB flush

def test_vcpu_flush_tlb_in_c():
    """flush_tlb really empties Unicorn's TLB, through the C uc_ctl call and
    through the binding alike: a guest running in its warm pages takes no TLB
    fill, and after a flush it must fill its pages again."""
    from hv.machine.unicorn_vcpu import UnicornVcpu, available_hooks
    if "c" not in available_hooks():
        pytest.skip("C vCPU hook not built")
    from hv.machine.loader import load_image
    import guests.build as gb
    try:
        img = gb.build_all()["compute"]
    except gb.BuildError as e:
        pytest.skip(str(e))
    vmm = Vmm(host_mem=128 << 20)
    try:
        vm = vmm.create_vm(ram_size=16 << 20)
        image = load_image(str(img), 16 << 20)
        for gpa, data in image.initial_pages():
            vmm.load_page(vm, gpa, data)
        vc = UnicornVcpu(vmm, vm, image, hook="c")
        assert vc._c_flush
        assert vc.run(count=200_000).kind == "limit"       # warm: the sieve's inner loop

        def fills_in_next(n=1000):
            f = vc._ctx.fills
            assert vc.run(count=n).kind == "limit"
            return vc._ctx.fills - f
        assert fills_in_next() == 0
        vc.flush_tlb()                 # the C uc_ctl call
        assert fills_in_next() >= 1
        assert fills_in_next() == 0
        vc._c_flush = False
        vc.flush_tlb()                 # the binding's
        assert fills_in_next() >= 1
        vc.close()
        vc.flush_tlb()                 # closed: nothing to flush, and no error
    finally:
        vmm.close()


@pytest.mark.skipif("c" not in available_backends(), reason="C engine not built")
def test_c_batch_walk_matches_walk_batch():
    vmm = Vmm(host_mem=128 << 20)
    try:
        vm = vmm.create_vm()
        for g in (0x1000, 0x3000):
            vmm.touch(vm, g)
        gpas = array("Q", [0x1000, 0x3000, 0x1008, 0x2000, 0x3000])
        accs = array("B", [0, 1, 2, 0, 0])
        out = array("Q", bytes(8 * 5))
        walk, miss = replay_mod._c_batch_walk(vmm.engine, gpas, accs, out)
        out2 = array("Q", bytes(8 * 5))
        k, m = vmm.engine.walk_batch(vmm.npt_root(vm), gpas[1:], accs[1:], out2)
        assert walk(vmm.npt_root(vm), 1, 5) == k == 2
        assert (miss.errcode, miss.level, miss.entry) == (m.errcode, m.level, m.entry)
        assert out[1:3] == out2[:2]
        assert walk(vmm.npt_root(vm), 0, 2) == 2
        assert replay_mod._c_batch_walk(vmm.engine, array("Q"), array("B"), array("Q")) == (None, None)
    finally:
        vmm.close()


def _choose_range_reference(vm, gpa):
    """_choose_range as it was: a scan out from the faulting page."""
    from nptcore.bits import GPA_LIMIT
    page = gpa >> 12
    limit = (vm.ram_size >> 12) if vm.ram_size else (GPA_LIMIT >> 12)
    if vm.huge:
        block = page >> 9
        if not vm.small_per_block.get(block) and (block + 1) << 9 <= limit:
            return block << 21, 1, 2
    n = vm.fault_around
    if n == 1:
        return page << 12, 1, 1
    lo = page - page % n
    hi = min(lo + n, limit)
    start = page
    while start > lo and (start - 1) not in vm.mapped and ((start - 1) >> 9) not in vm.huge_blocks:
        start -= 1
    end = page + 1
    while end < hi and end not in vm.mapped and (end >> 9) not in vm.huge_blocks:
        end += 1
    return start << 12, end - start, 1


@HYP
@given(st.integers(1, 512), st.booleans(), st.sets(st.integers(0, 3000), max_size=60),
       st.sets(st.integers(0, 5), max_size=3), st.sampled_from([None, 3 << 20, 10 << 20]),
       st.lists(st.integers(0, (12 << 20) - 1), min_size=1, max_size=30))
def test_choose_range_matches_reference(n, huge, mapped, huge_blocks, ram_size, gpas):
    from hv.vmm.vm import Vm
    vm = Vm(1, 0, ram_size, n, huge, huge_blocks=set(huge_blocks))
    vm.mapped.update(mapped)
    for p in mapped:
        vm.small_per_block[p >> 9] = vm.small_per_block.get(p >> 9, 0) + 1
    for gpa in gpas + [(1 << 48) + 0x5000, 0x4000 << 12]:
        assert Vmm._choose_range(None, vm, gpa) == _choose_range_reference(vm, gpa)
