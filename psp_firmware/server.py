"""The PSP firmware in its own process: `python -m psp_firmware.server`.

Started by the VMM (`hv.psp_process.ProcessTransport`) with a fresh
interpreter (never forked from the VMM), so it holds none of the VMM's
Python objects, and the VMM holds none of its own: the frame table, the
digests and the measurements exist only here. It imports `psp_firmware`
and `nptcore`, never `hv`.

File descriptors it is handed (pass_fds):
  --mem-fd   host memory (a memfd; the whole of it is mapped shared)
  --mbox-fd  the mailbox region (psp_firmware.mailbox_layout)
  --req-fd   eventfd, VMM -> PSP doorbell
  --resp-fd  eventfd, PSP -> VMM doorbell
  --life-fd  read end of a pipe whose write end only the VMM holds: EOF
             means the VMM is gone (or closed the transport), and we exit

Hardening: PR_SET_DUMPABLE 0 (no ptrace or /proc/PID/mem access from an
unprivileged VMM of the same uid), PR_SET_PDEATHSIG SIGKILL (optional),
SIGINT ignored (Ctrl-C is the VMM's business).

Test hooks (environment, read at start):
  HV_PSP_TEST_CRASH_AFTER=N   die by SIGSEGV on receiving command N+1
  HV_PSP_TEST_HANG_AFTER=N    stop answering (sleep) on command N+1
"""
import argparse
import gc
import mmap
import os
import select
import signal
import sys
import time

from . import mailbox_layout as L
from .status import Status

_ONE = (1).to_bytes(8, "little")
_ns = time.perf_counter_ns
# hot-path constants as module globals
_req_unpack = L.REQ_HDR.unpack_from
_status_pack = L.STATUS_HDR.pack_into
_OFF_CMD, _OFF_STATUS = L.OFF_CMD, L.OFF_STATUS
_CMD_BUF, _CMD_CAP = L.CMD_BUF, L.CMD_BUF_SIZE
_OUT_BUF, _OUT_CAP = L.OUT_BUF, L.OUT_BUF_SIZE
_OP_CMD, _OP_RING = L.OP_CMD, L.OP_RING
_STATUS_MASK, _DONE = L.STATUS_MASK, L.DONE
_RING_OFF, _RE_SIZE = L.RING_OFF, L.RING_ENTRY_SIZE
_I_RING_DONE, _I_VMM_SLEEPING = L.I_RING_DONE, L.I_VMM_SLEEPING
_Q_COMMANDS, _Q_FW_NS, _Q_DONE_SEQ = L.Q_COMMANDS, L.Q_FW_NS, L.Q_DONE_SEQ
_SUCCESS, _INVALID_LENGTH = int(Status.SUCCESS), int(Status.INVALID_LENGTH)
_INVALID_COMMAND, _INTERNAL_ERROR = int(Status.INVALID_COMMAND), int(Status.INTERNAL_ERROR)
_TIGHT_SPIN = 256                  # loads of req_seq before the yielding spin
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


def _prctl(option, arg):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except Exception:
        return False


def _load_integrity_modes():
    """Import every firmware module so that any registered integrity mode exists."""
    import importlib
    import pkgutil
    import psp_firmware
    for m in pkgutil.iter_modules(psp_firmware.__path__):
        if m.name not in ("server",):
            try:
                importlib.import_module(f"psp_firmware.{m.name}")
            except Exception:
                pass


