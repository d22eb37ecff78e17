"""The PSP in its own process (issue 6): mailbox, ring, faults, isolation."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from hv import Cmd, Status
from hv.vmm.hostmem import HostMemory
from hv.bench.psp import measure_roundtrip
from hv.psp_link.process import PspDead, ProcessTransport
from nptcore.bits import ACC_R, ACC_W
from psp_firmware import encode
from psp_firmware import mailbox_layout as L

PAGE = 4096
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_vmm(psp="process", **kw):
    from hv import Vmm
    kw.setdefault("host_mem", 128 << 20)
    return Vmm(psp=psp, **kw)


@pytest.fixture
def pvmm(backend):
    v = _make_vmm(backend=backend)
    yield v
    v.close()


def _gone(pid):
    return not os.path.exists(f"/proc/{pid}")


def _reaped(pid):
    """True when pid is no child of ours any more: exited AND waited for (no zombie)."""
    try:
        r = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    assert r is not None, f"PSP process {pid} is still running"
    return False              # exited but not reaped: a zombie


def _wait_gone(pid, limit=5.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/status") as f:
                state = [ln for ln in f if ln.startswith("State:")][0].split()[1]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state == "Z":
            return True          # exited (a non-child zombie is its new parent's to reap)
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------
# the mailbox

def test_nop_and_status(pvmm):
    t = pvmm.transport
    assert t.name == "process" and t.alive
    assert t.call(Cmd.NOP, b"") == (0, b"")
    st = pvmm.psp.platform_status()
    assert st.ok and st.host_size == pvmm.mem.size
    assert t.psp_commands() >= 3


def _scenario(vmm):
    """A run touching most commands; returns everything observable."""
    out = []
    vm = vmm.create_vm()
    vmm.load_page(vm, 0x100000, b"image")
    out.append(vmm.launch_finish(vm))
    for i in range(40):
        vmm.touch(vm, 0x200000 + i * 0x3000, ACC_W if i % 2 else ACC_R)
    vm2 = vmm.create_vm(huge=True)
    vmm.touch(vm2, 0x40000000)
    hpa = vmm.alloc.alloc(1)
    out.append(vmm.psp.update_npt(vm.handle, 0x200000, hpa).status)
    out.append(vmm.psp.update_npt(vm.handle, 0x7001000, vmm.fw_base).status)
    out.append(vmm.psp.update_npt(vm.handle, 0x7002000, hpa + 1).status)
    out.append(vmm.psp.unmap(vm.handle, 0x200000).status)
    out.append(vmm.psp.verify(vm.handle).fields)
    out.append(vmm.psp.guest_status(vm.handle).fields)
    out.append(vmm.psp.guest_status(vm2.handle).fields)
    out.append(vmm.psp.platform_status().fields)
    out.append(vmm.psp.check_all().fields)
    return out, vmm.mem.read(0, 8 << 20)


def test_same_results_as_inprocess(backend):
    a = _make_vmm("inprocess", backend=backend)
    b = _make_vmm("process", backend=backend)
    try:
        ra, ma = _scenario(a)
        rb, mb = _scenario(b)
    finally:
        a.close()
        b.close()
    assert ra == rb
    assert ma == mb          # the same table pages, byte for byte


def _batch(vmm, vm):
    base = vmm.alloc.alloc(64)
    items = []
    for i in range(64):
        items.append((Cmd.UPDATE_NPT, encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1,
                                             gpa=0x300000 + i * PAGE, hpa=base + i * PAGE,
                                             attrs=3, npages=1)))
    items += [
        (Cmd.UPDATE_NPT, encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1, gpa=0x300000,
                                hpa=vmm.alloc.alloc(1), attrs=3, npages=1)),   # GPA mapped
        (Cmd.UPDATE_NPT, encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1, gpa=0x400000,
                                hpa=base, attrs=3, npages=1)),                 # alias
        (Cmd.UPDATE_NPT, encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1, gpa=0x401000,
                                hpa=vmm.fw_base, attrs=3, npages=1)),          # PSP memory
        (Cmd.UPDATE_NPT, b"\x00" * 5),                                           # short
        (Cmd.UPDATE_NPT, b"\x00" * 500),                                         # > ring slot
        (0x99, b""), (0xFFFF_FFFF, b""), (-1, b""), (1 << 40, b""),
        (Cmd.GUEST_STATUS, encode(Cmd.GUEST_STATUS, handle=vm.handle)),
    ]
    return items


def test_call_batch_matches_calls(backend):
    res = {}
    for kind in ("inprocess", "process"):
        v = _make_vmm(kind, backend=backend)
        try:
            vm = v.create_vm()
            v._donate_pool(64)
            out = v.transport.call_batch(_batch(v, vm))
            res[kind] = (out, v.psp.guest_status(vm.handle).digest)
        finally:
            v.close()
    assert res["process"] == res["inprocess"]
    out = res["process"][0]
    assert [st for st, _ in out[:64]] == [0] * 64
    assert [st for st, _ in out[64:73]] == [
        Status.GPA_MAPPED, Status.PAGE_OWNED, Status.FIRMWARE_PAGE, Status.INVALID_LENGTH,
        Status.INVALID_LENGTH, Status.INVALID_COMMAND, Status.INVALID_COMMAND,
        Status.INVALID_COMMAND, Status.INVALID_COMMAND]
    assert out[-1][0] == 0 and len(out[-1][1]) == 96


def test_call_batch_larger_than_ring(vmm):
    n = L.RING_ENTRIES * 2 + 17
    out = vmm.transport.call_batch([(Cmd.NOP, b"")] * n + [(Cmd.NOP, b"x")])
    assert len(out) == n + 1
    assert out[:n] == [(0, b"")] * n and out[n][0] == Status.INVALID_LENGTH
    assert vmm.transport.call_batch([]) == []


def _mixed_ring(vmm, vm, n):
    """n ring items mixing NOPs, UPDATE_NPTs (new, remapped, refused) and malformed
    entries; deterministic for two VMMs set up the same way."""
    base = vmm.alloc.alloc(n)
    gs = encode(Cmd.GUEST_STATUS, handle=vm.handle)
    items = []
    for i in range(n):
        upd = encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1, gpa=0x800000 + (i // 14) * PAGE,
                     hpa=base + i * PAGE, attrs=3, npages=1)
        items.append([
            (Cmd.NOP, b""),
            (Cmd.UPDATE_NPT, upd),
            (int(Cmd.UPDATE_NPT), bytearray(upd)),          # the same GPA: GPA_MAPPED
            (Cmd.NOP, b"\x00" * (L.RE_IN_SIZE + 1)),        # in_len beyond the ring slot
            (Cmd.UPDATE_NPT, memoryview(upd + b"\xff" * 300)),
            (Cmd.NOP, b"\x00" * (L.CMD_BUF_SIZE + 7)),      # beyond the command buffer too
            (0x99, b""), (0xFFFF_FFFF, b"xyz"), (-1, b""), (1 << 40, upd), (7.0, b""),
            (Cmd.GUEST_STATUS, gs),                         # 96 bytes out
            (Cmd.UPDATE_NPT, upd[:5]),                      # short
            (Cmd.UPDATE_NPT, encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1,
                                    gpa=0x40_0000_0000 + i * PAGE, hpa=vmm.fw_base,
                                    attrs=3, npages=1)),    # PSP memory
        ][i % 14])
    return items


def _ring_vs_calls(backend, kind, n):
    """The same items through call_batch on one VMM and call() one by one on a
    twin: the statuses, outputs and resulting table are the same."""
    res = []
    for batch in (True, False):
        v = _make_vmm(kind, backend=backend)
        try:
            vm = v.create_vm()
            v._donate_pool(max(64, n // 256 + 16))
            items = _mixed_ring(v, vm, n)
            if batch:
                out = v.transport.call_batch(items)
            else:
                out = [v.transport.call(c, b) for c, b in items]
            res.append((out, v.psp.guest_status(vm.handle).fields))
        finally:
            v.close()
    (ring, gs_ring), (calls, gs_calls) = res
    assert len(ring) == n
    for i, (a, b) in enumerate(zip(ring, calls)):
        assert a == b, (i, a, b)
        assert type(a[0]) is int and type(a[1]) is bytes
    assert gs_ring == gs_calls
    return ring


def test_ring_matches_calls_one_by_one(backend, psp_transport):
    out = _ring_vs_calls(backend, psp_transport, 14 * 9)
    st = [s for s, _ in out]
    assert st[0] == 0 and out[1][0] == 0 and len(out[1][1]) > 0
    assert Status.INVALID_LENGTH in st and Status.INVALID_COMMAND in st
    assert Status.GPA_MAPPED in st and Status.FIRMWARE_PAGE in st
    assert out[11][0] == 0 and len(out[11][1]) == 96


def test_ring_larger_than_ring_matches_calls(backend, psp_transport):
    out = _ring_vs_calls(backend, psp_transport, 2 * L.RING_ENTRIES + 33)
    assert len({s for s, _ in out}) > 3


@pytest.mark.parametrize("kind", ["nop", "update"])
def test_uniform_rings(vmm, kind):
    """The all-alike fast paths (one status, one out_len) of reading a ring back."""
    t = vmm.transport
    vm = vmm.create_vm()
    vmm._donate_pool(64)
    n = L.RING_ENTRIES + 5
    if kind == "nop":
        items = [(Cmd.NOP, b"")] * n
    else:
        base = vmm.alloc.alloc(n)
        items = [(Cmd.UPDATE_NPT, encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1,
                                         gpa=0x1000_0000 + i * PAGE, hpa=base + i * PAGE,
                                         attrs=3, npages=1)) for i in range(n)]
    fw_before = vmm.psp.platform_status().commands
    process = t.name == "process"
    if process:
        before = t.psp_commands()
    out = t.call_batch(items)
    if process:
        assert t.psp_commands() == before + n
        assert t._w32[L.I_RING_DONE] == n - L.RING_ENTRIES      # the last chunk's progress
    assert vmm.psp.platform_status().commands == fw_before + 1 + n
    assert [st for st, _ in out] == [0] * n
    if kind == "nop":
        assert out == [(0, b"")] * n
    else:
        assert len({len(o) for _, o in out}) == 1 and len(out[0][1]) > 0   # one out_len
        # again: every page is mapped now; one refusal status for all
        assert t.call_batch(items) == [(Status.PAGE_OWNED, b"")] * n
    assert t.last_fw_ns > 0


def test_ring_entries_not_done_are_internal_errors(vmm):
    """Reading a ring back: an entry without DONE is INTERNAL_ERROR (no output),
    out_len beyond the out buffer is clamped, a shorter one is trimmed."""
    t = vmm.transport
    mm, base = t._ring.buf, t._ring.off      # the mailbox's ring, or the in-process one

    def entry_off(i):
        return base + i * L.RING_ENTRY_SIZE
    k = 6
    with t._lock:
        for i, (st, n, out) in enumerate([
                (L.DONE | 0, 8, b"A" * 8), (L.DONE | 3, 0, b""), (7, 8, b"C" * 8),
                (L.DONE | 0, 1000, b"D" * L.RE_OUT_SIZE), (L.DONE | 0xFFFF, 2, b"EE"),
                (0, 0, b"")]):
            e = entry_off(i)
            L.ENTRY_RESULT.pack_into(mm, e + L.RE_STATUS, st, n)
            mm[e + L.RE_OUT:e + L.RE_OUT + L.RE_OUT_SIZE] = out.ljust(L.RE_OUT_SIZE, b"z")
        assert t._ring_results(k) == [
            (0, b"A" * 8), (3, b""), (Status.INTERNAL_ERROR, b""), (0, b"D" * L.RE_OUT_SIZE),
            (0xFFFF, b"EE"), (Status.INTERNAL_ERROR, b"")]
        for i in range(k):                    # all alike but not done
            L.ENTRY_RESULT.pack_into(mm, entry_off(i) + L.RE_STATUS, 5, 4)
        assert t._ring_results(k) == [(Status.INTERNAL_ERROR, b"")] * k
        for i in range(k):                    # all alike, out_len beyond the buffer
            L.ENTRY_RESULT.pack_into(mm, entry_off(i) + L.RE_STATUS, L.DONE | 2, 999)
        assert t._ring_results(k) == [(2, o.ljust(L.RE_OUT_SIZE, b"z")) for o in (
            b"A" * 8, b"", b"C" * 8, b"D" * L.RE_OUT_SIZE, b"EE", b"")]
    assert t.call(Cmd.NOP, b"") == (0, b"")


def test_server_ring_in_one_firmware_call(backend):
    """Server._ring hands the ring region to Psp.run_ring: every entry answered,
    progress and the command count right, no memoryview left on the mailbox."""
    import mmap
    from psp_firmware.psp import Psp
    from psp_firmware.server import Server
    mem, mem2 = HostMemory(64 << 20), HostMemory(64 << 20)
    mbox = mmap.mmap(-1, L.REGION_SIZE)
    r, w = os.pipe()
    try:
        psp = Psp(mem.buf, backend=backend)
        twin = Psp(mem2.buf, backend=backend)        # the same commands, one by one
        srv = Server(mbox, psp, r, w, r)
        assert not srv.hooks
        items = [(Cmd.NOP, b""), (Cmd.NOP, b"x"), (0x99, b""), (Cmd.PLATFORM_STATUS, b""),
                 (Cmd.NOP, b"\x00" * 200)] * 7
        for i, (cmd, buf) in enumerate(items):
            e = L.entry_off(i)
            L.ENTRY_ALL.pack_into(mbox, e, cmd, len(buf), 0, 0)
            mbox[e + L.RE_IN:e + L.RE_IN + min(len(buf), L.RE_IN_SIZE)] = buf[:L.RE_IN_SIZE]
        srv._ring(len(items))
        assert srv.commands == len(items) and srv.w32[L.I_RING_DONE] == len(items)
        assert srv.fw_ns > 0
        for i, (cmd, buf) in enumerate(items):
            st, n = L.ENTRY_RESULT.unpack_from(mbox, L.entry_off(i) + L.RE_STATUS)
            o = L.entry_off(i) + L.RE_OUT
            assert st & L.DONE
            expect = twin.mailbox(int(cmd), buf)     # long entries too: the same answer
            assert (st & L.STATUS_MASK, mbox[o:o + n]) == expect, i
        srv.w32.release()
        srv.w64.release()
        mbox.close()                       # BufferError if a view were left
    finally:
        os.close(r)
        os.close(w)
        mem.close()
        mem2.close()


def test_vmm_beside_reads_the_vmm_cpu():
    """_VmmBeside: True when the process it watches last ran on our CPU, False
    on another CPU, and False (spin as before) when it cannot tell."""
    from psp_firmware.server import _VmmBeside
    cpus = sorted(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    child = None
    try:
        os.sched_setaffinity(0, {cpus[0]})
        me = _VmmBeside(os.getpid())
        assert me.now() and me.now()
        me.close()
        assert not me.now()                    # closed: cannot tell
        if len(cpus) > 1:
            child = subprocess.Popen(
                [sys.executable, "-c", "import sys, time; print(1, flush=True); time.sleep(60)"],
                stdout=subprocess.PIPE, preexec_fn=lambda: os.sched_setaffinity(0, {cpus[1]}))
            assert child.stdout.readline().strip() == b"1"
            other = _VmmBeside(child.pid)
            assert not other.now()
            other.close()
    finally:
        os.sched_setaffinity(0, saved)
        if child is not None:
            child.kill()
            child.wait()
            child.stdout.close()
    gone = _VmmBeside(0x7FFF_FFFF)             # no such process
    assert gone.fd is None and not gone.now()


def test_server_after_a_ring_sleeps_at_once_beside_the_vmm(backend):
    """After a ring, a server that finds the VMM on its own CPU blocks on the
    doorbell at once instead of spinning (spinning there only keeps the VMM
    from running); after a single command it does not even ask."""
    import mmap
    from psp_firmware.psp import Psp
    from psp_firmware.server import Server

    class Beside:
        calls = 0

        def now(self):
            self.calls += 1
            return True

    mem = HostMemory(16 << 20)
    mbox = mmap.mmap(-1, L.REGION_SIZE)
    req = os.eventfd(0, os.EFD_NONBLOCK)
    resp = os.eventfd(0, os.EFD_NONBLOCK)
    life_r, life_w = os.pipe()
    beside = Beside()
    srv = Server(mbox, Psp(mem.buf, backend=backend), req, resp, life_r, spin_s=600.0)
    w32, w64 = srv.w32, srv.w64
    out = []
    th = threading.Thread(target=lambda: out.append(srv._serve(beside)), daemon=True)
    th.start()

    def request(op, count=0):
        L.REQ_HDR.pack_into(mbox, L.OFF_CMD, int(Cmd.NOP), 0, op, count)
        seq = w64[L.Q_REQ_SEQ] + 1
        w64[L.Q_REQ_SEQ] = seq
        if w32[L.I_PSP_SLEEPING]:
            os.write(req, (1).to_bytes(8, "little"))
        end = time.monotonic() + 60
        while w64[L.Q_DONE_SEQ] != seq and time.monotonic() < end:
            time.sleep(0.001)
        assert w64[L.Q_DONE_SEQ] == seq

    try:
        request(L.OP_CMD)
        time.sleep(0.05)
        assert beside.calls == 0 and not w32[L.I_PSP_SLEEPING]   # spins (600 s)
        for i in range(3):
            L.ENTRY_ALL.pack_into(mbox, L.entry_off(i), int(Cmd.NOP), 0, 0, 0)
        request(L.OP_RING, 3)
        end = time.monotonic() + 60
        while not w32[L.I_PSP_SLEEPING] and time.monotonic() < end:
            time.sleep(0.001)
        assert w32[L.I_PSP_SLEEPING] and beside.calls == 1       # asleep, not spinning
        assert [L.ENTRY_RESULT.unpack_from(mbox, L.entry_off(i) + L.RE_STATUS)[0]
                for i in range(3)] == [L.DONE] * 3
        request(L.OP_SHUTDOWN)
        th.join(60)
        assert out == ["shutdown"]
    finally:
        if th.is_alive():
            os.close(life_w)                   # EOF on the life pipe: it returns
            life_w = None
            th.join(60)
        w32.release()
        w64.release()
        srv.w32 = srv.w64 = None
        mbox.close()
        for fd in (req, resp, life_r, life_w):
            if fd is not None:
                os.close(fd)
        mem.close()


def test_bad_batch_item_raises_before_anything_runs(vmm):
    t = vmm.transport
    fw_before = vmm.psp.platform_status().commands
    if t.name == "process":
        before = t.psp_commands()
    for bad in ((Cmd.NOP, None), (Cmd.NOP,), (Cmd.NOP, b"", 1), ("x", b""), 17,
                (float("nan"), b""), (Cmd.NOP, "text")):
        for n in (L.RING_ENTRIES + 10, 10):      # several chunks; one, packed in place
            with pytest.raises((TypeError, ValueError)):
                t.call_batch([(Cmd.NOP, b"")] * n + [bad])
    if t.name == "process":
        assert t.psp_commands() == before
    assert vmm.psp.platform_status().commands == fw_before + 1
    assert t.call_batch(iter([(Cmd.NOP, b"")] * 3)) == [(0, b"")] * 3


def test_malformed_buffers_through_transport(pvmm):
    t = pvmm.transport
    assert t.call(Cmd.UPDATE_NPT, b"\xff" * (L.CMD_BUF_SIZE + 100))[0] == Status.INVALID_LENGTH
    assert t.call(Cmd.NOP, b"\x00" * L.CMD_BUF_SIZE)[0] == Status.INVALID_LENGTH
    for cmd in (-5, 1 << 33, 0xFFFF_FFFF, 0x40, 0):
        assert t.call(cmd, b"")[0] == Status.INVALID_COMMAND
    for cmd in Cmd:
        for buf in (b"", b"\x01", b"\xff" * 31, os.urandom(33), os.urandom(200)):
            st, out = t.call(cmd, buf)
            assert isinstance(st, int) and 0 <= st <= 0xFFFF
    assert t.alive and t.call(Cmd.NOP, b"") == (0, b"")


def test_lying_mailbox_fields_give_status(pvmm):
    """The VMM owns the mailbox memory: garbage in every field only gives status codes."""
    t = pvmm.transport
    mm = t._mm
    with t._lock:
        # in_len beyond the command buffer
        L.CMD_HDR.pack_into(mm, L.OFF_CMD, int(Cmd.NOP), 0xFFFF_FFFF)
        t._submit(L.OP_CMD, 0)
        assert L.U32.unpack_from(mm, L.OFF_STATUS)[0] == L.DONE | Status.INVALID_LENGTH
        # unknown op
        t._submit(77, 0)
        assert L.U32.unpack_from(mm, L.OFF_STATUS)[0] == L.DONE | Status.INVALID_COMMAND
        # ring count beyond the ring
        t._submit(L.OP_RING, L.RING_ENTRIES + 1)
        assert L.U32.unpack_from(mm, L.OFF_STATUS)[0] == L.DONE | Status.INVALID_LENGTH
        # ring entries with lying lengths and garbage
        e = L.entry_off(0)
        L.ENTRY_HDR.pack_into(mm, e, int(Cmd.UPDATE_NPT), 0x8000_0000)
        L.ENTRY_HDR.pack_into(mm, e + L.RING_ENTRY_SIZE, int(Cmd.UPDATE_NPT), L.RE_IN_SIZE)
        mm[e + L.RING_ENTRY_SIZE + L.RE_IN:e + L.RING_ENTRY_SIZE + L.RE_IN + L.RE_IN_SIZE] = \
            os.urandom(L.RE_IN_SIZE)
        t._submit(L.OP_RING, 2)
        assert L.U32.unpack_from(mm, L.OFF_STATUS)[0] == L.DONE | Status.SUCCESS
        assert L.U32.unpack_from(mm, e + L.RE_STATUS)[0] == L.DONE | Status.INVALID_LENGTH
        assert L.U32.unpack_from(mm, e + L.RING_ENTRY_SIZE + L.RE_STATUS)[0] == \
            L.DONE | Status.INVALID_LENGTH
        # the done bit is set by the PSP, not left from before
        L.U32.pack_into(mm, L.OFF_STATUS, 0)
        t._submit(L.OP_SHUTDOWN + 1000, 0)
        assert L.U32.unpack_from(mm, L.OFF_STATUS)[0] & L.DONE
    assert t.alive and t.call(Cmd.NOP, b"") == (0, b"")
    assert pvmm.psp.platform_status().ok


def test_commands_from_threads_are_serialized(vmm):
    vm = vmm.create_vm()
    errors = []
    gs = encode(Cmd.GUEST_STATUS, handle=vm.handle)

    def worker(k):
        try:
            for i in range(50):
                assert vmm.transport.call(Cmd.NOP, b"") == (0, b"")
                st, out = vmm.transport.call(Cmd.GUEST_STATUS, gs)
                assert st == 0 and len(out) == 96
                out = vmm.transport.call_batch([(Cmd.NOP, b"")] * (k + i % 5) + [
                    (Cmd.GUEST_STATUS, gs), (0x99, b"")])
                assert out == [(0, b"")] * (k + i % 5) + [(0, out[-2][1]), (Status.INVALID_COMMAND, b"")]
                assert len(out[-2][1]) == 96
        except Exception as e:     # pragma: no cover - reported below
            errors.append(e)
    ths = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors


def test_needs_shared_memory():
    with pytest.raises(ValueError):
        ProcessTransport(HostMemory(64 << 20))


# ---------------------------------------------------------------------------
# faults: crash, kill, hang; never a hang, never a zombie

def _expect_dead(vmm, vm, limit):
    pid = vmm.transport.pid
    t0 = time.monotonic()
    with pytest.raises(PspDead) as ei:
        for i in range(100000):
            vmm.touch(vm, 0x10000000 + i * PAGE)
    took = time.monotonic() - t0
    assert took < limit, took
    assert ei.value.status == Status.PSP_DEAD
    assert _reaped(pid), "the PSP process is still there (zombie?)"
    # every later command fails with the same exception, without waiting for
    # another timeout (the transport remembers the PSP is dead)
    assert vmm.transport._dead is not None
    with pytest.raises(PspDead):
        vmm.psp.nop()
    vmm.close()
    return ei.value


def test_kill9_is_noticed_at_once():
    v = _make_vmm(psp_timeout=5.0)
    vm = v.create_vm()
    v.touch(vm, 0)
    os.kill(v.transport.pid, signal.SIGKILL)
    e = _expect_dead(v, vm, 1.0)       # the pidfd, not the timeout
    assert "SIGKILL" in str(e)


def test_kill9_during_a_call():
    v = _make_vmm(psp_timeout=5.0)
    vm = v.create_vm()
    pid = v.transport.pid
    os.kill(pid, signal.SIGSTOP)                   # the call below will be waiting
    threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(PspDead):
        v.touch(vm, 0x1000)
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert _reaped(pid)
    v.close()


def test_sigstop_hang_times_out_and_is_reaped():
    v = _make_vmm(psp_timeout=0.5)
    vm = v.create_vm()
    v.touch(vm, 0)
    pid = v.transport.pid
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    e = _expect_dead(v, vm, 2.0)
    assert time.monotonic() - t0 >= 0.5
    assert "did not answer within 0.5 s" in str(e)


def test_crash_on_purpose(monkeypatch):
    monkeypatch.setenv("HV_PSP_TEST_CRASH_AFTER", "10")
    v = _make_vmm(psp_timeout=5.0)
    vm = v.create_vm()
    e = _expect_dead(v, vm, 2.0)
    assert "SIGSEGV" in str(e)


def test_hang_on_purpose(monkeypatch):
    monkeypatch.setenv("HV_PSP_TEST_HANG_AFTER", "10")
    v = _make_vmm(psp_timeout=0.3)
    vm = v.create_vm()
    _expect_dead(v, vm, 1.5)


def test_crash_in_the_middle_of_a_ring(monkeypatch):
    monkeypatch.setenv("HV_PSP_TEST_CRASH_AFTER", "100")
    v = _make_vmm()
    pid = v.transport.pid
    with pytest.raises(PspDead):
        v.transport.call_batch([(Cmd.NOP, b"")] * 500)
    assert _reaped(pid)
    v.close()


def test_ring_timeout_restarts_on_progress(monkeypatch):
    """A long ring that makes progress is not declared dead; a stalled one is."""
    monkeypatch.setenv("HV_PSP_TEST_HANG_AFTER", "400")
    v = _make_vmm(psp_timeout=0.4)
    t0 = time.monotonic()
    with pytest.raises(PspDead):
        v.transport.call_batch([(Cmd.NOP, b"")] * 1000)
    assert time.monotonic() - t0 < 2.0
    v.close()


def test_close_stops_and_reaps_the_child(pvmm):
    pid = pvmm.transport.pid
    pvmm.close()
    assert _reaped(pid)
    pvmm.close()                                   # twice is fine
    with pytest.raises(PspDead):
        pvmm.transport.call(Cmd.NOP, b"")


def test_finalizer_without_close():
    import gc
    v = _make_vmm()
    pid = v.transport.pid
    del v
    gc.collect()
    assert _wait_gone(pid, 3.0) and _reaped(pid)


def test_startup_failure_is_psp_dead():
    mem = HostMemory(64 << 20, shared=True)
    with pytest.raises(PspDead) as ei:
        ProcessTransport(mem, integrity="no-such-mode")
    assert "failed to start" in str(ei.value)


_VMM_DIES = textwrap.dedent("""
    import os, sys, threading, signal
    sys.path.insert(0, {root!r})
    from hv import Vmm
    box = {{}}
    def make():
        box["v"] = Vmm(host_mem=64 << 20, psp="process")
    if {in_thread}:
        th = threading.Thread(target=make); th.start(); th.join()
    else:
        make()
    print(box["v"].transport.pid, flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL) if {kill} else os._exit(0)
