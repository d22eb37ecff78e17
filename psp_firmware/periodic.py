"""The PSP's wall-time periodic checker (patent step 5: the PSP re-checks the table at a fixed interval).

A thread inside the PSP wakes every `interval_ms` milliseconds and runs the
same check as CHECK_ALL (every live guest's table against its stored digest)
under the mailbox lock, so a check never interleaves with a command. A
guest whose table differs is stopped: from then on every command for it
fails with GUEST_STOPPED; the other guests carry on.

It is a PSP timer, not a mailbox command: the VMM cannot skip or postpone a
tick. The deterministic twin, counted in guest instructions, is the VMM
issuing CHECK_ALL between slices of N instructions (`hv boot --check-insns`).

    checker = psp.start_periodic_check(50, on_stop=lambda h, mm: ...)
    ...
    psp.stop_periodic_check()

`on_stop(handle, mismatch)` is called (outside the lock, from the checker
thread) once per guest the checker stops; `mismatch` names the table page,
entry index, expected and found values. Exceptions in it are logged, never
propagated into the firmware.
"""
import logging
import threading
import time

log = logging.getLogger("psp")


class PeriodicChecker:
    def __init__(self, psp, interval_ms, on_stop=None):
        interval_ms = float(interval_ms)
        if not interval_ms > 0:
            raise ValueError(f"periodic check interval must be > 0 ms, not {interval_ms}")
        self._psp = psp
        self.interval_ms = interval_ms
        self.on_stop = on_stop
        self.ticks = 0              # checks run
        self.stopped = []           # [(handle, Mismatch, monotonic time)]
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._thread = None

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        if self.running:
            return self
        self._halt.clear()
        self._thread = threading.Thread(target=self._loop, name="psp-periodic-check", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        self._halt.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    def check_now(self):
        """Run one tick synchronously (also what the thread does)."""
        checked, stopped = self._psp.periodic_check()
        self.ticks += 1
        now = time.monotonic()
        for handle, mm in stopped:
            self.stopped.append((handle, mm, now))
            if self.on_stop is not None:
                try:
                    self.on_stop(handle, mm)
                except Exception:   # a callback bug must not kill the checker
                    log.exception("periodic check: on_stop callback failed")
        return checked, stopped

    def _loop(self):
        period = self.interval_ms / 1000.0
        deadline = time.monotonic() + period
        while not self._halt.is_set():
            self._wake.wait(max(0.0, deadline - time.monotonic()))
            if self._halt.is_set():
                break
            self._wake.clear()
            try:
                self.check_now()
            except Exception:       # never let the timer die silently
                log.exception("periodic check failed")
            deadline += period
            now = time.monotonic()
            if deadline < now:      # fell behind (slow check): do not burst
                deadline = now + period

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