class Server:
    def __init__(self, mbox, psp, req_fd, resp_fd, life_fd, spin_s=200e-6, slice_s=0.05,
                 vmm_pid=None):
        self.mm = mbox
        self.vmm_pid = os.getppid() if vmm_pid is None else vmm_pid   # the VMM started us
        self.psp = psp
        self.req_fd, self.resp_fd, self.life_fd = req_fd, resp_fd, life_fd
        self.spin_s = spin_s
        self.slice_ms = max(1, int(slice_s * 1000))
        self.commands = 0
        self.fw_ns = 0
        self.after_ring = False          # the last request was a ring (see serve)
        self.mailbox = psp.mailbox
        self.crash_after = _env_int("HV_PSP_TEST_CRASH_AFTER")
        self.hang_after = _env_int("HV_PSP_TEST_HANG_AFTER")
        self.hooks = self.crash_after is not None or self.hang_after is not None
        self.poller = select.poll()
        self.poller.register(req_fd, select.POLLIN)
        self.poller.register(life_fd, select.POLLIN)
        self.w32, self.w64 = L.views(mbox)
        # read before READY is published: a request may arrive right after it
        self.last = self.w64[L.Q_REQ_SEQ]

    # -- one request ----------------------------------------------------------
    def _test_hooks(self):
        if self.crash_after is not None and self.commands >= self.crash_after:
            os.kill(os.getpid(), signal.SIGSEGV)
            os._exit(139)
        if self.hang_after is not None and self.commands >= self.hang_after:
            while True:
                time.sleep(3600)

    def handle(self, seq):
        """Answer the request now in the mailbox. Returns False on OP_SHUTDOWN."""
        mm = self.mm
        self.fw_ns = 0
        cmd, in_len, op, ring_count = _req_unpack(mm, _OFF_CMD)
        self.after_ring = op == _OP_RING
        if op == _OP_CMD:
            if self.hooks:
                self._test_hooks()
            self.commands += 1
            if in_len > _CMD_CAP:
                st, out = _INVALID_LENGTH, b""
            else:
                buf = mm[_CMD_BUF:_CMD_BUF + in_len]   # a copy: the VMM may race us
                t0 = _ns()
                st, out = self.mailbox(cmd, buf)
                self.fw_ns = _ns() - t0
                if len(out) > _OUT_CAP:
                    st, out = _INTERNAL_ERROR, b""
                elif out:
                    mm[_OUT_BUF:_OUT_BUF + len(out)] = out
            _status_pack(mm, _OFF_STATUS, (st & _STATUS_MASK) | _DONE, len(out))
        elif op == _OP_RING:
            if ring_count > L.RING_ENTRIES:
                _status_pack(mm, _OFF_STATUS, _INVALID_LENGTH | _DONE, 0)
            else:
                self._ring(ring_count)
                _status_pack(mm, _OFF_STATUS, _SUCCESS | _DONE, 0)
        elif op == L.OP_SHUTDOWN:
            _status_pack(mm, _OFF_STATUS, _SUCCESS | _DONE, 0)
            self._answer(seq)
            return False
        else:
            _status_pack(mm, _OFF_STATUS, _INVALID_COMMAND | _DONE, 0)
        self._answer(seq)
        return True

    def _ring(self, n):
        """Answer ring entries 0..n-1 (n <= RING_ENTRIES) in one wake-up.

        The firmware's run_ring does the whole ring in one call (with the
        test hooks on, one entry at a time, the hooks called before each)."""
        w32 = self.w32
        w32[_I_RING_DONE] = 0
        hook = self._count_and_hook if self.hooks else None
        ring = memoryview(self.mm)[_RING_OFF:_RING_OFF + n * _RE_SIZE]
        progress = w32[_I_RING_DONE:_I_RING_DONE + 1]
        try:
            self.fw_ns = self.psp.run_ring(ring, n, progress, before_entry=hook)
        finally:
            try:
                progress.release()
                ring.release()      # no export left: the mmap stays closable
            except BufferError:     # run_ring raised and its traceback holds an export:
                pass                # let its own exception through
        if hook is None:
            self.commands += n

    def _count_and_hook(self):
        """Before each ring entry when the test hooks are on: they fire at
        the command they name, as for single commands."""
        self._test_hooks()
        self.commands += 1

    def _answer(self, seq):
        w64 = self.w64
        w64[_Q_COMMANDS] = self.commands
        w64[_Q_FW_NS] = self.fw_ns
        w64[_Q_DONE_SEQ] = seq                       # last: publishes the answer
        if self.w32[_I_VMM_SLEEPING]:
            os.write(self.resp_fd, _ONE)

    # -- the loop -------------------------------------------------------------
    def serve(self):
        beside = _VmmBeside(self.vmm_pid) if self.spin_s else None
        try:
            return self._serve(beside)
        finally:
            if beside is not None:
                beside.close()

    def _serve(self, beside):
        w32, w64 = self.w32, self.w64
        q_req, i_sleep = L.Q_REQ_SEQ, L.I_PSP_SLEEPING
        last = self.last
        clock = time.perf_counter
        while True:
            seq = w64[q_req]
            if seq == last:
                # bounded spin on the request sequence word: tight first, then
                # with sched_yield (a VMM woken onto this CPU runs, not waits);
                # after a ring, none when the VMM shares our CPU (see _VmmBeside)
                spin = self.spin_s
                if spin:
                    for _ in range(_TIGHT_SPIN):
                        seq = w64[q_req]
                        if seq != last:
                            break
                    else:
                        if self.after_ring and beside.now():
                            spin = 0
                deadline = clock() + spin
                yield_ = os.sched_yield
                while seq == last and clock() < deadline:
                    yield_()
                    seq = w64[q_req]
            if seq == last:
                # block on the doorbell (bounded slice: a lost doorbell costs one slice)
                w32[i_sleep] = 1
                seq = w64[q_req]
                if seq == last:
                    for fd, _ev in self.poller.poll(self.slice_ms):
                        if fd == self.life_fd:
                            return "vmm gone"
                        try:
                            os.read(self.req_fd, 8)
                        except BlockingIOError:
                            pass
                w32[i_sleep] = 0
                continue
            last = seq
            if not self.handle(seq):
                return "shutdown"


