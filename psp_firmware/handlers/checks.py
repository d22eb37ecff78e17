"""Check and lifecycle commands: VERIFY, CHECK_ALL and the periodic check,
GUEST_STATUS, DECOMMISSION, and the invariants asserted in tests."""
import logging


from .. import core as _core
from ..commands import Cmd, encode_out
from ..frames import F
from ..integrity import PAGE
from ..status import Status
from ..guest import G_LAUNCHING, G_RUNNING, G_STOPPED, INTEGRITY_MODES, PLATFORM_INIT

log = logging.getLogger("psp")


class CheckCommands:
    """Handlers of the check family (mixed into Psp)."""

    def cmd_verify(self, handle):
        g = self._guest(handle)
        mm = g.integrity.verify_all()
        if mm is not None:
            self._stop_guest(g, mm)
            return Status.INTEGRITY_FAILURE, self._mismatch_out(Cmd.VERIFY, mm)
        return Status.SUCCESS, encode_out(Cmd.VERIFY, ok=1)

    def _check_all_guests(self):
        """Verify every live guest; stop the tampered ones. Caller holds the lock.

        Returns (checked, [(handle, Mismatch), ...])."""
        stopped = []
        checked = 0
        for g in list(self._guests.values()):
            if g.state == G_STOPPED:
                continue
            checked += 1
            mm = g.integrity.verify_all()
            if mm is not None:
                self._stop_guest(g, mm)
                stopped.append((g.handle, mm))
        return checked, stopped

    def cmd_check_all(self):
        """The periodic check (patent claim 5): verify every live guest."""
        self._need_platform()
        checked, stopped = self._check_all_guests()
        if not stopped:
            return Status.SUCCESS, encode_out(Cmd.CHECK_ALL, checked=checked)
        h, mm = stopped[0]
        return Status.INTEGRITY_FAILURE, encode_out(
            Cmd.CHECK_ALL, checked=checked, stopped_handle=h, page_hpa=mm.page_hpa,
            entry_index=mm.index, expected=mm.expected, found=mm.found)

    # ------------------------------------------------------------------
    # the wall-time periodic checker (psp_firmware/periodic.py): a PSP-internal
    # timer, not a mailbox command, so the VMM cannot skip or delay a check.
    def periodic_check(self):
        """One tick of the periodic checker: CHECK_ALL under the mailbox lock.

        Returns (checked, [(handle, Mismatch), ...]); (0, []) before PLATFORM_INIT."""
        with self._lock:
            if self._platform != PLATFORM_INIT:
                return 0, []
            shared = self._shared
            if shared is None:
                return self._check_all_guests()
            self._c.psp_lock(shared)        # see Psp.mailbox
            try:
                return self._check_all_guests()
            finally:
                self._c.psp_unlock(shared)

    def start_periodic_check(self, interval_ms, on_stop=None):
        """Start (or restart) the wall-time checker thread; returns it."""
        from ..periodic import PeriodicChecker
        self.stop_periodic_check()
        self._periodic = PeriodicChecker(self, interval_ms, on_stop=on_stop)
        self._periodic.start()
        return self._periodic

    def stop_periodic_check(self):
        pc = getattr(self, "_periodic", None)
        if pc is not None:
            pc.stop()
            self._periodic = None

    def cmd_guest_status(self, handle):
        g = self._guest(handle, (G_LAUNCHING, G_RUNNING, G_STOPPED))
        out = encode_out(Cmd.GUEST_STATUS, state=g.state, level_mode=g.integrity.mode_id,
                         root=g.npt.root, vmsa=g.vmsa, mapped_pages=g.mapped_pages,
                         table_pages=len(g.npt.pages), digest=g.integrity.digest,
                         measurement=g.final_measurement)
        return (Status.GUEST_STOPPED if g.state == G_STOPPED else Status.SUCCESS), out

    def cmd_decommission(self, handle):
        g = self._guest(handle, (G_LAUNCHING, G_RUNNING, G_STOPPED))
        # ---- all checks passed: commit ----
        if g.rec is not None:
            g.rec.accepting = 0
            slots = self._ctx.ring_guests
            for k in range(64):
                if slots[k] == g.rec:
                    slots[k] = _core.ffi.NULL
        g.npt.drop_all()
        for hpa in g.npt.pages:
            self._dirty[hpa >> 12] = 0
            if self._ptabs is not None:
                self._ptabs.pending.discard(hpa)
        for pfn in self._frames.frames_of(handle):
            st = self._frames.state(pfn)
            self._scrub(pfn * PAGE, PAGE)
            if st == F.TABLE:
                self._frames.set(pfn, F.POOL)
                self._pool.append(pfn * PAGE)
            else:
                self._frames.set(pfn, F.HV)
        del self._guests[handle]
        return Status.SUCCESS, b""

    # ------------------------------------------------------------------
    # introspection for tests, fuzzers and benchmarks of the firmware itself.
    # The VMM never calls these: it holds a transport, not the Psp object.
    def _switch_integrity(self, handle, mode):
        """Benchmarks: give guest `handle` a fresh integrity object of `mode`
        over its current table (hv bench builds large tables once, in merkle
        mode, then times each mode on them). The C fast path serves the
        guest only while it is in merkle mode."""
        with self._lock:
            self._guests[handle].set_integrity(INTEGRITY_MODES[mode], self._eng.canon_page,
                                               self._read_u64, self._mem, self.core,
                                               self._dirty, self._ptabs)

    def _check_invariants(self):
        if self._frames is None:
            return
        self._frames.check_invariants(set(self._guests))
        for g in self._guests.values():
            for hpa in g.npt.pages:
                st, h, _ = self._frames.get(hpa // PAGE)
                assert st == F.TABLE and h == g.handle, f"table page {hpa:#x} has state {st}"
        for hpa in self._pool:
            assert self._frames.state(hpa // PAGE) == F.POOL
