"""The (untrusted) VMM: host memory, frame allocator, PSP driver, NPF path.

Under the digest and isolated protection designs the VMM never writes an
NPT entry itself: on a nested page fault it picks a GPA range and an HPA
range and asks the PSP (UPDATE_NPT) to install them. Under rmp it has the
PSP assign the frames (RMP_ASSIGN) and writes the entries itself; under none
it just writes them (hv/vmm/tables.py). `protect` picks the design.
"""
import logging
import os
import struct

from nptcore import get_engine
from nptcore.bits import ACC_R, ACC_W, ACC_X, GPA_LIMIT, PF_P, PF_RMP
from psp_firmware import DESIGNS, Status, make_psp
from psp_firmware.commands import ATTR_RWX

from hv.vmm.alloc import FrameAllocator, OutOfMemory
from hv.errors import BadInput, VmStopped
from hv.vmm.hostmem import PAGE, HostMemory
from hv.psp_link.inprocess import InProcessTransport
from hv.psp_link.client import PspClient
from hv.vmm.tables import leaf_flags, make_tables, rmp_fault
from hv.vmm.vm import Vm

log = logging.getLogger("hv.npf")

HUGE = 2 << 20
ACCESS_NAMES = {ACC_R: "r", ACC_W: "w", ACC_X: "x"}
DEFAULT_FW_SIZE = 16 << 20
POOL_CHUNK = 64
ISOLATED_NEEDS_PROCESS = ("--protect isolated needs the PSP in its own process (--psp process): "
                          "with the PSP in the VMM's process its writable mapping of the table "
                          "frames would be the VMM's too, and nothing would be enforced")
NCR3_MASK = 0x000F_FFFF_FFFF_F000
_U64 = struct.Struct("<Q")
_INFO = logging.INFO
_RESOURCE_EXHAUSTED = Status.RESOURCE_EXHAUSTED
_SUCCESS = Status.SUCCESS


