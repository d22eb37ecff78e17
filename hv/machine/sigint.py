"""Ctrl-C while the emulator runs a guest.

Python runs a SIGINT handler in the main thread, between two bytecodes.
While Unicorn runs a guest, the only Python the main thread executes is in
hook callbacks (the cffi NPF and block callbacks, the binding's ctypes
hooks), and an exception raised there is swallowed by the callback
machinery: the default handler's KeyboardInterrupt would be printed as
"Exception ignored ..." and lost, or turned into an emulator error.  So
while the emulator runs, SIGINT must not raise.

:class:`SigintGuard` (a context manager around a whole run) installs a
SIGINT handler that raises KeyboardInterrupt as usual outside the emulator
and, inside it (:meth:`SigintGuard.emulating`, around ``emu_start``), only
records the interrupt and stops the emulator; :meth:`emulating` raises
KeyboardInterrupt once ``emu_start`` has returned, from plain Python.

A guest may run for a long time without entering Python at all (cached
blocks, the C hooks): a helper thread, woken through
``signal.set_wakeup_fd`` the moment the signal arrives, stops the emulator
then (``stop`` must be callable from another thread: ``uc.emu_stop`` is),
and again every 20 ms for up to a second, in case the first stop landed just
before ``emu_start`` began (which clears a pending stop).  A stop the helper
made that turns out not to belong to an interrupt (:attr:`kicked` without an
interrupt pending) is to be resumed by the caller.

The guard is inert outside the main thread, when SIGINT is ignored or
handled by something other than a Python callable, and leaves the wakeup fd
alone if someone else set one (the helper is then not started: an interrupt
still ends the run at the next callback).
"""
import ctypes
import os
import signal
import threading
import time

__all__ = ["SigintGuard"]

_KICK_S = 1.0          # how long the helper keeps stopping the emulator
_KICK_EVERY_S = 0.02

try:
    _check_signals = ctypes.pythonapi.PyErr_CheckSignals
    _check_signals.restype = ctypes.c_int
    _check_signals.argtypes = []
except (AttributeError, OSError):     # pragma: no cover - not CPython
    def _check_signals():
        return 0


class SigintGuard:
    """See the module docstring.  ``stop()`` stops the emulator; it is
    called from the handler (main thread, inside a hook or not) and from the
    helper thread."""

    def __init__(self, stop):
        self._stop_fn = stop
        self.active = False
        self.kicked = False           # the helper stopped the emulator
        self._in_emu = False
        self._pending = False
        self._prev = None
        self._rfd = self._wfd = None
        self._old_wakeup = -1
        self._thread = None
        self._closing = False
        self._kick_until = 0.0
        self._wake = threading.Event()

    def _stop(self):
        try:
            self._stop_fn()
        except Exception:     # noqa: BLE001 - nothing to stop (closed, not running)
            pass

    # -- installing ------------------------------------------------------------
    def __enter__(self):
        self._closing = self._pending = self.kicked = False
        if threading.current_thread() is not threading.main_thread():
            return self
        prev = signal.getsignal(signal.SIGINT)
        if not callable(prev):      # SIG_IGN, SIG_DFL or not set from Python
            return self
        self._prev = prev
        signal.signal(signal.SIGINT, self._handler)
        self.active = True
        try:
            r, w = os.pipe()
            os.set_blocking(w, False)
            os.set_blocking(r, True)
        except OSError:
            return self
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
            return self
        if old != -1:               # someone else's: give it back, no helper
            signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return self
        self._rfd, self._wfd = r, w
        self._thread = threading.Thread(target=self._watch, name="hv-sigint", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if not self.active:
            return
        self.active = False
        if self._thread is not None:
            signal.set_wakeup_fd(-1)
            self._closing = True
            self._wake.set()
            try:
                os.write(self._wfd, b"\0")      # no signal is 0: "close"
            except OSError:
                pass
            self._thread.join(2.0)
            os.close(self._rfd)
            os.close(self._wfd)
            self._thread = None
        signal.signal(signal.SIGINT, self._prev)

    # -- the handler and the helper --------------------------------------------
    def _handler(self, signum, frame):
        if self._in_emu:
            self._pending = True
            self._stop()
            return
        self._kick_until = 0.0          # the helper has nothing to stop
        self._prev(signum, frame)       # default_int_handler: KeyboardInterrupt

    def _watch(self):
        while True:
            try:
                data = os.read(self._rfd, 64)
            except OSError:
                return
            if self._closing or not data:
                return
            if signal.SIGINT not in data:
                continue
            self._kick_until = time.monotonic() + _KICK_S
            self._wake.clear()
            while not self._closing and time.monotonic() < self._kick_until:
                if self._in_emu:
                    self.kicked = True
                    self._stop()
                self._wake.wait(_KICK_EVERY_S)

    # -- around emu_start --------------------------------------------------------
    def emulating(self):
        """Context manager around one ``emu_start``: raises KeyboardInterrupt
        after it when Ctrl-C came while it ran (or just before)."""
        return _Emulating(self)

    def raise_pending(self):
        if self._pending:
            self._pending = False
            self.kicked = False
            self._kick_until = 0.0
            self._wake.set()
            raise KeyboardInterrupt


class _Emulating:
    __slots__ = ("g",)

    def __init__(self, guard):
        self.g = guard

    def __enter__(self):
        g = self.g
        g.kicked = False
        g.raise_pending()
        g._in_emu = g.active
        return g

    def __exit__(self, *exc):
        g = self.g
        if g._in_emu:
            _check_signals()            # run a handler the signal is waiting for now
            g._in_emu = False
        if exc[0] is None:
            g.raise_pending()
        return False
