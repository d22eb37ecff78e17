"""The PSP in its own process, behind a shared-memory mailbox (`--psp process`).

A secure processor's private memory is out of the hypervisor's reach because
it is a different chip. Here the firmware runs in a child process started
with a fresh interpreter (`python -m psp_firmware.server`, never a fork of
the VMM), so that its frame table, digests and measurements exist only in
that process: nothing in the VMM process, whatever it imports, holds a
reference to them. The VMM shares two things with it: host memory (the
memfd of `HostMemory(shared=True)`) and the mailbox region
(`psp_firmware.mailbox_layout`, its own memfd), plus two eventfd doorbells
and a "life pipe" whose EOF tells the child that the VMM is gone.

`ProcessTransport.call(cmd, buf) -> (status, out)` and
`call_batch([(cmd, buf), ...]) -> [(status, out), ...]` (the CSV-style
ring: one doorbell for the whole batch, one status per entry) have the
same shape as `hv.mailbox.InProcessTransport`.

Faults: if the child crashes, is killed, or does not answer within
`timeout` seconds, the transport kills it (SIGKILL), reaps it (no zombie)
and raises `PspDead` (`.status == Status.PSP_DEAD`); callers map that to
exit_reason psp_dead / exit code 1. Every later call raises PspDead at once.
"""
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref

from psp_firmware import mailbox_layout as L
from psp_firmware.status import Status

from hv.psp_link.ring import Ring
from hv.errors import VmStopped

_ONE = (1).to_bytes(8, "little")
_U32_MAX = 0xFFFF_FFFF
# hot-path constants as module globals (no attribute lookups per call)
_req_pack = L.REQ_HDR.pack_into
_status_unpack = L.STATUS_HDR.unpack_from
_OFF_CMD, _OFF_STATUS = L.OFF_CMD, L.OFF_STATUS
_CMD_BUF, _CMD_CAP = L.CMD_BUF, L.CMD_BUF_SIZE
_OUT_BUF, _OUT_CAP = L.OUT_BUF, L.OUT_BUF_SIZE
_Q_REQ, _Q_DONE, _I_PSP_SLEEPING = L.Q_REQ_SEQ, L.Q_DONE_SEQ, L.I_PSP_SLEEPING
_I_RING_DONE = L.I_RING_DONE
_OP_CMD, _OP_RING = L.OP_CMD, L.OP_RING
_STATUS_MASK, _DONE = L.STATUS_MASK, L.DONE
_RING_OFF = L.RING_OFF
_Q_FW_NS = L.Q_FW_NS
_TIGHT_SPIN = 64                # loads of done_seq before the yielding spin
_SUCCESS = int(Status.SUCCESS)


class PspDead(VmStopped):
    """The PSP process crashed, was killed, or stopped answering.

    A VmStopped (the VM cannot go on) with status PSP_DEAD, so every caller
    that stops a VM on a refusal stops it here too; callers that know it
    report exit_reason "psp_dead", exit code 1."""

    exit_reason = "psp_dead"

    def __init__(self, msg, returncode=None):
        super().__init__(Status.PSP_DEAD, msg)
        self.returncode = returncode


def _default_spin_us():
    # spinning only helps when the child has a CPU of its own
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count() or 1
    return 50.0 if ncpu > 1 else 0.0


def _describe_exit(rc):
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


