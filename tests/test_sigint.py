"""Ctrl-C (SIGINT) during `hv boot`: exit 130 with "hv: interrupted", no
traceback and no "Exception ignored" (a KeyboardInterrupt raised inside a
cffi/ctypes hook used to be swallowed: the guest ran on, or failed), the
PSP process gone, a partial --record named and whole.

The guest is signalled at random moments after it has started to run (its
first serial line is on stdout), for both vCPU hooks and both PSP
transports; a guest that never enters Python (a jmp-to-itself loop on the C
hook) is stopped by the helper thread of hv/machine/sigint.py."""
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("unicorn")

from hv.machine.sigint import SigintGuard  # noqa: E402
from hv.machine.unicorn_vcpu import available_hooks  # noqa: E402
from hv.trace import load_trace  # noqa: E402
from test_loader import make_elf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENV.pop("HV_DEBUG", None)
HOOKS = [pytest.param(h, marks=[] if h in available_hooks() else
                      [pytest.mark.skip(reason=f"{h} hook not built")]) for h in ("c", "python")]
RUNS = 2         # per hook and transport (scripts/ has none: the 10 were run by hand)


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _gone(pid, wait=5.0):
    """The process has exited (no /proc entry, or a zombie nobody reaped yet)."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def interrupt(args, ready=b"\n", delay=(0.0, 0.3), rng=random, ready_on="stdout"):
    """Start `hv ARGS`, wait for `ready` on stdout (or stderr: the guest
    runs), sleep a random delay, send SIGINT; returns (rc, stdout, stderr,
    the PSP-side child processes seen before the signal)."""
    p = subprocess.Popen([sys.executable, "-m", "hv", *map(str, args)], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stream = p.stdout if ready_on == "stdout" else p.stderr
    try:
        first = b""
        deadline = time.monotonic() + 60
        while ready not in first:
            assert time.monotonic() < deadline, f"no {ready!r} on {ready_on}: {first!r}"
            b = os.read(stream.fileno(), 4096)
            assert b, f"hv ended before the guest ran: {p.wait()} {first!r}"
            first += b
        time.sleep(rng.uniform(*delay))
        kids = _children(p.pid)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if ready_on == "stdout":
        return p.returncode, first + out, err.decode(), kids
    return p.returncode, out, (first + err).decode(), kids


def assert_interrupted(rc, err):
    assert rc == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.splitlines()[-1].startswith("hv: interrupted"), err


def test_sigint_during_boot():
    """Both hooks x both transports, RUNS times each, a few at a time."""
    combos = [(h, p) for h in available_hooks() for p in ("inprocess", "process")]

    def one(combo_run):
        (hook, psp), run = combo_run
        rng = random.Random(f"{hook}-{psp}-{run}")
        # memtouch: an NPF per page, so the interrupt lands in the NPF path
        # (the cffi callback, the PSP call) as often as in the emulator
        return (hook, psp), interrupt(["boot", "memtouch", "--mem", "256M", "--host-mem", "512M",
                                       "--hook", hook, "--psp", psp], rng=rng)
    with ThreadPoolExecutor(4) as ex:
        done = list(ex.map(one, [(c, r) for c in combos for r in range(RUNS)]))
    assert len(done) == len(combos) * RUNS
    for (hook, psp), (rc, out, err, kids) in done:
        assert_interrupted(rc, err)
        assert err == "hv: interrupted\n", (hook, psp)
        assert b"memtouch: OK" not in out          # it did not run to the end
        if psp == "process":
            assert kids, "no PSP process seen"
        for k in kids:
            assert _gone(k), f"PSP process {k} still running ({hook}, {psp})"


def _loop_guest(tmp_path):
    # out 'L' to COM1, then jmp $: after its first block the guest never
    # enters Python again with the C hook
    code = b"\x66\xba\xf8\x03" b"\xb0L" b"\xee" b"\xeb\xfe"
    p = tmp_path / "loop.elf"
    p.write_bytes(make_elf([(0x200000, code, 0x1000, 5)], 0x200000))
    return p


@pytest.mark.parametrize("hook", HOOKS)
def test_sigint_stops_a_guest_that_never_leaves_the_emulator(tmp_path, hook):
    rc, out, err, _ = interrupt(["boot", _loop_guest(tmp_path), "--mem", "16M",
                                 "--host-mem", "128M", "--hook", hook], ready=b"L",
                                delay=(0.1, 0.2))
    assert_interrupted(rc, err)


def test_sigint_names_the_partial_record_and_json(tmp_path):
    rec = tmp_path / "faults.csv"
    rc, out, err, _ = interrupt(["boot", "memtouch", "--mem", "256M", "--host-mem", "512M",
                                 "--record", rec, "--serial", tmp_path / "serial.txt"],
                                delay=(0.05, 0.1))
    assert_interrupted(rc, err)
    assert err.count("\n") == 1 and f"{rec} (--record)" in err and "(--serial)" in err
    t = load_trace(rec)             # whole rows: the writer was closed
    assert len(t) > 0 and t.format == "csv"
    # --json: the interrupt as the one JSON object (a Multiboot kernel asking
    # for a video mode says so on stderr as it starts, then loops)
    img = tmp_path / "mbloop.bin"
    flags = 0x00010007
    img.write_bytes(struct.pack("<III5I", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                                0x100000, 0x100000, 0, 0x102000, 0x100020).ljust(32, b"\0")
                    + b"\xeb\xfe")
    rc, out, err, _ = interrupt(["boot", img, "--mem", "16M", "--host-mem", "128M", "--json"],
                                ready=b"warning", ready_on="stderr", delay=(0.2, 0.4))
    assert_interrupted(rc, err)
    assert json.loads(out) == {"exit_reason": "interrupted", "error": "interrupted",
                               "exit_code": 130, "partial_outputs": []}


# --------------------------------------------------------------------------
# the guard itself, in this process


def test_guard_defers_the_interrupt_past_emulation():
    stops = []
    g = SigintGuard(lambda: stops.append(1))
    with g:
        assert g.active and signal.getsignal(signal.SIGINT) == g._handler
        with pytest.raises(KeyboardInterrupt):
            with g.emulating():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):               # the handler runs at a bytecode boundary
                    pass
                inside = True                       # nothing was raised in here
        assert inside and stops
        # outside emulation Ctrl-C raises as usual
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not g.active


def test_guard_helper_stops_an_emulator_that_runs_no_python():
    # the main thread "in the emulator": it runs no bytecode and, with SIGINT
    # blocked, no signal interrupts its wait; only the helper thread, woken
    # through the wakeup fd, can stop the emulator
    stopped = threading.Event()
    g = SigintGuard(stopped.set)
    with g:
        assert g._thread is not None
        with pytest.raises(KeyboardInterrupt):
            with g.emulating():
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    assert stopped.wait(5), "nothing stopped the emulator"
                    # the signal is delivered to another thread (SIGINT is
                    # blocked here), so the handler may also run here, between
                    # two bytecodes, and stop it first: the helper must still
                    # have kicked it by itself, from its own thread
                    deadline = time.monotonic() + 5
                    while not g.kicked and time.monotonic() < deadline:
                        time.sleep(0.001)
                    assert g.kicked, "the helper did not stop the emulator"
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        assert not g.kicked


def test_guard_is_inert_when_sigint_is_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        g = SigintGuard(lambda: None)
        with g:
            assert not g.active and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_guard_in_a_thread_is_inert():
    res = {}

    def run():
        with SigintGuard(lambda: None) as g:
            res["active"] = g.active
            with g.emulating():
                res["ran"] = True
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert res == {"active": False, "ran": True}


def test_ctrl_c_after_the_command_is_done_is_ignored():
    """Run as the program (argv None), main() leaves SIGINT ignored when it
    returns: a Ctrl-C while the interpreter exits cannot turn a finished
    run into a KeyboardInterrupt traceback.  Called with argv (a test, the
    sweep), it leaves the handler alone."""
    code = ("import signal, sys\n"
            "from hv.cli.main import main\n"
            "sys.argv = ['hv', '--version']\n"
            "main()\n"
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "main(['--version'])\n"
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.split("\n")[1::2][:2] == ["True", "True"], r.stdout + r.stderr