class _VmmBeside:
    """Whether the VMM's thread last ran on the CPU we run on.

    A scheduler that packs tasks onto few CPUs (as this project's VMs do)
    often wakes the PSP process onto the VMM's CPU. There, spinning on the
    mailbox after a ring only delays the VMM, which has the ring's answers
    to read before it can send anything: sched_yield does not hand the CPU
    to a task that was preempted (EEVDF: it is not eligible), so the VMM got
    it back only when the 200 us spin ended, every ring paying the whole
    spin. The PSP asks this (one pread of /proc/PID/stat, 10-30 us) only
    after a ring and only when no request came in the tight spin; after
    single commands it spins as before (there the question would cost more
    than it saves). Any failure: False (spin as before)."""

    def __init__(self, pid):
        self.fd = None
        self.getcpu = None
        try:
            import ctypes
            self.getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
            self.fd = os.open(f"/proc/{int(pid)}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except Exception:
            self.close()

    def now(self):
        if self.fd is None:
            return False
        try:
            b = os.pread(self.fd, 1024, 0)
            # field 39 (processor): the 37th after the ")" that ends comm
            return int(b[b.rindex(b")") + 2:].split()[36]) == self.getcpu()
        except (OSError, ValueError, IndexError):
            self.close()
            return False

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = None


def _send_regions(fd, regions):
    """Hand the VMM the PSP memory it may map read-only: one message on the
    unix socket `fd`, a JSON list of [name, size, hpa] and the memfds."""
    import json
    import socket
    sock = socket.socket(fileno=fd)
    try:
        items = [[name, size, hpa] for name, (_fd, size, hpa) in regions.items()]
        msg = json.dumps(items).encode()
        if regions:
            socket.send_fds(sock, [msg], [f for f, _s, _h in regions.values()])
        else:
            sock.sendall(msg)
    finally:
        sock.close()


def _env_int(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="psp_firmware.server")
    ap.add_argument("--mem-fd", type=int, required=True)
    ap.add_argument("--mbox-fd", type=int, required=True)
    ap.add_argument("--req-fd", type=int, required=True)
    ap.add_argument("--resp-fd", type=int, required=True)
    ap.add_argument("--life-fd", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, default=None)
    ap.add_argument("--pdeathsig", action="store_true")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--integrity", default=None)
    ap.add_argument("--spin-us", type=float, default=200.0)
    ap.add_argument("--slice-ms", type=float, default=50.0)
    ap.add_argument("--periodic-ms", type=float, default=None)
    ap.add_argument("--log-level", type=int, default=None)
    ap.add_argument("--protect", default="digest")
    ap.add_argument("--iso-base", type=int, default=None)
    ap.add_argument("--iso-size", type=int, default=None)
    ap.add_argument("--fd-sock", type=int, default=None)
    args = ap.parse_args(argv)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.log_level is not None:
        import logging
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("psp").setLevel(args.log_level)
    _prctl(PR_SET_DUMPABLE, 0)
    if args.pdeathsig:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        return 0                      # the VMM died before we got here

    try:
        size = os.fstat(args.mem_fd).st_size
        mem = mmap.mmap(args.mem_fd, size, flags=mmap.MAP_SHARED)
        mbox = mmap.mmap(args.mbox_fd, L.REGION_SIZE, flags=mmap.MAP_SHARED)
        os.close(args.mbox_fd)
        if L.U32.unpack_from(mbox, L.OFF_MAGIC)[0] != L.MAGIC or \
                L.U32.unpack_from(mbox, L.OFF_VERSION)[0] != L.VERSION:
            raise ValueError("mailbox region has a bad magic or version")
        from .guest import INTEGRITY_MODES
        from .designs import make_psp
        if args.integrity is not None and args.integrity not in INTEGRITY_MODES:
            _load_integrity_modes()
        kw = {} if args.integrity is None else {"integrity": args.integrity}
        if args.iso_base is not None:
            kw["iso"] = (args.iso_base, args.iso_size)
        # mem_fd: the PSP keeps its own dup for the scrub's hole probe; seal:
        # the memory the VMM gets to read (isolated: its tables; rmp: the RMP)
        # is sealed against every writer but this process's own mapping
        psp = make_psp(mem, protect=args.protect, seal=True, backend=args.backend,
                       mem_fd=args.mem_fd, **kw)
        os.close(args.mem_fd)
        if args.fd_sock is not None:
            _send_regions(args.fd_sock, psp.shared_regions())
        if args.periodic_ms and hasattr(psp, "start_periodic_check"):
            psp.start_periodic_check(args.periodic_ms)     # the PSP's own timer
    except Exception as e:
        print(f"psp: cannot start: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 2

    srv = Server(mbox, psp, args.req_fd, args.resp_fd, args.life_fd,
                 spin_s=args.spin_us * 1e-6, slice_s=args.slice_ms / 1000.0)
    gc.collect()
    gc.freeze()
    L.U32.pack_into(mbox, L.OFF_PSP_PID, os.getpid())
    srv.w32[L.I_PSP_STATE] = L.STATE_READY
    os.write(args.resp_fd, _ONE)
    try:
        srv.serve()
    finally:
        try:
            srv.w32[L.I_PSP_STATE] = L.STATE_EXITING
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
