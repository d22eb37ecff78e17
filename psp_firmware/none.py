"""The `none` design: plain KVM. The VMM writes the NPT; nothing checks it.

The firmware keeps only what a launch needs: guest handles and the launch
measurement (LAUNCH_UPDATE_DATA hashes the page, changes no frame state and
maps nothing). VERIFY and CHECK_ALL have nothing to check and answer
SUCCESS; GUEST_STATUS reports no table and a zero digest. No frame table
entry is ever set: any HPA may be anything.
"""
from .commands import Cmd, encode_out
from .protect import COMMANDS, NoIntegrity
from .integrity import PAGE
from .guest import G_LAUNCHING, Guest, _Refuse
from .psp import Psp
from .status import Status


class NonePsp(Psp):
    protect = "none"

    def __init__(self, membuf, **kw):
        kw["fast"] = False
        super().__init__(membuf, **kw)
        self._integrity_cls = NoIntegrity
        allowed = COMMANDS["none"]
        self._handlers = {c: h for c, h in self._handlers.items() if c in allowed}

    def cmd_launch_start(self, vmsa_hpa, policy):
        self._need_platform()
        if policy != 0:
            raise _Refuse(Status.INVALID_PARAM)
        self._check_hpa_range(vmsa_hpa, PAGE)
        # ---- all checks passed: commit ----
        handle = self._next_handle
        self._next_handle += 1
        g = Guest(handle, vmsa_hpa, 0, NoIntegrity, self._eng.canon_page, self._read_u64)
        g.npt.pages.clear()          # the VMM's table: the PSP holds none of it
        g.npt.levels.clear()
        self._guests[handle] = g
        return Status.SUCCESS, encode_out(Cmd.LAUNCH_START, handle=handle)

    def cmd_launch_update_data(self, handle, gpa, hpa, npages):
        g = self._guest(handle, (G_LAUNCHING,))
        self._check_npages(npages)
        self._check_gpa_range(gpa, npages * PAGE, PAGE)
        self._check_hpa_range(hpa, npages * PAGE)
        # ---- all checks passed: commit (a measurement only) ----
        for i in range(npages):
            g.measurement.update((gpa + i * PAGE).to_bytes(8, "little"))
            g.measurement.update(self._mem[hpa + i * PAGE:hpa + (i + 1) * PAGE])
        g.mapped_pages += npages
        return Status.SUCCESS, b""
