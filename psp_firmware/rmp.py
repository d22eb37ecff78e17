"""The `rmp` design: the VMM writes the NPT, the CPU checks every translation
against a reverse map that only the PSP writes (AMD SEV-SNP's RMP).

RMP state model (one entry per 4 KiB host frame; format in nptcore/rmp.py)
----------------------------------------------------------------------------
The PSP's frame table (frames.py) and the RMP move together; the RMP entry
is what the CPU's walker reads, the frame table what the commands validate
against:

    frame state            RMP entry
    HV (the default)       0: not assigned (VMM memory, its NPT pages too)
    FW                     0 (never assignable)
    VMSA(h)                0 (a control page is not guest memory)
    PRIVATE(h)             0 (donated, not yet at a GPA)
    MAPPED(h, gpa, level)  assigned | level << 1 | gpa | h << 48

    HV | PRIVATE(h) --RMP_ASSIGN(h, level, gpa, hpa, n)-----> MAPPED(h, gpa, level)
    HV --LAUNCH_UPDATE_DATA(h, gpa, hpa, n) (measured)------> MAPPED(h, gpa, 4K)
    MAPPED(h, *, level) --RMP_UNASSIGN(h, level, hpa, n)----> HV (scrubbed)
    PRIVATE(h) --RECLAIM (scrubbed)--------------------------> HV
    any frame of h --DECOMMISSION (scrubbed)-----------------> HV

Nothing else changes an entry. RMP_ASSIGN and RMP_UNASSIGN model RMPUPDATE
(on SNP a CPU instruction the hypervisor runs, here a PSP command). They
refuse what RMPUPDATE plus the guest's PVALIDATE would not let through: a
frame that is FW, VMSA, assigned to anyone, or another guest's private
memory (the validation order of every PSP command); a GPA this guest already
has a frame at (SNP: the guest validates each GPA once, so a second frame
at the same GPA is never validated; here the PSP keeps, per guest, which
GPAs are assigned); a 4 KiB assignment inside an assigned 2 MiB page and
the reverse; misaligned or out-of-range addresses. An unassign names the
page size it was assigned with, whole pages only.

What the RMP does not cover: NPT permission bits (W, NX), which the VMM
writes and nothing checks (SNP's RMP has no host-permission field either);
and which frames are the VMM's NPT pages (the RMP cannot tell them from
any other hypervisor page). The VMM can write any host memory, guest
frames included: on SNP the RMP also faults host writes to assigned pages
and the memory is encrypted; the model has neither (as under digest).

Sharing: with seal=True (the PSP process) the RMP is a sealed memfd
(psp_firmware/sealed.py) the VMM maps read-only for its walker; in process
it is the same memfd, unsealed protection being meaningless there.
"""
import mmap
import os

from nptcore.bits import RMP_ASID_MAX
from nptcore.rmp import rmp_entry

from . import sealed
from .commands import Cmd, encode_out
from .protect import COMMANDS, NoIntegrity
from .frames import F
from .integrity import PAGE, level_size
from .guest import G_LAUNCHING, G_RUNNING, G_STOPPED, Guest, _Refuse
from .psp import Psp
from .status import Status

_Q = 8


