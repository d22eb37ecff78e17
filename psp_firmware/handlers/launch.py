"""Launch commands: LAUNCH_START, SET_PRIVATE_MEMORY, LAUNCH_UPDATE_DATA
(load and measure), LAUNCH_FINISH."""
import logging


from .. import core as _core
from ..commands import ATTR_VALID, Cmd, encode_out
from ..frames import F
from ..integrity import PAGE
from ..status import Status
from ..guest import G_LAUNCHING, G_RUNNING, Guest, _Q, _Refuse

log = logging.getLogger("psp")


class LaunchCommands:
    """Handlers of the launch family (mixed into Psp)."""

    def cmd_launch_start(self, vmsa_hpa, policy):
        self._need_platform()
        if policy != 0:
            raise _Refuse(Status.INVALID_PARAM)
        self._check_hpa_range(vmsa_hpa, PAGE)
        self._check(self._frames.check_all_in(vmsa_hpa, PAGE, F.HV))
        if not self._pool:
            raise _Refuse(Status.RESOURCE_EXHAUSTED)
        # ---- all checks passed: commit ----
        handle = self._next_handle
        self._next_handle += 1
        root = self._pool.pop()
        self._scrub(root, PAGE)
        self._frames.set(root // PAGE, F.TABLE, handle)
        self._scrub(vmsa_hpa, PAGE)
        self._frames.set(vmsa_hpa // PAGE, F.VMSA, handle)
        self._write_u64(vmsa_hpa, root)          # nCR3
        self._write_u64(vmsa_hpa + 8, handle)    # ASID
        g = self._guests[handle] = Guest(handle, vmsa_hpa, root, self._integrity_cls,
                                         self._eng.canon_page, self._read_u64,
                                         mem=self._mem, core=self.core, dirty=self._dirty,
                                         ptabs=self._ptabs)
        self._register_fast(g)
        return Status.SUCCESS, encode_out(Cmd.LAUNCH_START, handle=handle)

    def _register_fast(self, g):
        """Commit-time: give the C fast path's ring loop guest g's record."""
        if g.rec is not None:
            # the ring loop's guest table: slot handle % 64 if free, else any
            # free one (psp_core.c ring_guest looks there first, then scans);
            # past 64 fast-path guests, the others take the Python path
            slots = self._ctx.ring_guests
            for k in [g.handle & 63] + list(range(64)):
                if slots[k] == _core.ffi.NULL:
                    slots[k] = g.rec
                    break

    def cmd_set_private_memory(self, handle, hpa, npages):
        g = self._guest(handle)
        self._check_npages(npages)
        self._check_hpa_range(hpa, npages * PAGE)
        self._check(self._frames.check_all_in(hpa, npages * PAGE, F.HV, requester=g.handle))
        # ---- all checks passed: commit ----
        self._scrub(hpa, npages * PAGE)
        self._frames.set_range(hpa, npages * PAGE, F.PRIVATE, g.handle)
        return Status.SUCCESS, b""

    def cmd_launch_update_data(self, handle, gpa, hpa, npages):
        g = self._guest(handle, (G_LAUNCHING,))
        writes, new_levels = self._map_checks(g, gpa, hpa, 1, ATTR_VALID, npages)
        # ---- all checks passed: commit ----
        for i in range(npages):
            g.measurement.update(_Q.pack(gpa + i * PAGE))
            g.measurement.update(self._mem[hpa + i * PAGE:hpa + (i + 1) * PAGE])
        self._commit_map(g, gpa, hpa, 1, npages, writes, new_levels, scrub=False)
        return Status.SUCCESS, b""

    def cmd_launch_finish(self, handle):
        g = self._guest(handle, (G_LAUNCHING,))
        # ---- all checks passed: commit ----
        g.state = G_RUNNING
        g.final_measurement = g.measurement.digest()
        return Status.SUCCESS, encode_out(Cmd.LAUNCH_FINISH, measurement=g.final_measurement)
