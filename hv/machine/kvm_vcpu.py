"""The KVM vCPU: the same guests as the emulator, on /dev/kvm.

Guest RAM is one memslot filled page by page from the PSP's table
(hv/machine/kvm_memory.py): a guest access to a page KVM has no mapping for exits
to us, and we do what the emulated vCPU's TLB-fill hook does on a miss:
walk the table; if it maps nothing, a nested page fault through the VMM
(``vmm.handle_npf``: UPDATE_NPT at the PSP); then map what the table says
and finish the access.  How the access comes back depends on the kernel,
and all three are handled:

- KVM_EXIT_MMIO (this host): KVM has decoded the access.  A read wants its
  data: it is copied from the frame now mapped.  A write has been retired
  by KVM already (RIP is past it): its data is written into the frame.
- KVM_EXIT_INTERNAL_ERROR, emulation failure: an instruction fetch from an
  unmapped page (or an access KVM cannot emulate).  RIP's page -- through
  the guest's own page tables when it has paging on (the 2D walk) -- is
  made to appear, then the page an instruction runs on into, then its
  memory operands (capstone); KVM_RUN runs the instruction again.
- KVM_EXIT_MEMORY_FAULT with -EFAULT (kernels with hardware EPT/NPT and
  KVM_CAP_MEMORY_FAULT_INFO): the GPA is given; map it and KVM_RUN again.

Devices as on the emulator (hv/machine/devices.py): COM1, the exit port 0xF4
(KVM_EXIT_IO), ``hlt`` (KVM_EXIT_HLT), the VGA text buffer (guest RAM, read
through the table).  A triple fault is KVM_EXIT_SHUTDOWN.  The entry state
is the loader's (hv/machine/boot_state.py): the same boot GDT, boot page tables
(ELF64: CR3 = the identity map in guest memory, loaded at launch like every
image page), registers and control registers as on Unicorn, so the guest
sees the same machine and takes the same NPFs.

KVM counts no instructions: ``instructions`` is None; ``exits`` counts
KVM_RUN returns.  ``run(until=t)`` stops at wall time t (perf_counter): a
kicker thread sets kvm_run.immediate_exit and signals the vCPU thread
(KICK_SIGNAL, a no-op handler installed from the main thread), so KVM_RUN
returns even when the guest never exits.  One thread per vCPU; the NPF path
and the memslot are serialized by one lock (the PSP serializes its
commands), and a vCPU that faults on a page another one just mapped finds
it in the table and maps it without an NPF.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import signal
import struct
import threading
import time

from nptcore.bits import (ACC_R, ACC_W, ACC_X, K_GUEST_PF, K_OK, MODE_32, MODE_LONG4, MODE_PAE,
                          PF_FINAL, PF_ID, PF_W, PF_WALK)

from psp_firmware import Status

from hv.errors import VmStopped
from hv.machine import kvm as K
from hv.machine.boot_state import boot_segments
from hv.machine.guest_memory import MODE_NONE, GuestMemoryView
from hv.machine.kvm_memory import GuestRam, GuestRamError
from hv.machine.npf_log import NpfLog
from hv.machine.stop import StopInfo
from hv.vmm.vmm import NCR3_MASK

log = logging.getLogger("hv.kvm")
_npflog = logging.getLogger("hv.npf")
_INFO = logging.INFO

KICK_SIGNAL = signal.SIGRTMIN + 4
CR0_PE, CR0_PG = 1, 1 << 31
CR4_PAE = 0x20
EFER_LMA = 0x400
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MMIO = struct.Struct("<Q8sIB")
_IO = struct.Struct("<BBHIQ")
_handler_lock = threading.Lock()


def _noop(_sig, _frame):
    pass


def _install_kick_handler():
    """A no-op handler for KICK_SIGNAL (from the main thread only). True when one is in place."""
    with _handler_lock:
        cur = signal.getsignal(KICK_SIGNAL)
        if cur not in (signal.SIG_DFL, None):
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(KICK_SIGNAL, _noop)
        return True


class _Kicker:
    """Kicks one vCPU thread out of KVM_RUN at a deadline."""

    def __init__(self, cpu, can_signal):
        self.cpu = cpu
        self.can_signal = can_signal     # else only immediate_exit (seen at the next exit)
        self.cond = threading.Condition()
        self.deadline = None
        self.target = None
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="hv-kvm-kick", daemon=True)
        self.thread.start()

    def arm(self, deadline):
        with self.cond:
            self.deadline, self.target = deadline, threading.get_ident()
            self.cond.notify()

    def disarm(self):
        with self.cond:
            self.deadline = None
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(1)

    def _loop(self):
        with self.cond:
            while not self.closed:
                if self.deadline is None:
                    self.cond.wait()
                    continue
                left = self.deadline - time.perf_counter()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.deadline = None
                try:
                    self.cpu.set_immediate_exit(True)
                    if self.can_signal:
                        signal.pthread_kill(self.target, KICK_SIGNAL)
                except (OSError, ValueError, ProcessLookupError):
                    pass


def set_boot_state(cpu, image, extra=None):
    """Write the image's entry state into a KVM vCPU (a VcpuFd): the
    descriptor caches the boot GDT gives its selectors, GDTR, no IDT (as the
    emulator starts), CR0/CR3/CR4/EFER and the ABI's registers (extra:
    registers to set otherwise)."""
    s = cpu.get_sregs()
    for name, d in boot_segments(image).items():
        s.set_segment(name, d["base"], d["limit"], d["selector"], d["type"], d["present"],
                      d["dpl"], d["db"], d["s"], d["l"], d["g"], d["avl"])
    c = image.cpu
    s.set_table("gdt", c["gdt_base"], c["gdt_limit"])
    s.set_table("idt", 0, 0)
    s["cr3"], s["cr4"], s["efer"], s["cr0"] = c["cr3"], c["cr4"], c["efer"], c["cr0"]
    cpu.set_sregs(s)
    regs = [0] * 18
    for name, value in {**image.initial_regs, **(extra or {})}.items():
        full = {"eip": "rip", "eflags": "rflags"}.get(name, "r" + name[1:] if name[0] == "e"
                                                       else name)
        regs[K.REG_NAMES.index(full)] = value
    cpu.set_regs(regs)


class KvmVcpu(GuestMemoryView):
    """One vCPU of a VM, on /dev/kvm.  See the module docstring.

    kvm_vm / ram: share one KVM VM and its memslot between vCPUs (the first
    vCPU makes them when not given); regs: registers to start with other
    than the image's (e.g. another stack for a second vCPU)."""

    accel = "kvm"
    instructions = None

    def __init__(self, vmm, vm, image, devices=None, record=None, kvm_vm=None, ram=None,
                 vcpu_id=0, regs=None):
        why = K.probe()
        if why is not None:
            raise K.KvmUnavailable(why)
        self.vmm, self.vm, self.image = vmm, vm, image
        self.mem, self.eng = vmm.mem, vmm.engine
        self.devices, self.record = devices, record
        self._vmsa = vm.vmsa
        self.npf_log = NpfLog()       # (gpa, access, errcode, rip or None) of every NPF
        self.gpf_count = 0            # (guest #PFs are delivered by the CPU, not counted)
        self.injected = []
        self.exits = 0                # exits to the VMM (KVM_RUN returns but the kicker's)
        self.kicks = 0                # KVM_RUNs the kicker interrupted (ends of slices)
        self.bits = 64 if image.mode == 64 else 32
        self._closed = False
        self._own = kvm_vm is None
        self.kvm_vm = kvm_vm if kvm_vm is not None else K.KvmVm()
        self.ram = None
        self._kicker = None
        try:
            if ram is None:
                ram = GuestRam(self.kvm_vm, vmm.mem, vmm.engine, self._npt_root, vm.ram_size,
                               rmp=getattr(vm, "rmp", None))
                ram.resync()                # the launch pages: in the table before the run
                self._own_ram = True
            else:
                self._own_ram = False
            self.ram = ram
            self.cpu = self.kvm_vm.create_vcpu(vcpu_id)
            self.cpu.setup_cpuid()
            self._set_boot_state(image, regs or {})
            self._can_kick = _install_kick_handler()
            self._kicker = _Kicker(self.cpu, self._can_kick)
        except BaseException:
            self.close()
            raise
        vm.on_npt_change.append(self.flush_tlb)
        self._want_rip = record is not None

    # -- setup ----------------------------------------------------------------
    def _set_boot_state(self, image, extra):
        set_boot_state(self.cpu, image, extra)

    def control_page(self):
        """HPA of the control page (VMSA) this vCPU takes nCR3 from."""
        return self._vmsa

    def _npt_root(self):
        vmsa = self._vmsa
        if 0 <= vmsa <= self.mem.size - 8:
            return _U64.unpack_from(self.mem.buf, vmsa)[0] & NCR3_MASK
        return self.mem.read_u64(vmsa) & NCR3_MASK      # (raises, saying why)

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self.vm.on_npt_change.remove(self.flush_tlb)
        except ValueError:
            pass
        if self._kicker is not None:
            self._kicker.close()
        if self.ram is not None and getattr(self, "_own_ram", False):
            self.ram.close()
        if self._own:
            self.kvm_vm.close()

    # -- CPU state ---------------------------------------------------------------
    def flush_tlb(self):
        """The table changed: make the memslot follow it (KVM drops what it cached)."""
        if not self._closed:
            self.ram.resync()

    @property
    def pc(self):
        return self.cpu.get_regs()[16]

    def cpu_mode(self, s=None):
        """(paging mode, cr3, lma)"""
        s = s or self.cpu.get_sregs()
        lma = bool(s["efer"] & EFER_LMA)
        if not s["cr0"] & CR0_PG:
            return MODE_NONE, 0, lma
        if lma:
            return MODE_LONG4, s["cr3"], lma
        return (MODE_PAE if s["cr4"] & CR4_PAE else MODE_32), s["cr3"], lma

    def code_bits(self, s=None):
        s = s or self.cpu.get_sregs()
        if s["efer"] & EFER_LMA and s.segment("cs")[8]:
            return 64
        return 32 if s["cr0"] & CR0_PE else 16

    def registers(self):
        r = self.cpu.regs()
        s = self.cpu.get_sregs()
        if self.code_bits(s) == 64:
            out = {k: r[k] for k in ("rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                                     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                                     "rflags")}
        else:
            out = {"e" + k[1:]: r[k] & 0xFFFFFFFF for k in ("rip", "rax", "rbx", "rcx", "rdx",
                                                             "rsi", "rdi", "rbp", "rsp", "rflags")}
        for n in ("cr0", "cr2", "cr3", "cr4", "efer"):
            out[n] = s[n]
        out["cs"] = s.segment("cs")[2]
        out["ss"] = s.segment("ss")[2]
        return out

    # -- guest memory as the VMM sees it: GuestMemoryView (translate, read_virt, read_gpa)

    def last_insns(self, limit=16):
        """[(addr, hex bytes, text)]: the instruction at rip (KVM keeps no history)."""
        from hv.machine.disasm import disasm_many
        s = self.cpu.get_sregs()
        pc = self.pc
        bits = self.code_bits(s)
        return [list(x) for x in disasm_many(self.read_virt(self._linear(pc, s), 15), pc,
                                             bits, count=1)][-limit:]

    def _linear(self, rip, s):
        return rip if self.code_bits(s) == 64 else (s.segment("cs")[0] + rip) & 0xFFFFFFFF

    # -- the NPF path ------------------------------------------------------------
    def _npf(self, va, gpa, access, err, rip, mode):
        """GuestMemoryView's NPF path (a faulting translate): 1 if the guest must stop."""
        try:
            self._take_npf(gpa, access, err, rip, None, 64 if mode == MODE_LONG4 else self.bits)
        except VmStopped:
            return 1
        return 0

    def _take_npf(self, gpa, access, err, rip, insn, bits):
        """One nested page fault through the VMM (may raise VmStopped)."""
        self.npf_log.append((gpa, access, err, rip))
        try:
            self.vmm.handle_npf(self.vm, gpa, access, err, rip, insn, bits)
        finally:
            if self.record is not None:
                self.record.write(access, gpa, rip=rip, insn=insn() if insn else None)

    def _fault(self, gpa, access, rip=None, insn=None, bits=64):
        """Make gpa's page appear in the memslot as the table maps it, with an
        NPF through the VMM if the table maps nothing there.  Returns the
        frame's HPA (of the page)."""
        ram = self.ram
        around = self.vm.fault_around
        with ram.lock:
            for _ in range(4):
                hit = ram.map_gpa(gpa, access, around)
                if hit[0]:
                    return hit[1]
                miss = hit[1]
                self._take_npf(gpa, access, miss.errcode, rip, insn, bits)
        raise VmStopped(Status.INTERNAL_ERROR, f"GPA {gpa:#x} still unmapped after its NPF")

    def _insn_reader(self, rip, s=None):
        """A lazy reader of the instruction bytes at rip (for the trace and the log)."""
        cache = {}

        def insn():
            if "b" not in cache:
                ss = s or self.cpu.get_sregs()
                cache["b"] = self.read_virt(self._linear(rip, ss), 15)
            return cache["b"]
        return insn

    def _on_mmio(self):
        cpu = self.cpu
        pa, data, n, is_write = _MMIO.unpack_from(cpu.run_map, 32)
        access = ACC_W if is_write else ACC_R
        rip = insn = None
        if not is_write and (self._want_rip or _npflog.isEnabledFor(_INFO)):
            # a read exits before its instruction retires: RIP is the
            # faulting instruction (a write's RIP is already past it)
            rip = cpu.get_regs()[16]
            insn = self._insn_reader(rip)
        hpa = self._fault(pa, access, rip, insn, self.bits) + (pa & 0xFFF)
        buf = self.mem.buf
        if is_write:
            buf[hpa:hpa + n] = data[:n]
        else:
            cpu.run_map[40:40 + n] = buf[hpa:hpa + n]

    def _resolve_va(self, va, access, s, rip):
        """Make the page of linear address va appear (its guest-table pages
        first, through the 2D walk).  Returns True if anything was mapped or
        faulted in, False if it was all there; raises _GuestPf."""
        mode, cr3, lma = self.cpu_mode(s)
        bits = self.code_bits(s)
        insn = self._insn_reader(rip, s) if self._want_rip or _npflog.isEnabledFor(_INFO) else None
        changed = False
        for _ in range(8):
            if mode == MODE_NONE:
                gpa = va if lma else va & 0xFFFFFFFF
            else:
                r = self._walk2d(self._npt_root(), cr3, va, access, mode, set_ad=True)
                if r.kind == K_GUEST_PF:
                    raise _GuestPf(va, r.errcode)
                if r.kind != K_OK:          # a miss in the NPT (a guest table page or the page)
                    kind = ACC_X if r.errcode & PF_ID else (ACC_W if r.errcode & PF_W else ACC_R)
                    self._fault(r.gpa, kind, rip, insn, bits)
                    changed = True
                    continue
                gpa = r.gpa
            if self.ram.mapped(gpa) is None:
                self._fault(gpa, access, rip, insn, bits)
                changed = True
            return changed
        return changed

    def _on_internal(self):
        sub, data = self.cpu.internal()
        s = self.cpu.get_sregs()
        rip = self.cpu.get_regs()[16]
        if sub != K.KVM_INTERNAL_ERROR_EMULATION:
            return StopInfo("error", detail=f"KVM internal error {sub} at rip {rip:#x} "
                                            f"(data {[hex(x) for x in data]})")
        lin = self._linear(rip, s)
        try:
            # 1. the instruction's own page (an instruction fetch from an unmapped page)
            if self._resolve_va(lin, ACC_X, s, rip):
                return None
            # 2. the page it runs on into
            from hv.machine.disasm import decode_length, memory_operands
            bits = self.code_bits(s)
            code = self.read_virt(lin, 15)
            size = decode_length(code, rip, bits)
            if size is None and len(code) < 15:
                if self._resolve_va((lin + len(code)) & ((1 << bits) - 1), ACC_X, s, rip):
                    return None
                code = self.read_virt(lin, 15)
            # 3. its memory operands (an access KVM could not emulate)
            regs = self.cpu.regs()

            def reg(name):
                if name in ("fs_base", "gs_base"):
                    return self.cpu.get_sregs().segment(name[:2])[0]
                return _reg_value(regs, name)
            for ea, n in memory_operands(code, rip, bits, reg):
                for page_va in {ea & ~0xFFF, (ea + n - 1) & ~0xFFF}:
                    if self._resolve_va(page_va, ACC_R, s, rip):
                        return None
        except _GuestPf as g:
            return StopInfo("error", detail=f"guest page fault at {g.va:#x} (error code "
                                            f"{g.errcode:#x}) KVM did not deliver, rip {rip:#x}")
        from hv.machine.disasm import disasm_one
        return StopInfo("error", detail=f"KVM could not emulate the instruction at rip {rip:#x} "
                                        f"({disasm_one(self.read_virt(lin, 15), rip, self.code_bits(s))})")

    def _on_memory_fault(self):
        _flags, gpa, _size = self.cpu.memory_fault()
        self._fault(gpa, ACC_R, None, None, self.bits)

    def _on_io(self):
        rm = self.cpu.run_map
        direction, size, port, count, off = _IO.unpack_from(rm, 32)
        dev = self.devices
        for i in range(count):
            o = off + i * size
            if direction == K.KVM_EXIT_IO_OUT:
                value = int.from_bytes(rm[o:o + size], "little")
                if dev is not None and dev.port_out(port, size, value):
                    return StopInfo("exit_port", exit_code=dev.exit_code)
            else:
                v = dev.port_in(port, size) if dev is not None else (1 << (8 * size)) - 1
                rm[o:o + size] = (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return None

    # -- running -------------------------------------------------------------------
    def run(self, count=None, until=None):
        """Run until a stop event, or until wall time `until` (perf_counter;
        StopInfo("limit")).  count: refused (KVM counts no instructions)."""
        if count is not None:
            raise ValueError("KVM counts no guest instructions: run(until=...) instead")
        cpu = self.cpu
        fd, rm = cpu.fd, cpu.run_map
        ioctl, unpack, now = fcntl.ioctl, _U32.unpack_from, time.perf_counter
        if until is not None:
            self._kicker.arm(until)
        cpu.set_immediate_exit(False)
        try:
            while True:
                try:
                    ioctl(fd, K.KVM_RUN, 0)
                    reason = unpack(rm, 8)[0]
                except InterruptedError:
                    rm[1] = 0
                    self.kicks += 1
                    if until is not None and now() >= until:
                        return StopInfo("limit")
                    continue
                except OSError as e:
                    if e.errno == errno.EFAULT and unpack(rm, 8)[0] == K.KVM_EXIT_MEMORY_FAULT:
                        reason = K.KVM_EXIT_MEMORY_FAULT
                    else:
                        return StopInfo("error", detail=f"KVM_RUN failed: {e.strerror or e}")
                self.exits += 1
                try:
                    if reason == K.KVM_EXIT_MMIO:
                        self._on_mmio()
                    elif reason == K.KVM_EXIT_IO:
                        st = self._on_io()
                        if st is not None:
                            return st
                    elif reason == K.KVM_EXIT_HLT:
                        return StopInfo("hlt", exit_code=0)
                    elif reason == K.KVM_EXIT_INTERNAL_ERROR:
                        st = self._on_internal()
                        if st is not None:
                            return st
                    elif reason == K.KVM_EXIT_MEMORY_FAULT:
                        self._on_memory_fault()
                    elif reason == K.KVM_EXIT_SHUTDOWN:
                        return StopInfo("triple_fault",
                                        detail=f"shutdown (KVM_EXIT_SHUTDOWN) at rip {self.pc:#x}")
                    elif reason == K.KVM_EXIT_INTR:
                        pass
                    else:
                        return StopInfo("error", detail=f"unexpected KVM exit "
                                                        f"{K.EXIT_NAMES.get(reason, reason)} at "
                                                        f"rip {self.pc:#x}")
                except VmStopped as e:
                    return self._stopped(e)
                except GuestRamError as e:
                    return StopInfo("error", detail=str(e))
                if until is not None and now() >= until:
                    return StopInfo("limit")
        finally:
            if until is not None:
                self._kicker.disarm()

    def _stopped(self, e):
        f = {}
        if self.npf_log:
            gpa, access, err, rip = self.npf_log[-1]
            f = {"va": gpa, "gpa": gpa, "access": access, "errcode": err,
                 "rip": rip if rip is not None else self.pc, "walk": bool(err & PF_WALK),
                 "final": bool(err & PF_FINAL)}
        return StopInfo("vm_stopped", stopped=e, fault=f)


class _GuestPf(Exception):
    def __init__(self, va, errcode):
        super().__init__(va)
        self.va, self.errcode = va, errcode


_REG32 = {"e" + n[1:]: n for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")}


def _reg_value(regs, name):
    """A general register by capstone's name (rax, eax, r8d, ...) from KVM's regs dict."""
    if name in regs:
        return regs[name]
    if name in _REG32:
        return regs[_REG32[name]] & 0xFFFFFFFF
    if name.startswith("r") and name[-1] in "dwb" and name[1:-1].isdigit():
        v = regs[name[:-1]]
        return v & {"d": 0xFFFFFFFF, "w": 0xFFFF, "b": 0xFF}[name[-1]]
    return 0


__all__ = ["KvmVcpu", "KICK_SIGNAL"]
