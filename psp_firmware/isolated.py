"""The `isolated` design: NPT and control pages in PSP-owned memory.

What it models: Hygon CSV3 (the NPT in memory only the secure processor
writes), Intel TDX (Secure EPT pages the TDX module adds with TDH.MEM.SEPT.ADD
and fills with TDH.MEM.PAGE.AUG), Arm CCA (realm translation tables the RMM
builds on RMI_RTT_CREATE / RMI_DATA_CREATE). The host asks, the trusted side
validates (here: every check of UPDATE_NPT, as under digest) and writes the
table; the host cannot write it at all, so there is nothing to digest.

Frames: a range [iso_base, iso_base + iso_size) of host-physical addresses
just below the firmware region is the PSP's: at PLATFORM_INIT every frame of
it becomes POOL (free table frame), and table pages and control pages
(VMSA: nCR3 at +0, the ASID at +8) come from there; at DECOMMISSION they go
back to the pool. POOL_ADD is not a command of this design: the VMM has no
frames to give that it could not write. LAUNCH_START takes vmsa_hpa 0 (the
PSP picks the control page; GUEST_STATUS says where).

Enforcement (seal=True, the PSP process): the range is a memfd of its own,
mapped read-write over host memory in the PSP process before it is sealed
(psp_firmware/sealed.py); the VMM maps it read-only over the same range of
its host memory, so the walker reads the table and any VMM store faults.
Every entry is written with Accessed (and a leaf with Dirty) already set:
the walker, which runs in the VMM's process, sets A/D only when they are not
set yet, so it never writes there either (the model does not track A/D in
isolated tables; TDX hides them from the host too). Without seal (the PSP in
the VMM's process) the range is plain host memory: nothing is enforced, and
hv refuses to run the design that way.
"""
import mmap

from .protect import COMMANDS, NoIntegrity
from .frames import F
from .guest import G_LAUNCHING, G_RUNNING, G_STOPPED, Guest, _Refuse
from .psp import Psp
from .commands import Cmd, encode_out
from .integrity import PAGE
from .status import Status
from . import sealed

A, D = 0x20, 0x40


class IsolatedPsp(Psp):
    protect = "isolated"
    TABLE_ENTRY = Psp.TABLE_ENTRY | A

    def __init__(self, membuf, iso_base, iso_size, seal=False, **kw):
        kw["holes"] = False         # the hole probe asks the host memfd, not the region's
        super().__init__(membuf, **kw)
        self._integrity_cls = NoIntegrity
        self.iso_base, self.iso_size = iso_base, iso_size
        self._iso_fd = None
        self._sealed = False
        if seal:
            self._seal_region()
        allowed = COMMANDS["isolated"]
        self._handlers = {c: h for c, h in self._handlers.items() if c in allowed}

    def _seal_region(self):
        """The region becomes a sealed memfd, mapped read-write here only."""
        if not isinstance(self._mem, mmap.mmap):
            raise ValueError("the isolated region needs host memory that is an mmap")
        b, n = self.iso_base, self.iso_size
        if b % PAGE or n % PAGE or n <= 0 or b + n > len(self._mem):
            raise ValueError(f"isolated region {b:#x}+{n:#x} is not page aligned inside "
                             f"host memory")
        fd = sealed.sealed_memfd("hv-psp-npt", n)
        try:
            sealed.map_over(sealed.buffer_address(self._mem) + b, n, fd, writable=True)
            sealed.seal(fd)
        except OSError:
            import os
            os.close(fd)
            raise
        self._iso_fd = fd
        self._sealed = True

    def shared_regions(self):
        """{"iso": (fd, size, hpa)}: what the VMM maps read-only (sealed only)."""
        if self._iso_fd is None:
            return {}
        return {"iso": (self._iso_fd, self.iso_size, self.iso_base)}

    @staticmethod
    def _leaf_flags(attrs, level):
        return Psp._leaf_flags(attrs, level) | A | D

    # -- handlers whose behaviour differs from digest ------------------------
    def cmd_platform_init(self, host_size, fw_base, fw_size):
        b, n = self.iso_base, self.iso_size
        if b % PAGE or n % PAGE:
            raise _Refuse(Status.MISALIGNED)
        if n <= 0 or b < 0:
            raise _Refuse(Status.INVALID_PARAM)
        if b + n > fw_base:                  # below the firmware, inside host memory
            raise _Refuse(Status.RANGE_OVERLAP)
        st, out = super().cmd_platform_init(host_size, fw_base, fw_size)   # validates, commits
        # ---- (after the base commit) the region's frames are the PSP's table pool
        self._frames.set_range(b, n, F.POOL)
        self._pool.extend(b + i * PAGE for i in reversed(range(n // PAGE)))
        return st, out

    def cmd_launch_start(self, vmsa_hpa, policy):
        self._need_platform()
        if policy != 0 or vmsa_hpa != 0:     # the PSP picks the control page
            raise _Refuse(Status.INVALID_PARAM)
        if len(self._pool) < 2:
            raise _Refuse(Status.RESOURCE_EXHAUSTED)
        # ---- all checks passed: commit ----
        handle = self._next_handle
        self._next_handle += 1
        root, vmsa = self._pool.pop(), self._pool.pop()
        self._scrub(root, PAGE)
        self._scrub(vmsa, PAGE)
        self._frames.set(root // PAGE, F.TABLE, handle)
        self._frames.set(vmsa // PAGE, F.VMSA, handle)
        self._write_u64(vmsa, root)          # nCR3
        self._write_u64(vmsa + 8, handle)    # ASID
        g = self._guests[handle] = Guest(handle, vmsa, root, NoIntegrity, self._eng.canon_page,
                                         self._read_u64, ptabs=self._ptabs, leaf_extra=A | D)
        self._register_fast(g)          # the C fast path: no line hashes, A|D in every leaf
        return Status.SUCCESS, encode_out(Cmd.LAUNCH_START, handle=handle)

    def cmd_decommission(self, handle):
        g = self._guest(handle, (G_LAUNCHING, G_RUNNING, G_STOPPED))
        vmsa = g.vmsa
        st, out = super().cmd_decommission(handle)     # validates again, commits
        # ---- (after the base commit) the control page goes back to the pool
        self._frames.set(vmsa // PAGE, F.POOL)
        self._pool.append(vmsa)
        return st, out

    def _check_invariants(self):
        super()._check_invariants()
        if self._frames is None:
            return
        lo, hi = self.iso_base // PAGE, (self.iso_base + self.iso_size) // PAGE
        for pfn in range(lo, hi):
            st, h, _g = self._frames.get(pfn)
            assert st in (F.POOL, F.TABLE, F.VMSA), f"region frame {pfn:#x} in state {st.name}"
        for g in self._guests.values():
            assert lo <= g.vmsa // PAGE < hi, "a control page outside the PSP's region"
            for hpa in g.npt.pages:
                assert lo <= hpa // PAGE < hi, f"table page {hpa:#x} outside the PSP's region"