""")


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "other-thread"])
@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "exit"])
def test_psp_exits_when_the_vmm_does(in_thread, kill):
    code = _VMM_DIES.format(root=ROOT, in_thread=in_thread, kill=kill)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    assert not _gone(pid)
    p.stdin.write("\n")
    p.stdin.flush()
    p.wait(10)
    assert _wait_gone(pid, 3.0), "the PSP process outlived its VMM"


# ---------------------------------------------------------------------------
# isolation: no path from the VMM process to the PSP's private state

def _psp_classes():
    import enum
    import importlib
    import inspect
    import pkgutil

    import psp_firmware
    classes = []
    for m in pkgutil.iter_modules(psp_firmware.__path__):
        if m.name == "server":
            continue
        mod = importlib.import_module(f"psp_firmware.{m.name}")
        for _, c in inspect.getmembers(mod, inspect.isclass):
            if c.__module__ == mod.__name__ and not issubclass(c, (enum.Enum, BaseException)):
                classes.append(c)
    return tuple(classes)


def test_no_psp_object_reachable_from_the_vmm(pvmm):
    import gc
    classes = _psp_classes()
    names = {c.__name__ for c in classes}
    assert {"Psp", "Guest", "FrameTable", "ShadowNpt"} <= names
    vm = pvmm.create_vm()
    for i in range(20):
        pvmm.touch(vm, i * PAGE)
    seen, stack = set(), [pvmm]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type) or type(o).__name__ == "module":
            continue
        seen.add(id(o))
        assert not isinstance(o, classes), f"VMM reaches a {type(o).__name__}"
        stack.extend(gc.get_referents(o))
    assert len(seen) > 20


_ISOLATION = textwrap.dedent("""
    import gc, importlib, os, pkgutil, re, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import hv, psp_firmware
    # whatever it imports: every module of both packages
    for pkg in (hv, psp_firmware):
        for m in pkgutil.iter_modules(pkg.__path__):
            if m.name in ("__main__", "server"):
                continue
            try:
                importlib.import_module(pkg.__name__ + "." + m.name)
            except Exception:
                pass
    from test_psp_process import _psp_classes
    from hv import Vmm
    from nptcore.bits import ACC_W
    classes = _psp_classes()
    v = Vmm(host_mem=128 << 20, psp="process")
    vm = v.create_vm()
    v.load_page(vm, 0x100000, b"kernel")
    for i in range(64):
        v.touch(vm, 0x200000 + i * 4096, ACC_W)
    try:
        import hv.attacks as A
        cfg = A.AttackConfig(psp="process") if "psp" in A.AttackConfig.__dataclass_fields__ else None
        if cfg is not None:
            for r in A.run_scenarios(["severed_remap", "map_psp_memory", "race_concurrent_commands"], cfg):
                print("attack", r, file=sys.stderr)
    except Exception as e:
        print("attack library:", type(e).__name__, e, file=sys.stderr)
    gc.collect()
    found = [type(o).__name__ for o in gc.get_objects() if isinstance(o, classes)]
    assert not found, found
    # the VMM's whole writable memory (host memory and mailbox aside), before it asks
    mbox_before = bytes(v.transport._mm)
    dump = bytearray()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            f = line.split()
            if "w" not in f[1] or (len(f) > 5 and "memfd:" in line):
                continue
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            if f[-1] == "[vvar]" or hi - lo > (1 << 30):
                continue
            try:
                mem.seek(lo)
                dump += mem.read(hi - lo)
            except OSError:
                pass
    dump = bytes(dump)
    st = v.psp.guest_status(vm.handle)
    assert st.ok
    digest = st.digest
    assert len(digest) == 32 and digest != bytes(32)
    assert digest not in dump, "digest found in VMM memory before GUEST_STATUS"
    assert digest not in mbox_before and digest not in v.mem.buf
    assert digest in bytes(v.transport._mm)       # it arrived through the mailbox
    print("dumped", len(dump), "bytes; isolated")
    v.close()