class Vmm:
    """Owns host memory and the PSP transport. Several VMs at once."""

    def __init__(self, host_mem=1 << 30, host_mem_path=None, backend=None, integrity=None,
                 psp=None, fw_size=DEFAULT_FW_SIZE, psp_timeout=5.0, psp_check_ms=None,
                 shared_mem=False, protect="digest", iso_size=None):
        """psp_check_ms: start the PSP's own wall-time periodic checker (it
        re-verifies every guest's table every N ms and stops tampered ones).
        protect: the protection design (digest, isolated, rmp, none;
        docs/designs.md); integrity is digest's sub-option. psp: "inprocess"
        or "process" (None: process for isolated, which needs it, else
        inprocess). iso_size: bytes of the isolated design's PSP-owned range
        (default isolated_region_size(host_mem)). shared_mem: host memory in
        a memfd even with an in-process PSP (the KVM vCPU maps its frames into
        the guest's memslot)."""
        protect = protect or "digest"
        if protect not in DESIGNS:
            raise BadInput(f"unknown --protect {protect!r} (have {', '.join(DESIGNS)})")
        if integrity is not None and protect != "digest":
            raise BadInput(f"--integrity is a sub-option of --protect digest, not of "
                           f"--protect {protect} (which keeps no digest)")
        if psp is None:
            psp = "process" if protect == "isolated" else "inprocess"
        if protect == "isolated" and psp == "inprocess":
            raise BadInput(ISOLATED_NEEDS_PROCESS)
        if host_mem < 64 << 20:
            raise BadInput(f"--host-mem must be at least 64M, not {host_mem}")
        self.protect = protect
        self.mem = HostMemory(host_mem, host_mem_path, shared=(psp == "process" or shared_mem))
        self.engine = get_engine(self.mem.buf, backend)
        self.backend = self.engine.name
        fw_base = host_mem - fw_size
        self.iso_base = self.iso_size = None
        limit = fw_base
        if protect == "isolated":
            # the PSP's own frames (its NPT and control pages), just below its firmware
            self.iso_size = iso_size or isolated_region_size(host_mem)
            self.iso_base = limit = fw_base - self.iso_size
        # HPA 0..1 MiB stays the VMM's own (never handed out), the top is PSP memory
        self.alloc = FrameAllocator(1 << 20, limit)
        self.fw_base, self.fw_size = fw_base, fw_size
        self.psp_kind = psp
        self.psp_check_ms = psp_check_ms     # the PSP's own timer (None: off)
        self._rmp_buf = None
        self.transport = self._make_transport(psp, backend, integrity, psp_timeout, psp_check_ms)
        try:
            self._map_shared(self.transport.shared_regions())
        except BaseException:
            self.transport.close()
            raise
        self.psp = PspClient(self.transport)
        r = self.psp.platform_init(host_mem, fw_base, fw_size)
        if not r.ok:
            raise RuntimeError(f"PSP platform init failed: {r.name}")
        self.vms = []
        self._fast_entry = None       # the PSP's entry for the vCPU's NPF fast path (lazy)
        # HV_NPF_FAST=0: every NPF through handle_npf (A/B runs; the same results);
        # the C path asks UPDATE_NPT (digest; isolated needs the PSP process,
        # where the C path does not reach) or writes the leaf itself (none)
        self.npf_fast = (protect in ("digest", "none")
                         and os.environ.get("HV_NPF_FAST", "1") != "0")
        self.tables = make_tables(self)
        if protect == "digest":
            self._donate_pool(POOL_CHUNK)

    def _make_transport(self, psp, backend, integrity, timeout, check_ms):
        if check_ms is not None and not check_ms > 0:
            raise BadInput(f"the PSP's check interval must be > 0 ms, not {check_ms}")
        iso = (self.iso_base, self.iso_size) if self.protect == "isolated" else None
        if psp == "inprocess":
            kw = {} if integrity is None else {"integrity": integrity}
            self._psp_obj = make_psp(self.mem.buf, protect=self.protect, seal=True, iso=iso,
                                     backend=backend, mem_fd=self.mem.fd, **kw)
            if check_ms:
                self._psp_obj.start_periodic_check(check_ms)
            return InProcessTransport(self._psp_obj)
        if psp == "process":
            from hv.psp_link.process import ProcessTransport
            return ProcessTransport(self.mem, backend=backend, integrity=integrity, timeout=timeout,
                                    periodic_ms=check_ms, protect=self.protect, iso=iso)
        raise BadInput(f"unknown --psp {psp!r} (inprocess or process)")

    def _map_shared(self, regions):
        """Map what the PSP lets the VMM read: the isolated design's table
        frames (read-only, over host memory) and the rmp design's RMP."""
        import mmap
        try:
            if self.protect == "isolated":
                fd, size, hpa = regions["iso"]
                if (hpa, size) != (self.iso_base, self.iso_size):
                    raise RuntimeError(f"the PSP's region {hpa:#x}+{size:#x} is not the one "
                                       f"asked for")
                self.mem.map_readonly_over(fd, hpa, size)
            elif self.protect == "rmp":
                fd, size, _hpa = regions["rmp"]
                self._rmp_buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            for fd, _size, _hpa in regions.values():
                os.close(fd)

    def close(self):
        psp = getattr(self, "_psp_obj", None)
        if psp is not None:
            psp.stop_periodic_check()
        self.transport.close()
        self.mem.close()

    # -- PSP table pool ------------------------------------------------------
    def _donate_pool(self, n):
        hpa = self.alloc.alloc(n)
        r = self.psp.pool_add(hpa, n)
        if not r.ok:
            self.alloc.free(hpa, n)
            raise RuntimeError(f"PSP refused POOL_ADD: {r.name}")

    def _psp_retry_pool(self, command, *args, reply=None):
        """Send a PSP command; while the PSP's table pool is empty, donate
        more frames and send it again. reply: the answer to a first try the
        caller already sent (it is not sent again)."""
        r = command(*args) if reply is None else reply
        while r.status == Status.RESOURCE_EXHAUSTED:
            self._donate_pool(POOL_CHUNK)
            r = command(*args)
        return r

    # -- VMs -----------------------------------------------------------------
    def create_vm(self, ram_size=None, fault_around=1, huge=False):
        if fault_around < 1 or fault_around > 512:
            raise BadInput(f"--fault-around must be 1..512, not {fault_around}")
        handle, vmsa = self.tables.launch()
        vm = Vm(handle, vmsa, ram_size, fault_around, huge)
        if self._rmp_buf is not None:
            from nptcore.rmp import RmpView
            vm.rmp = RmpView(self._rmp_buf, handle)
        self.vms.append(vm)
        return vm

    def npt_root(self, vm):
        """The root the CPU walks: nCR3 as it is in the VM's control page."""
        mem, vmsa = self.mem, vm.vmsa
        if 0 <= vmsa <= mem.size - 8:
            return _U64.unpack_from(mem.buf, vmsa)[0] & NCR3_MASK
        return mem.read_u64(vmsa) & NCR3_MASK      # (raises, saying why)

    def load_page(self, vm, gpa, data):
        """Launch: copy image bytes into a fresh frame, have the PSP measure and map it."""
        hpa = self.alloc.alloc(1)
        self.mem.write(hpa, data.ljust(PAGE, b"\0"))
        r = self.tables.load(vm, gpa, hpa)
        if not r.ok:
            self.alloc.free(hpa)
            raise BadInput(f"PSP refused to load image page at GPA {gpa:#x}: {r.name}")
        self._record(vm, gpa >> 12, 1, hpa, 1)
        return hpa

    def launch_finish(self, vm):
        r = self.psp.launch_finish(vm.handle)
        if not r.ok:
            raise RuntimeError(f"PSP refused LAUNCH_FINISH: {r.name}")
        return r.measurement

    def _record(self, vm, first_page, npages, hpa, level, notify=True):
        """The VMM's view of a mapping the PSP made; notify: run the
        vm.on_npt_change callbacks."""
        vm.record(first_page, npages, hpa, level)
        if notify:
            for cb in vm.on_npt_change:
                cb()

    def is_mapped(self, vm, gpa):
        p = gpa >> 12
        return p in vm.mapped or (p >> 9) in vm.huge_blocks

    # -- the NPF path --------------------------------------------------------
    def _choose_range(self, vm, gpa):
        """(gpa, npages, level): what to map for a fault at gpa."""
        page = gpa >> 12
        limit = (vm.ram_size >> 12) if vm.ram_size else (GPA_LIMIT >> 12)
        if vm.huge:
            block = page >> 9
            if not vm.small_per_block.get(block) and (block + 1) << 9 <= limit:
                return block << 21, 1, 2
        n = vm.fault_around
        if n == 1:
            return page << 12, 1, 1
        lo = page - page % n
        hi = min(lo + n, limit)
        mapped, huge_blocks = vm.mapped, vm.huge_blocks
        if page < hi and mapped.isdisjoint(range(lo, hi)) and (
                not huge_blocks or huge_blocks.isdisjoint(range(lo >> 9, ((hi - 1) >> 9) + 1))):
            return lo << 12, hi - lo, 1     # nothing mapped in the window: all of it
        start = page
        while start > lo and (start - 1) not in mapped and ((start - 1) >> 9) not in huge_blocks:
            start -= 1
        end = page + 1
        while end < hi and end not in mapped and (end >> 9) not in huge_blocks:
            end += 1
        return start << 12, end - start, 1

    def handle_npf(self, vm, gpa, access=ACC_R, errcode=0, rip=None, insn=None, mode=64):
        """Handle one nested page fault. Returns the PSP status (SUCCESS: resume).

        Raises VmStopped when the PSP refuses: the guest cannot make progress."""
        vm.npf += 1
        if vm.fatal is not None:
            raise VmStopped(vm.fatal, f"guest {vm.handle} is stopped ({vm.fatal.name})")
        if errcode & PF_RMP:
            vm.fatal = Status.RMP_FAULT
            raise rmp_fault(self, vm, gpa, access, errcode)
        if errcode & PF_P:
            raise VmStopped(Status.BAD_PAGE_STATE,
                            f"protection NPF at GPA {gpa:#x} (error code {errcode:#x}): "
                            f"every page is mapped RWX, so the table was changed")
        if vm.ram_size is not None and gpa >= vm.ram_size:
            raise VmStopped(Status.OUT_OF_RANGE,
                            f"guest accessed GPA {gpa:#x} beyond its RAM ({vm.ram_size:#x})")
        if vm.fault_around == 1 and not vm.huge:
            # _choose_range's answer for one 4 KiB page, without the call
            g, npages, level = gpa & ~0xFFF, 1, 1
            try:
                hpa = self.alloc.alloc(1)
            except OutOfMemory as e:
                raise VmStopped(Status.RESOURCE_EXHAUSTED, str(e)) from None
        else:
            g, npages, level = self._choose_range(vm, gpa)
            size = PAGE if level == 1 else HUGE
            try:
                hpa = self.alloc.alloc(npages if level == 1 else 512, align=size)
            except OutOfMemory as e:
                raise VmStopped(Status.RESOURCE_EXHAUSTED, str(e)) from None
        # (None for SUCCESS: no Reply is made for it)
        if self.tables.writer == "psp":
            r = self.psp.update_npt_fast(vm.handle, g, hpa, level, ATTR_RWX, npages)
        else:
            r = self.tables.map(vm, g, hpa, level, ATTR_RWX, npages)
            r = None if r.status == _SUCCESS else r
        if r is not None and r.status == _RESOURCE_EXHAUSTED and self.protect == "digest":
            r = self._psp_retry_pool(self.psp.update_npt, vm.handle, g, hpa, level, ATTR_RWX, npages,
                                     reply=r)
        if log.isEnabledFor(_INFO):
            log.info("npf gpa=%#x access=%s err=%#x level=%s hpa=%#x npages=%d status=%s%s",
                     gpa, ACCESS_NAMES.get(access, access), errcode, "2M" if level == 2 else "4K",
                     hpa, npages, "SUCCESS" if r is None else r.name, _insn_text(insn, rip, mode))
        if r is not None and r.status != _SUCCESS:
            self.alloc.free(hpa, npages if level == 1 else 512)
            if r.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED):
                vm.fatal = r.status
            elif r.status == Status.GPA_MAPPED and self.protect == "rmp":
                # the guest already has a frame at this GPA, yet its entry is
                # gone (the table was changed): a second frame there is what
                # SNP's PVALIDATE catches (the guest validates a GPA once)
                vm.fatal = Status.RMP_FAULT
                raise VmStopped(Status.RMP_FAULT,
                                f"NPF at GPA {gpa:#x}, which the RMP has a frame of this guest at: "
                                f"its entry was removed; a second frame there would never be "
                                f"validated: nested fault, guest stopped", fields={"gpa": gpa})
            what = "UPDATE_NPT" if self.tables.writer == "psp" else "the mapping"
            raise VmStopped(r.status, f"PSP refused {what} for GPA {gpa:#x}: {r.name}",
                            fields=r.fields)
        # (GPAs that were not mapped: no TLB holds them, nothing to flush)
        self._record(vm, g >> 12, npages, hpa, level, False)
        return _SUCCESS

    # -- the NPF fast path's share of the policy ---------------------------
    def npf_fast_entry(self, vm):
        """Where the C vCPU may resolve vm's NPFs itself (csrc/vcpu.c
        fast_npf), what it does there: ("psp", address of the PSP's
        UPDATE_NPT entry, its context, its lock word) under digest, ("vmm",
        leaf flags) under none (it writes the leaf itself, as VmmWrites
        does), else None.

        That is the case handle_npf's 4 KiB branch handles: fault-around 1,
        no 2 MiB pages, a guest with RAM of known size that is not stopped,
        the PSP in the VMM's process (under digest with its C core; under
        none too, so that with the PSP process every design takes the same
        Python NPF path, as hv compare measures them), no NPF logging, and
        this class's own handle_npf (a VMM that replaced it, as the attack
        lab does, gets its own for every NPF). Everything else, and every
        NPF the fast path does not take (a refusal, a new table, a
        protection fault), goes through handle_npf."""
        if vm.fault_around != 1 or vm.huge or vm.ram_size is None or vm.fatal is not None:
            return None
        if not self.npf_fast or "handle_npf" in self.__dict__ or log.isEnabledFor(_INFO):
            return None
        if not isinstance(self.transport, InProcessTransport):
            return None
        if self.protect == "none":       # (rmp writes too, but only after RMP_ASSIGN)
            return ("vmm", leaf_flags(ATTR_RWX, 1))
        share = getattr(self.transport, "share_update_entry", None)
        if share is None:
            return None
        if self._fast_entry is None:
            e = share()
            self._fast_entry = ("psp",) + tuple(e) if e else False
        return self._fast_entry or None

    def npfs_resolved(self, vm, gpas, hpas):
        """The bookkeeping handle_npf does (_record of one 4 KiB page), for
        NPFs the fast path resolved: gpas[i] was mapped to the frame hpas[i]
        (digest: by one UPDATE_NPT the PSP answered SUCCESS; none: by the
        vCPU's own write of the leaf), in this order."""
        n = len(gpas)
        if len(hpas) != n:
            raise ValueError(f"{n} fast NPFs with {len(hpas)} frames")
        vm.npf += n
        if self.tables.writer == "psp":      # one UPDATE_NPT each (none: no command)
            psp = self.psp
            psp.commands += n
            psp.by_status[_SUCCESS] = psp.by_status.get(_SUCCESS, 0) + n
        vm.record_pages(gpas, hpas)

    def touch(self, vm, gpa, access=ACC_R):
        """Access one GPA as the guest would: walk, take an NPF on a miss.

        Returns the HPA it translates to. Raises VmStopped if the PSP refuses."""
        for _ in range(3):
            r = self.walk(vm, gpa, access)
            if r.ok:
                return r.hpa
            self.handle_npf(vm, gpa, access, r.errcode)
        raise VmStopped(Status.INTERNAL_ERROR, f"GPA {gpa:#x} still unmapped after its NPF")

    def walk(self, vm, gpa, access=ACC_R, set_ad=True):
        """The CPU's walk of gpa for vm: through nCR3 as the control page
        holds it, with the RMP check under the rmp design."""
        if vm.rmp is not None:
            return self.engine.walk_rmp(self.npt_root(vm), gpa, access, vm.rmp, set_ad)
        return self.engine.walk(self.npt_root(vm), gpa, access, set_ad)

    # -- mappings the design's way (the attack suite's VMM uses these too) ---
    def map(self, vm, gpa, hpa, level=1, attrs=ATTR_RWX, npages=1, force=False):
        """Map gpa.. -> hpa.. as the design does it (digest, isolated:
        UPDATE_NPT; rmp: RMP_ASSIGN, then the VMM's own write; none: the
        write). Returns the Reply; the VMM's own bookkeeping is not updated
        (the NPF path's is). force: write the entry whatever is there (the
        malicious VMM, where the VMM writes the table)."""
        return self.tables.map(vm, gpa, hpa, level, attrs, npages, force)

    def unmap(self, vm, gpa, level=1, npages=1):
        return self.tables.unmap(vm, gpa, level, npages)

    def reclaim(self, vm, hpa, npages=1, level=1):
        """Frames back from a guest (digest, isolated: RECLAIM of unmapped
        frames; rmp: RMP_UNASSIGN, scrubbed; none: nothing to ask)."""
        return self.tables.reclaim(vm, hpa, npages, level)

    def guest_digest(self, vm):
        r = self.psp.guest_status(vm.handle)
        return r.fields.get("digest", b"")


def isolated_region_size(host_mem):
    """The isolated design's PSP-owned range: 1/32 of host memory, at least
    8 MiB, in whole 2 MiB blocks (table and control pages come from it)."""
    return max(8 << 20, (host_mem // 32) >> 21 << 21)


def _insn_text(insn, rip, mode):
    if callable(insn):          # bytes read lazily (only when logging)
        insn = insn()
    if not insn:
        return ""
    from hv.machine.disasm import disasm_one
    return " insn=" + disasm_one(insn, rip or 0, mode)