def _shutdown(state):
    """Finalizer (also close()): stop the child, reap it, release everything.

    Holds no reference to the transport, so it can run from weakref/atexit."""
    proc = state.get("proc")
    life_w = state.pop("life_w", None)
    if proc is not None and proc.returncode is None:
        if life_w is not None:
            try:
                os.close(life_w)         # EOF on the life pipe: the child exits
                life_w = None
            except OSError:
                pass
        try:
            os.write(state["req"], _ONE)
        except (OSError, KeyError):
            pass
        try:
            proc.wait(timeout=state.get("grace", 1.0))
        except subprocess.TimeoutExpired:
            pass
        if proc.returncode is None:
            try:
                proc.kill()
            except OSError:
                pass
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
    if life_w is not None:
        try:
            os.close(life_w)
        except OSError:
            pass
    for key in ("req", "resp", "pidfd"):
        fd = state.pop(key, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    for v in state.pop("views", ()):
        v.release()
    mm = state.pop("mm", None)
    if mm is not None:
        try:
            mm.close()
        except (BufferError, ValueError):
            pass


class ProcessTransport:
    name = "process"

    def __init__(self, mem, backend=None, integrity=None, timeout=5.0, spin_us=None,
                 psp_spin_us=200.0, slice_ms=10.0, periodic_ms=None, startup_timeout=None,
                 python=None, protect="digest", iso=None):
        """protect: the protection design the firmware runs; iso: (base, size)
        of the isolated design's PSP-owned range. The PSP process hands the
        VMM, over a unix socket, the memory it may map read-only
        (shared_regions())."""
        import mmap
        import socket
        if mem.fd is None:
            raise ValueError("the PSP process needs shareable host memory (HostMemory(shared=True))")
        timeout = float(timeout)
        if not timeout > 0:
            raise ValueError(f"--psp-timeout must be > 0, not {timeout}")
        self.timeout = timeout
        self.spin_s = (_default_spin_us() if spin_us is None else float(spin_us)) * 1e-6
        self.slice_s = slice_ms / 1000.0
        self._seq = 0
        self._dead = None
        self._lock = threading.Lock()      # commands are serialized, as the mailbox does
        st = self._state = {"grace": 1.0}
        self._finalizer = weakref.finalize(self, _shutdown, st)

        mbox_fd = os.memfd_create("hv-psp-mailbox", os.MFD_CLOEXEC)
        life_r = None
        self._regions = {}
        fd_sock = fd_peer = None
        try:
            if protect != "digest":
                fd_sock, fd_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            os.ftruncate(mbox_fd, L.REGION_SIZE)
            mm = st["mm"] = mmap.mmap(mbox_fd, L.REGION_SIZE, flags=mmap.MAP_SHARED)
            L.U32.pack_into(mm, L.OFF_MAGIC, L.MAGIC)
            L.U32.pack_into(mm, L.OFF_VERSION, L.VERSION)
            self._mm = mm
            self._w32, self._w64 = L.views(mm)
            ring = self._ring = Ring(mm, _RING_OFF)      # hv.ring: packing, answers
            # its hot methods, bound once (no lookups per call_batch)
            self._ring_chunks, self._ring_results = ring.chunks, ring.results
            st["views"] = (self._w32, self._w64) + ring.views()
            self.last_fw_ns = 0         # firmware ns of the last call_batch (all chunks)
            req = st["req"] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            resp = st["resp"] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            life_r, life_w = os.pipe()
            st["life_w"] = life_w
            self._req, self._resp = req, resp
            pdeathsig = threading.current_thread() is threading.main_thread()
            argv = [python or sys.executable, "-m", "psp_firmware.server",
                    "--mem-fd", str(mem.fd), "--mbox-fd", str(mbox_fd),
                    "--req-fd", str(req), "--resp-fd", str(resp), "--life-fd", str(life_r),
                    "--parent-pid", str(os.getpid()), "--spin-us", str(psp_spin_us)]
            if pdeathsig:
                argv.append("--pdeathsig")   # tied to the creating thread: main thread only
            if backend:
                argv += ["--backend", str(backend)]
            if integrity:
                argv += ["--integrity", str(integrity)]
            if periodic_ms:
                argv += ["--periodic-ms", str(periodic_ms)]
            if protect != "digest":
                argv += ["--protect", str(protect), "--fd-sock", str(fd_peer.fileno())]
                if iso is not None:
                    argv += ["--iso-base", str(iso[0]), "--iso-size", str(iso[1])]
            # the firmware logs as it would in process: same logger level as ours
            argv += ["--log-level", str(logging.getLogger("psp").getEffectiveLevel())]
            env = dict(os.environ)
            root = os.path.dirname(os.path.dirname(os.path.abspath(L.__file__)))
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            proc = st["proc"] = subprocess.Popen(
                argv, pass_fds=(mem.fd, mbox_fd, req, resp, life_r)
                + ((fd_peer.fileno(),) if fd_peer is not None else ()), close_fds=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                start_new_session=True)
        except BaseException:
            if life_r is not None:
                os.close(life_r)
            os.close(mbox_fd)
            for s in (fd_sock, fd_peer):
                if s is not None:
                    s.close()
            self._finalizer()
            raise
        os.close(life_r)
        os.close(mbox_fd)
        if fd_peer is not None:
            fd_peer.close()
        self.proc = proc
        self.pid = proc.pid
        self._poller = select.poll()
        self._poller.register(resp, select.POLLIN)
        self._pidfd = None
        try:
            self._pidfd = st["pidfd"] = os.pidfd_open(proc.pid)
            self._poller.register(self._pidfd, select.POLLIN)
        except (AttributeError, OSError):
            pass
        try:
            self._wait_ready(max(self.timeout, 30.0) if startup_timeout is None
                             else startup_timeout)
            if fd_sock is not None:
                self._regions = _receive_regions(fd_sock)
        finally:
            if fd_sock is not None:
                fd_sock.close()

    # -- lifecycle ------------------------------------------------------------
    def _wait_ready(self, limit):
        deadline = time.monotonic() + limit
        w32 = self._w32
        while w32[L.I_PSP_STATE] != L.STATE_READY:
            now = time.monotonic()
            if now >= deadline:
                self._die(f"PSP process did not start within {limit:g} s")
            for fd, _ in self._poller.poll(min(deadline - now, self.slice_s) * 1000):
                if fd == self._resp:
                    self._drain()
            if self.proc.poll() is not None and w32[L.I_PSP_STATE] != L.STATE_READY:
                self._die(f"PSP process failed to start ({_describe_exit(self.proc.returncode)})")

    def _die(self, msg):
        """Kill and reap the child, release the transport, raise PspDead."""
        proc = self.proc if hasattr(self, "proc") else self._state.get("proc")
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except OSError:
                pass
        rc = None
        if proc is not None:
            try:
                rc = proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        self._dead = msg
        self._finalizer()
        raise PspDead(msg, rc)

    def _check_alive(self):
        if self._dead is not None:
            raise PspDead(self._dead)

    def close(self):
        if self._dead is None:
            self._dead = "the PSP transport is closed"
        self._finalizer()

    @property
    def alive(self):
        return self._dead is None and self.proc.poll() is None

    # -- waiting --------------------------------------------------------------
    def _drain(self):
        try:
            os.read(self._resp, 8)
        except BlockingIOError:
            pass

    def _wait(self, seq, ring=False):
        w64 = self._w64
        if w64[_Q_DONE] == seq:
            return
        if self.spin_s:
            # bounded spin: first a tight one, then with sched_yield so that a
            # PSP process the scheduler woke onto this CPU (wake-affine) runs
            # instead of waiting behind the spinner; with the PSP on another
            # CPU sched_yield returns at once. For a ring the spin goes on
            # while the PSP's progress word moves (it is answering entries, the
            # end is near): a wake-up would cost more than the wait. A stall
            # of one spin_s (the PSP descheduled, a slow entry) still sleeps.
            for _ in range(_TIGHT_SPIN):
                if w64[_Q_DONE] == seq:
                    return
            clock = time.perf_counter
            yield_ = os.sched_yield
            spin = self.spin_s
            end = clock() + spin
            limit = end + self.timeout        # never spin past the PSP timeout
            w32 = self._w32
            last = w32[_I_RING_DONE] if ring else -1
            while True:
                if w64[_Q_DONE] == seq:
                    return
                now = clock()
                if now > end:
                    if not ring or now > limit:
                        break
                    p = w32[_I_RING_DONE]
                    if p == last:
                        break
                    last, end = p, now + spin
                yield_()
        self._block(seq)

    def _block(self, seq):
        w32, w64 = self._w32, self._w64
        w32[L.I_VMM_SLEEPING] = 1
        try:
            progress = w32[L.I_RING_DONE]
            deadline = time.monotonic() + self.timeout
            while True:
                if w64[L.Q_DONE_SEQ] == seq:
                    return
                now = time.monotonic()
                p = w32[L.I_RING_DONE]
                if p != progress:           # a long ring is making progress
                    progress, deadline = p, now + self.timeout
                if now >= deadline:
                    self._die(f"PSP process did not answer within {self.timeout:g} s (killed)")
                gone = False
                for fd, _ in self._poller.poll(min(deadline - now, self.slice_s) * 1000):
                    if fd == self._resp:
                        self._drain()
                    else:
                        gone = True
                if gone or (self._pidfd is None and self.proc.poll() is not None):
                    if w64[L.Q_DONE_SEQ] == seq:
                        return
                    rc = self.proc.wait()
                    self._die(f"PSP process died ({_describe_exit(rc)})")
        finally:
            if self._dead is None:
                w32[L.I_VMM_SLEEPING] = 0

    def _submit(self, op, count):
        """Publish what is in the mailbox as a request with this op; wait for it."""
        L.OP_HDR.pack_into(self._mm, L.OFF_OP, op, count)
        seq = self._seq = self._seq + 1
        self._w64[_Q_REQ] = seq
        if self._w32[_I_PSP_SLEEPING]:
            os.write(self._req, _ONE)
        self._wait(seq, op == _OP_RING)

    # -- the mailbox ----------------------------------------------------------
    def call(self, cmd, buf):
        if type(buf) is not bytes:
            buf = bytes(buf)
        cmd = int(cmd)
        if not 0 <= cmd <= _U32_MAX:
            cmd = _U32_MAX                     # no such command either way
        n = len(buf)
        with self._lock:
            if self._dead is not None:
                raise PspDead(self._dead)
            mm = self._mm
            if n <= _CMD_CAP:
                _req_pack(mm, _OFF_CMD, cmd, n, _OP_CMD, 0)
                if n:
                    mm[_CMD_BUF:_CMD_BUF + n] = buf
            else:                              # the PSP refuses in_len > buffer itself
                _req_pack(mm, _OFF_CMD, cmd, min(n, _U32_MAX), _OP_CMD, 0)
                mm[_CMD_BUF:_CMD_BUF + _CMD_CAP] = buf[:_CMD_CAP]
            seq = self._seq = self._seq + 1
            w64 = self._w64
            w64[_Q_REQ] = seq                  # last: publishes the request
            if self._w32[_I_PSP_SLEEPING]:
                os.write(self._req, _ONE)      # doorbell
            if w64[_Q_DONE] != seq:
                self._wait(seq)
            word, out_len = _status_unpack(mm, _OFF_STATUS)
            if out_len:
                return word & _STATUS_MASK, mm[_OUT_BUF:_OUT_BUF + min(out_len, _OUT_CAP)]
            return word & _STATUS_MASK, b""

    def call_batch(self, items):
        """Ring mode: queue many commands, one doorbell, one status per entry.

        Each chunk of up to RING_ENTRIES entries is packed by one precompiled
        Struct (header, in buffer zero-padded or truncated to the entry's in
        area, status/out_len and out area zeroed) before anything is sent, so
        a bad item raises before any command runs (a batch of one chunk is
        packed straight into the ring); the answers are read back with
        strided views of the ring (no per-entry struct calls)."""
        items = items if type(items) is list else list(items)
        if not items:
            return []
        res = []
        with self._lock:
            if self._dead is not None:
                raise PspDead(self._dead)
            mm = self._mm
            fw = 0
            for k in self._ring_chunks(items):     # all packed before the first is sent
                self._submit(_OP_RING, k)
                fw += self._w64[_Q_FW_NS]
                word = _status_unpack(mm, _OFF_STATUS)[0] & _STATUS_MASK
                if word != _SUCCESS:           # the ring as a whole was refused
                    res.extend([(word, b"")] * k)
                else:
                    res.extend(self._ring_results(k))
            self.last_fw_ns = fw
        return res

    def shared_regions(self):
        """{name: (fd, size, hpa)}: the PSP memory the VMM may map read-only
        (sealed memfds of the PSP process); the caller owns the fds (given once)."""
        out, self._regions = self._regions, {}
        return out

    def psp_commands(self):
        """Commands the PSP process has executed (from its status line)."""
        return self._w64[L.Q_COMMANDS]


# -- measurement (for `hv bench`) ---------------------------------------------


def _receive_regions(sock):
    """The PSP process's one message on the fd socket (sent before it said
    READY): a JSON list of [name, size, hpa] and one fd each (SCM_RIGHTS)."""
    import json
    import socket
    sock.settimeout(5.0)
    msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 8)
    try:
        items = json.loads(msg.decode()) if msg else []
        if len(items) != len(fds):
            raise ValueError(f"{len(items)} regions, {len(fds)} fds")
    except (ValueError, UnicodeDecodeError):
        for fd in fds:
            os.close(fd)
        raise
    return {name: (fd, size, hpa) for (name, size, hpa), fd in zip(items, fds)}