class RmpTable:
    """The RMP: one u64 entry per host frame, in a memfd the PSP maps
    read-write (and, sealed, nobody else can)."""

    def __init__(self, nframes, seal=False):
        self.nframes = nframes
        self.size = max(PAGE, (nframes * _Q + PAGE - 1) // PAGE * PAGE)
        self.fd = sealed.sealed_memfd("hv-psp-rmp", self.size)
        try:
            self._mm = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
            if seal:
                sealed.seal(self.fd)
        except OSError:
            os.close(self.fd)
            raise
        self.q = memoryview(self._mm).cast("Q")

    def entry(self, pfn):
        return self.q[pfn]

    def assign(self, hpa, nframes, asid, gpa, level):
        q = self.q
        lo = hpa // PAGE
        for i in range(nframes):
            q[lo + i] = rmp_entry(asid, gpa + i * PAGE, level)

    def clear(self, hpa, nframes):
        lo = hpa // PAGE
        self._mm[lo * _Q:(lo + nframes) * _Q] = bytes(nframes * _Q)


class RmpPsp(Psp):
    protect = "rmp"

    def __init__(self, membuf, seal=False, **kw):
        kw["fast"] = False
        super().__init__(membuf, **kw)
        self._integrity_cls = NoIntegrity
        self.rmp = RmpTable(len(self._mem) // PAGE, seal=seal)
        self._handlers[Cmd.RMP_ASSIGN] = self.cmd_rmp_assign
        self._handlers[Cmd.RMP_UNASSIGN] = self.cmd_rmp_unassign
        allowed = COMMANDS["rmp"]
        self._handlers = {c: h for c, h in self._handlers.items() if c in allowed}
        for cmd in (Cmd.RMP_ASSIGN, Cmd.RMP_UNASSIGN):
            self._assert_layout(cmd, self._handlers[cmd])

    def shared_regions(self):
        """{"rmp": (fd, size, None)}: the VMM's walker maps it read-only."""
        return {"rmp": (self.rmp.fd, self.rmp.size, None)}

    # -- validation helpers (raise _Refuse, change nothing) -------------------
    def _gpas_free(self, g, gpa, level, npages):
        """No GPA of the range has a frame assigned for this guest already."""
        if level == 2:
            for i in range(npages):
                b = (gpa >> 21) + i
                if b in g.rmp_2m or g.rmp_small.get(b):
                    raise _Refuse(Status.GPA_MAPPED)
            return
        for i in range(npages):
            p = (gpa >> 12) + i
            if p in g.rmp_4k or (p >> 9) in g.rmp_2m:
                raise _Refuse(Status.GPA_MAPPED)

    def _assigned_run(self, g, hpa, level, npages):
        """[(gpa of each page)]: frames hpa.. hold npages whole pages of
        `level` assigned to g (else BAD_PAGE_STATE / BAD_OWNER)."""
        size = level_size(level)
        per = size // PAGE
        gpas = []
        for i in range(npages):
            base = hpa + i * size
            first = self.rmp.entry(base // PAGE)
            if not first & 1:
                raise _Refuse(Status.BAD_PAGE_STATE)
            if first >> 48 != g.handle:
                raise _Refuse(Status.BAD_OWNER)
            gpa0 = first & 0x0000_FFFF_FFFF_F000
            if (first >> 1) & 3 != level or gpa0 % size:
                raise _Refuse(Status.BAD_PAGE_STATE)
            for k in range(1, per):
                if self.rmp.entry(base // PAGE + k) != rmp_entry(g.handle, gpa0 + k * PAGE, level):
                    raise _Refuse(Status.BAD_PAGE_STATE)
            gpas.append(gpa0)
        return gpas

    def _record_gpas(self, g, gpa, level, npages, hpa):
        for i in range(npages):
            if level == 2:
                g.rmp_2m[(gpa >> 21) + i] = hpa + i * level_size(2)
            else:
                p = (gpa >> 12) + i
                g.rmp_4k[p] = hpa + i * PAGE
                g.rmp_small[p >> 9] = g.rmp_small.get(p >> 9, 0) + 1

    def _forget_gpa(self, g, gpa, level):
        if level == 2:
            del g.rmp_2m[gpa >> 21]
            return
        p = gpa >> 12
        del g.rmp_4k[p]
        n = g.rmp_small[p >> 9] - 1
        if n:
            g.rmp_small[p >> 9] = n
        else:
            del g.rmp_small[p >> 9]

    # -- handlers -----------------------------------------------------------
    def cmd_launch_start(self, vmsa_hpa, policy):
        self._need_platform()
        if policy != 0:
            raise _Refuse(Status.INVALID_PARAM)
        self._check_hpa_range(vmsa_hpa, PAGE)
        self._check(self._frames.check_all_in(vmsa_hpa, PAGE, F.HV))
        if self._next_handle > RMP_ASID_MAX:
            raise _Refuse(Status.RESOURCE_EXHAUSTED)      # an ASID is 16 bits
        # ---- all checks passed: commit ----
        handle = self._next_handle
        self._next_handle += 1
        self._scrub(vmsa_hpa, PAGE)
        self._frames.set(vmsa_hpa // PAGE, F.VMSA, handle)
        self._write_u64(vmsa_hpa + 8, handle)   # ASID; nCR3 (+0) is the VMM's to write
        g = self._guests[handle] = _rmp_guest(handle, vmsa_hpa, self)
        del g
        return Status.SUCCESS, encode_out(Cmd.LAUNCH_START, handle=handle)

    def cmd_launch_update_data(self, handle, gpa, hpa, npages):
        g = self._guest(handle, (G_LAUNCHING,))
        self._check_npages(npages)
        self._check_gpa_range(gpa, npages * PAGE, PAGE)
        self._check_hpa_range(hpa, npages * PAGE)
        self._check(self._frames.check_assignable(hpa, npages * PAGE, g.handle))
        self._gpas_free(g, gpa, 1, npages)
        # ---- all checks passed: commit ----
        for i in range(npages):
            g.measurement.update((gpa + i * PAGE).to_bytes(8, "little"))
            g.measurement.update(self._mem[hpa + i * PAGE:hpa + (i + 1) * PAGE])
        self._assign(g, gpa, hpa, 1, npages)
        return Status.SUCCESS, b""

    def cmd_rmp_assign(self, handle, level, gpa, hpa, npages):
        """RMPUPDATE: frames hpa.. become guest `handle`'s at gpa.., `level` pages."""
        g = self._guest(handle)
        total = self._check_map_args(g, gpa, hpa, level, npages)
        self._gpas_free(g, gpa, level, npages)
        # ---- all checks passed: commit ----
        self._scrub(hpa, total)
        self._assign(g, gpa, hpa, level, npages)
        return Status.SUCCESS, b""

    def _assign(self, g, gpa, hpa, level, npages):
        total = npages * level_size(level)
        self._frames.set_range(hpa, total, F.MAPPED, g.handle, gpa)
        self.rmp.assign(hpa, total // PAGE, g.handle, gpa, level)
        self._record_gpas(g, gpa, level, npages, hpa)
        g.mapped_pages += total // PAGE

    def cmd_rmp_unassign(self, handle, level, hpa, npages):
        """RMPUPDATE back to hypervisor-owned: whole pages of `level`, scrubbed."""
        g = self._guest(handle, (G_LAUNCHING, G_RUNNING, G_STOPPED))
        if level not in (1, 2):
            raise _Refuse(Status.INVALID_PARAM)
        self._check_npages(npages)
        size = level_size(level)
        self._check_hpa_range(hpa, npages * size, size)
        self._check(self._frames.check_all_in(hpa, npages * size, F.MAPPED, requester=g.handle))
        gpas = self._assigned_run(g, hpa, level, npages)
        # ---- all checks passed: commit ----
        total = npages * size
        self._scrub(hpa, total)
        self.rmp.clear(hpa, total // PAGE)
        self._frames.set_range(hpa, total, F.HV)
        for gpa0 in gpas:
            self._forget_gpa(g, gpa0, level)
        g.mapped_pages -= total // PAGE
        return Status.SUCCESS, b""

    def cmd_decommission(self, handle):
        g = self._guest(handle, (G_LAUNCHING, G_RUNNING, G_STOPPED))
        # ---- all checks passed: commit ----
        for pfn in self._frames.frames_of(g.handle):
            self.rmp.clear(pfn * PAGE, 1)
        return super().cmd_decommission(handle)     # validates again (same answer), commits

    def _check_invariants(self):
        super()._check_invariants()
        if self._frames is None:
            return
        snap = self._frames.snapshot()
        for pfn in range(self.rmp.nframes):
            e = self.rmp.entry(pfn)
            st = snap.get(pfn)
            if st is None or st[0] != F.MAPPED:
                assert e == 0, f"frame {pfn:#x} ({st}) has RMP entry {e:#x}"
            else:
                assert e & 1 and e >> 48 == st[1] and e & 0x0000_FFFF_FFFF_F000 == st[2], \
                    f"frame {pfn:#x} MAPPED{st[1:]} has RMP entry {e:#x}"


def _rmp_guest(handle, vmsa, psp):
    """A Guest without a PSP-held table (the VMM writes it), with the RMP's
    per-guest GPA maps."""
    g = Guest(handle, vmsa, 0, NoIntegrity, psp._eng.canon_page, psp._read_u64)
    g.npt.pages.clear()         # the PSP holds no table page of this guest
    g.npt.levels.clear()
    g.rmp_4k = {}               # 4 KiB GPA page -> hpa
    g.rmp_2m = {}               # 2 MiB GPA block -> hpa
    g.rmp_small = {}            # 2 MiB GPA block -> 4 KiB pages assigned inside it
    return g