""")


def test_isolation_in_a_fresh_vmm_process():
    code = _ISOLATION.format(root=ROOT, tests=os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "isolated" in r.stdout


def test_child_imports_no_hv_and_is_not_dumpable(pvmm):
    pid = pvmm.transport.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"psp_firmware.server" in argv
    # the child is a fresh interpreter: its parent is us, it was never forked from us
    with open(f"/proc/{pid}/status") as f:
        st = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)
    assert int(st["PPid"]) == os.getpid()
    if os.geteuid() != 0:       # root (CAP_SYS_PTRACE) reads any process; others may not
        with pytest.raises(PermissionError):
            open(f"/proc/{pid}/mem", "rb").read(1)
    r = subprocess.run([sys.executable, "-c",
                        "import sys, psp_firmware.server, psp_firmware.psp; "
                        "print(sorted(m for m in sys.modules if m == 'hv' or m.startswith('hv.')))"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# ---------------------------------------------------------------------------
# figures for `hv bench`

def test_measure_roundtrip_keys():
    for kind in ("inprocess", "process"):
        r = measure_roundtrip(kind, n=200, batch=32, rounds=2)
        for k in ("roundtrip_us_median", "roundtrip_us_p99", "ring_us_per_cmd",
                  "ring_nop_us_per_cmd", "update_us_per_cmd"):
            assert r[k] > 0, (kind, k, r)
    assert r["roundtrip_transport_us_median"] < r["roundtrip_us_median"]


def test_bench_figures_keys():
    from hv.bench.psp import bench_psp_figures
    f = bench_psp_figures(n=100, batch=16, rounds=1)
    for k in ("psp_roundtrip_us_process", "psp_roundtrip_us_inprocess", "psp_ring_us_per_cmd"):
        assert isinstance(f[k], float) and f[k] > 0


@pytest.mark.parametrize("moving", [True, False])
def test_vmm_keeps_spinning_while_a_ring_progresses(moving):
    """ProcessTransport._wait on a ring: past its spin it keeps spinning while
    the PSP's progress word moves, and sleeps (_block) once it stops moving;
    a single command sleeps after its spin as before. A fake mailbox: a
    thread moves the progress word every 2 ms for 0.6 s, then answers;
    the spin is 0.2 s, so the margins are wide."""
    import array
    t = ProcessTransport.__new__(ProcessTransport)
    w32, w64 = array.array("I", bytes(4 * 64)), array.array("Q", bytes(8 * 64))
    t._w32, t._w64, t.spin_s, t.timeout = w32, w64, 0.2, 5.0
    blocked = []

    def block(seq):
        blocked.append(seq)
        while w64[L.Q_DONE_SEQ] != seq:
            time.sleep(0.001)
    t._block = block

    def psp():
        for i in range(300):
            if moving:
                w32[L.I_RING_DONE] = i + 1
            time.sleep(0.002)
        w64[L.Q_DONE_SEQ] = 7
    th = threading.Thread(target=psp)
    th.start()
    t._wait(7, True)
    th.join()
    assert blocked == ([] if moving else [7])
    w64[L.Q_DONE_SEQ] = 0
    th = threading.Thread(target=psp)
    th.start()
    t._wait(7, False)                 # one command: no progress word to follow
    th.join()
    assert blocked[-1] == 7 and len(blocked) == (1 if moving else 2)
