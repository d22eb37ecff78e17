"""The emulated vCPU: Unicorn 2.1 with the PSP-managed NPT as its MMU.

Host memory (``vmm.mem.buf``) is mapped once into Unicorn's physical space
at 0, so a TLB entry's physical address is the HPA.  Unicorn runs with
``UC_TLB_VIRTUAL`` and a TLB-fill hook that plays the hardware walker:

- paging off (CR0.PG=0): the linear address is the GPA, walked through the
  NPT (1D walk);
- paging on: the 2D walk (``MODE_LONG4`` when EFER.LMA, ``MODE_PAE`` when
  CR4.PAE, else ``MODE_32``): the guest's own tables, each of their reads
  translated through the NPT.

The mode is read from CR0/CR4/EFER at every fill, so guests that switch
paging are honoured; the emulator's TLB is flushed after every NPT change
it may hold (``vm.on_npt_change``: not after the NPF path's own mappings,
which only make not-present entries present, and those are never cached)
and whenever the guest reloads CR3 or changes mode (Unicorn flushes its
own TLB then).  TLB hits never leave the emulator.  A
miss in the NPT is an NPF: the hook fills in AMD's error code (``PF_WALK``
during the guest's table walk, ``PF_FINAL`` on the final address, ``PF_ID``
for a fetch, ``PF_W`` for a write), calls the VMM (``vmm.handle_npf``: it
asks the PSP), and retries the walk.  A not-present guest PTE is a guest
#PF: the fill fails, Unicorn stops, and the #PF is injected through the
guest's IDT here (no usable IDT: #DF, then triple fault).

Two hook backends with the same behaviour: ``"c"`` (``hv._vcpu_c``, built
from csrc/vcpu.c and registered straight with libunicorn's ``uc_hook_add``;
Python is entered only for an NPF and for the first sight of a basic
block) and ``"python"`` (a Python TLB-fill hook using ``vmm.engine``; it
also records every GPA page the walker translated, guest table pages
included, for cross-checks).

Instructions are counted with a basic-block hook (C when built): each new
block is decoded once with capstone; the block a run stops in is counted up
to the stop address.  Unicorn specifics handled here: after ``hlt`` Unicorn
probes the page of emu_start's ``until`` address (a fetch fill we answer with
a scratch frame and take as "the guest halted"); ``ud2`` surfaces as
UC_ERR_INSN_INVALID (-> #UD); other exceptions arrive through UC_HOOK_INTR;
an exception raised in a hook is recorded and re-raised after emu_start.
"""
from __future__ import annotations

import ctypes
import logging

from unicorn import (UC_ARCH_X86, UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_ERR_INSN_INVALID,
                     UC_HOOK_BLOCK, UC_HOOK_INSN, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_32,
                     UC_MODE_64, UC_PROT_ALL, UC_TLB_VIRTUAL, Uc, UcError)
from unicorn import x86_const as X

from nptcore.bits import (ACC_R, ACC_W, ACC_X, K_GUEST_PF, MODE_32, MODE_LONG4, MODE_PAE, PF_FINAL,
                          PF_ID, PF_W, PF_WALK)

from hv.machine.fast_npf import FastNpf
from hv.machine.npf_log import NpfLog
from hv.machine.unicorn_hooks import _add_c_hook, _ffi, _lib, _registry, _uclib, available_hooks
from hv.machine.guest_memory import MODE_NONE, GuestMemoryView
from hv.machine.exceptions import ExceptionDelivery, _Halt, vec_name
from hv.machine.boot_state import MSR_EFER, apply_boot_state
from hv.machine.stop import StopInfo
from hv.machine.sigint import SigintGuard
from hv.errors import VmStopped

log = logging.getLogger("hv.vcpu")
_npflog = logging.getLogger("hv.npf")
_INFO = logging.INFO
# uc_ctl's request word for a TLB flush, encoded as Uc.ctl encodes it:
# (op << 30) | (nargs << 26) | control
_CTL_TLB_FLUSH_WRITE = (UC_CTL_IO_WRITE << 30) | UC_CTL_TLB_FLUSH
_flush_tlb = getattr(_lib, "vcpu_flush_tlb", None)

CR0_PE, CR0_PG = 1, 1 << 31
CR4_PAE = 0x20
EFER_LMA = 0x400
UC_PROT_R, UC_PROT_W, UC_PROT_X = 1, 2, 4
_PERMS = {ACC_R: UC_PROT_R, ACC_W: UC_PROT_R | UC_PROT_W, ACC_X: UC_PROT_R | UC_PROT_X}
_UC_ACC = {16: ACC_R, 17: ACC_W, 18: ACC_X}
MODE_NAMES = {MODE_NONE: "no paging", MODE_32: "32-bit paging", MODE_PAE: "PAE paging",
              MODE_LONG4: "4-level paging"}


def _warm_decoder(bits):
    """Import capstone and make its decoder now, while the vCPU is set up.

    The block hook decodes every new basic block with capstone; left to the
    first block, the import (about 50 ms: capstone's package imports every
    architecture's module) lands inside the first emu_start, i.e. in the
    guest's measured run time (`hv boot`'s elapsed_s, and everything derived
    from it, such as the time per NPF).  Nothing changes if capstone is
    missing: the first block then fails as before."""
    try:
        from hv.machine.disasm import _cs
        _cs(bits)
    except Exception:       # noqa: BLE001 - reported by the first decode instead
        pass


class UnicornVcpu(GuestMemoryView, ExceptionDelivery, FastNpf):
    """One vCPU of a VM, on Unicorn.  See the module docstring."""

    def __init__(self, vmm, vm, image, hook="c", devices=None, record=None):
        if hook not in ("c", "python"):
            raise ValueError(f"unknown vCPU hook backend {hook!r} (c or python)")
        if hook == "c" and "c" not in available_hooks():
            raise RuntimeError("the C vCPU hook (hv._vcpu_c) is not built")
        self.vmm, self.vm, self.image = vmm, vm, image
        # the control page the CPU takes nCR3 from, fixed when the vCPU is
        # made (both hooks); Boot checks it with the PSP on every VMRUN
        self._vmsa = vm.vmsa
        self.hook = hook
        self.eng = vmm.engine
        self.mem = vmm.mem
        self.devices = devices
        self.record = record
        self.touched = set()          # python hook: GPA pages the walker translated
        self.npf_log = NpfLog()       # (gpa, access, errcode, rip) of every NPF
        self.gpf_count = 0
        self.injected = []            # (vector, rip) of exceptions delivered
        self._exc = None
        self._stopped = None          # VmStopped from an NPF
        self._stop_fault = {}
        self._pending_intr = None
        self._halted = False
        self._pyfault = None
        self._stop_flag = 0
        self._blocks = {}
        self._adjust = 0              # instructions not executed in stopped blocks
        self._py_insns = 0
        self._py_last = (0, 0, 0)
        self._closed = False
        self._exit_pc = None
        self._fast_batch = 64         # frames handed to the NPF fast path per arming
        self._fast_frames = []
        self.sigint = SigintGuard(lambda: self.uc.emu_stop())  # entered by Boot.run

        self.bits = 64 if image.mode == 64 else 32
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64 if image.mode == 64 else UC_MODE_32)
        self._pc_reg = X.UC_X86_REG_RIP if image.mode == 64 else X.UC_X86_REG_EIP
        self._until = (1 << 64) - 1 if image.mode == 64 else (1 << 32) - 1
        self._sentinel_page = self._until & ~0xFFF
        self._sentinel_hpa = vmm.alloc.alloc(1)
        vmm.mem.write(self._sentinel_hpa, b"\xf4" * 4096)      # hlt, should it ever run
        self._host = ctypes.c_char.from_buffer(vmm.mem.buf)
        uc.mem_map_ptr(0, vmm.mem.size, UC_PROT_ALL, ctypes.addressof(self._host))
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)

        self._ctx = None
        self._c_flush = False         # flush_tlb through the C module (_setup_c)
        self._hh = []
        if hook == "c" or (_lib is not None and _uclib is not None):
            self._setup_c(fill=(hook == "c"))
        if hook == "python":
            uc.hook_add(UC_HOOK_TLB_FILL, self._py_fill)
        if self._ctx is None:
            uc.hook_add(UC_HOOK_BLOCK, self._py_block)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        vm.on_npt_change.append(self.flush_tlb)
        self._set_boot_state(image)
        _warm_decoder(self.bits)

    def control_page(self):
        """HPA of the control page (VMSA) this vCPU takes nCR3 from."""
        ctx = getattr(self, "_ctx", None)
        return int(ctx.vmsa) if ctx is not None else self._vmsa

    def _npt_root(self):
        return self.mem.read_u64(self._vmsa) & 0x000F_FFFF_FFFF_F000

    # -- setup ---------------------------------------------------------------
    def _setup_c(self, fill):
        ctx = _ffi.new("vcpu_ctx *")
        self._blk_table = _ffi.new("vcpu_blk[]", 1 << 16)
        self._cmem = _ffi.from_buffer("uint8_t[]", self.mem.buf, require_writable=True)
        ctx.mem = self._cmem
        ctx.mem_size = self.mem.size
        ctx.vmsa = self._vmsa
        ctx.uc = _ffi.cast("void *", self.uc._uch.value)
        ctx.reg_read = _ffi.cast("void *", ctypes.cast(_uclib.uc_reg_read, ctypes.c_void_p).value)
        if _flush_tlb is not None:        # (else a _vcpu_c older than vcpu_flush_tlb)
            ctx.uc_ctl = _ffi.cast("void *", ctypes.cast(_uclib.uc_ctl, ctypes.c_void_p).value)
            ctx.ctl_tlb_flush = _CTL_TLB_FLUSH_WRITE
            self._c_flush = True
        ctx.sentinel_page = self._sentinel_page
        ctx.sentinel_hpa = self._sentinel_hpa
        ctx.handle = id(self)
        ctx.pc_reg = self._pc_reg
        ctx.blocks = self._blk_table
        rmp = getattr(self.vm, "rmp", None)
        if rmp is not None:
            # the rmp design: the fill checks every translation (csrc/vcpu.c)
            from nptcore.cengine import CEngine, ffi as npt_ffi
            ctx.rmp = _ffi.cast("void *", int(npt_ffi.cast("uintptr_t", CEngine._rmp_c(rmp))))
        self._ctx = ctx
        _registry[id(self)] = self
        ud = ctypes.c_void_p(int(_ffi.cast("uintptr_t", ctx)))
        kinds = [(UC_HOOK_BLOCK, _lib.vcpu_block_addr())]
        if fill:
            kinds.insert(0, (UC_HOOK_TLB_FILL, _lib.vcpu_tlb_fill_addr()))
        for htype, addr in kinds:
            self._hh.append(_add_c_hook(self.uc, htype, addr, ud))

    def _set_boot_state(self, image):
        # segment loads read the boot GDT through the walker (launch pages)
        apply_boot_state(self.uc, image)
        self._stop_flag = 0
        if self._ctx is not None:
            self._ctx.stop = 0

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self.vm.on_npt_change.remove(self.flush_tlb)
        except ValueError:
            pass
        _registry.pop(id(self), None)
        self.uc = None

    # -- CPU state -----------------------------------------------------------
    def flush_tlb(self):
        if self.uc is not None:
            if self._c_flush:
                # uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE) as one C call,
                # without the binding's ctypes varargs call
                err = _flush_tlb(self._ctx)
                if err:
                    raise UcError(err)
            else:
                self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    @property
    def pc(self):
        return self.uc.reg_read(self._pc_reg)

    def cpu_mode(self):
        """(paging mode, cr3, lma)"""
        uc = self.uc
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        efer = uc.msr_read(MSR_EFER)
        lma = bool(efer & EFER_LMA)
        if not cr0 & CR0_PG:
            return MODE_NONE, 0, lma
        cr3 = uc.reg_read(X.UC_X86_REG_CR3)
        if lma:
            return MODE_LONG4, cr3, lma
        if uc.reg_read(X.UC_X86_REG_CR4) & CR4_PAE:
            return MODE_PAE, cr3, lma
        return MODE_32, cr3, lma

    def code_bits(self):
        """16/32/64: decoding mode from the CPU state (long mode is taken as
        64-bit code; compatibility mode is not modelled)."""
        uc = self.uc
        if uc.msr_read(MSR_EFER) & EFER_LMA:
            return 64
        return 32 if uc.reg_read(X.UC_X86_REG_CR0) & CR0_PE else 16

    def registers(self):
        uc = self.uc
        if self.code_bits() == 64:
            names = ["rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rflags"]
        else:
            names = ["eip", "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eflags"]
        out = {n: uc.reg_read(getattr(X, "UC_X86_REG_" + n.upper())) for n in names}
        for n in ("cr0", "cr2", "cr3", "cr4"):
            out[n] = uc.reg_read(getattr(X, "UC_X86_REG_" + n.upper()))
        out["efer"] = uc.msr_read(MSR_EFER)
        out["cs"] = uc.reg_read(X.UC_X86_REG_CS)
        out["ss"] = uc.reg_read(X.UC_X86_REG_SS)
        return out

    # -- the NPF path (both hooks) -------------------------------------------
    def _npf(self, va, gpa, access, err, rip, mode):
        """Resolve one NPF through the VMM.  Returns 0 to retry the walk, 1 to stop."""
        self._disarm_fast()           # the fast path's NPFs came first
        r = self._npf_python(va, gpa, access, err, rip, mode)
        if r == 0:
            self._arm_fast()
        return r

    def _npf_python(self, va, gpa, access, err, rip, mode):
        kind = ACC_X if err & PF_ID else (ACC_W if err & PF_W else ACC_R)
        bits = 64 if mode == MODE_LONG4 else (32 if self.bits == 32 or mode else self.bits)
        self.npf_log.append((gpa, kind, err, rip))
        record = self.record
        if record is None and not _npflog.isEnabledFor(_INFO):
            insn = None         # nothing will read the instruction bytes
        else:
            cache = {}

            def insn():
                if "b" not in cache:
                    cache["b"] = self.insn_bytes(rip)
                return cache["b"]

        try:
            self.vmm.handle_npf(self.vm, gpa, kind, err, rip, insn, bits)
        except VmStopped as e:
            if _npflog.isEnabledFor(_INFO):
                from hv.machine.disasm import disasm_one
                b = insn() if insn is not None else self.insn_bytes(rip)
                _npflog.info("npf gpa=%#x access=%s err=%#x rip=%#x refused: %s insn=%s", gpa, "rwx"[kind],
                             err, rip, e, disasm_one(b, rip, bits) if b else
                             "(unreadable: the fetch of it is what faulted)")
            self._stopped = e
            self._stop_fault = {"va": va, "gpa": gpa, "access": kind, "errcode": err, "rip": rip,
                                "walk": bool(err & PF_WALK), "final": bool(err & PF_FINAL)}
            if record is not None:
                record.write(kind, gpa, rip=rip, insn=insn())
            return 1
        if record is not None:
            record.write(kind, gpa, rip=rip, insn=insn())
        return 0

    # -- the Python TLB-fill hook ---------------------------------------------
    def _py_fill(self, uc, va, typ, entry, _ud):
        try:
            access = _UC_ACC.get(typ, ACC_R)
            if access == ACC_X and va == self._sentinel_page:
                self._halted = True
                entry.paddr = self._sentinel_hpa
                entry.perms = UC_PROT_R | UC_PROT_X
                return True
            if self._stop_flag:
                return False
            mode, cr3, lma = self.cpu_mode()
            for _ in range(8):
                root = self._npt_root()
                if mode == MODE_NONE:
                    gpa = va if lma else va & 0xFFFFFFFF
                    r = self._walk(root, gpa, access)
                    if r.ok:
                        self.touched.add(gpa >> 12)
                        entry.paddr = r.hpa & ~0xFFF
                        entry.perms = _PERMS[access]
                        return True
                    err = r.errcode
                else:
                    r = self._walk2d(root, cr3, va, access, mode)
                    if r.ok:
                        self.touched.add(r.gpa >> 12)
                        self.touched.update(self._table_pages(root, cr3, va, mode))
                        entry.paddr = r.hpa & ~0xFFF
                        entry.perms = _PERMS[access]
                        return True
                    if r.kind == K_GUEST_PF:
                        self.touched.update(self._table_pages(root, cr3, va, mode))
                        self._pyfault = (va, r.errcode, uc.reg_read(self._pc_reg))
                        self._stop_flag = 2
                        return False
                    gpa, err = r.gpa, r.errcode
                if self._npf(va, gpa, access, err, uc.reg_read(self._pc_reg), mode):
                    self._stop_flag = 1
                    return False
            self._stop_flag = 3
            return False
        except BaseException as e:     # noqa: BLE001 - re-raised after emu_start
            self._exc = e
            self._stop_flag = 1
            return False

    # -- instruction counting ---------------------------------------------------
    def _block_ninsns(self, addr, size):
        key = (addr, size)
        n = self._blocks.get(key)
        if n is None:
            n = len(self._decode(addr, size)) or 1
            self._blocks[key] = n
        return n

    def _decode(self, addr, size):
        from hv.machine.disasm import _cs
        code = self.read_virt(addr, size) if size else b""
        return [(a, s) for a, s, _, _ in _cs(self.code_bits()).disasm_lite(code, addr)]

    def _py_block(self, uc, addr, size, _ud):
        try:
            n = self._block_ninsns(addr, size)
            self._py_insns += n
            self._py_last = (addr, size, n)
        except BaseException as e:    # noqa: BLE001
            self._exc = e
            uc.emu_stop()

    @property
    def instructions(self):
        base = self._ctx.insns if self._ctx is not None else self._py_insns
        return base + self._adjust

    def _last_block(self):
        if self._ctx is not None:
            return self._ctx.last_addr, self._ctx.last_size, self._ctx.last_n
        return self._py_last

    def _clear_last(self):
        if self._ctx is not None:
            self._ctx.last_n = 0
        else:
            self._py_last = (0, 0, 0)

    def _account(self, pc):
        """The block the run stopped in ran only up to pc: uncount the rest."""
        addr, size, n = self._last_block()
        if n:
            self._last_seen = (addr, size)
        if n and addr <= pc < addr + size:
            done = sum(1 for a, _ in self._decode(addr, size) if a < pc)
            self._adjust -= max(0, n - done)
        self._clear_last()

    def last_insns(self, limit=16):
        """[(addr, hex bytes, text)]: the last block run, up to and including
        the instruction at the current pc (for failure reports)."""
        from hv.machine.disasm import disasm_many
        pc = self.pc
        bits = self.code_bits()
        addr, size = getattr(self, "_last_seen", (pc, 0))
        out = []
        if addr <= pc < addr + size or addr == pc:
            code = self.read_virt(addr, (pc - addr) + 15)
            for a, hx, text in disasm_many(code, addr, bits, count=64):
                out.append((a, hx, text))
                if a >= pc:
                    break
        else:
            if size:
                out += list(disasm_many(self.read_virt(addr, size), addr, bits, count=64))
            out += list(disasm_many(self.read_virt(pc, 15), pc, bits, count=1))
        return [list(x) for x in out[-limit:]]

    # -- devices and exceptions ----------------------------------------------
    def _on_out(self, uc, port, size, value, _ud):
        try:
            if self.devices is not None and self.devices.port_out(port, size, value):
                # Unicorn finishes the block after emu_stop: the run ends here
                self._exit_pc = uc.reg_read(self._pc_reg)
                uc.emu_stop()
        except BaseException as e:    # noqa: BLE001
            self._exc = e
            uc.emu_stop()

    def _on_in(self, uc, port, size, _ud):
        try:
            return self.devices.port_in(port, size) if self.devices is not None else 0xFF
        except BaseException as e:    # noqa: BLE001
            self._exc = e
            uc.emu_stop()
            return 0

    def _on_intr(self, uc, intno, _ud):
        self._pending_intr = intno
        uc.emu_stop()

    # -- running ---------------------------------------------------------------
    def _reset_flags(self):
        self._exc = None
        self._stopped = None
        self._pending_intr = None
        self._halted = False
        self._pyfault = None
        self._stop_flag = 0
        self._exit_pc = None
        if self._ctx is not None:
            self._ctx.stop = 0
            self._ctx.halted = 0
        self._clear_last()

    def run(self, count=None):
        """Run until a stop event, or until `count` more instructions retired.

        Returns a StopInfo.  Guest exceptions are delivered through the IDT
        on the way (a triple fault ends the run)."""
        start = self.instructions
        uc = self.uc
        while True:
            budget = 0
            if count is not None:
                budget = count - (self.instructions - start)
                if budget <= 0:
                    return StopInfo("limit")
            self._reset_flags()
            err = None
            self._arm_fast()
            try:
                with self.sigint.emulating():     # Ctrl-C: see hv/machine/sigint.py
                    uc.emu_start(self.pc, self._until, count=budget)
            except UcError as e:
                err = e
            finally:
                self._disarm_fast()
            pc = self.pc
            if self._exit_pc is not None:
                # count up to and including the OUT that ended the run
                self._account(self._exit_pc + 1)
            else:
                self._account(pc)
            ctx = self._ctx
            if ctx is not None and self.hook == "c":
                flag = ctx.stop
                gpf = (ctx.f_va, ctx.f_err, ctx.f_rip) if flag == 2 else None
            else:
                flag, gpf = self._stop_flag, self._pyfault
            if self._exc is not None:
                e, self._exc = self._exc, None
                raise e
            if self.devices is not None and self.devices.exit_code is not None:
                return StopInfo("exit_port", exit_code=self.devices.exit_code)
            if self._stopped is not None:
                return StopInfo("vm_stopped", stopped=self._stopped, fault=self._stop_fault)
            try:
                if flag == 2:
                    va, ecode, _rip = gpf
                    va = self._exact_cr2(va, pc, ecode)
                    self.gpf_count += 1
                    story = self._deliver(14, ecode, va)
                    if story:
                        return StopInfo("triple_fault", detail=f"{story}; #PF at rip {pc:#x}, cr2 {va:#x}, "
                                        f"error code {ecode:#x}")
                    continue
                if flag == 3:
                    return StopInfo("error", detail=f"NPF at rip {pc:#x} still unresolved after retries")
                if self._pending_intr is not None:
                    vec = self._pending_intr
                    story = self._deliver(vec)
                    if story:
                        return StopInfo("triple_fault", detail=f"{story}; first {vec_name(vec)} at rip {pc:#x}")
                    continue
                if err is not None:
                    if err.errno == UC_ERR_INSN_INVALID:
                        story = self._deliver(6)
                        if story:
                            return StopInfo("triple_fault",
                                            detail=f"{story}; first #UD at rip {pc:#x}")
                        continue
                    return StopInfo("error", detail=f"emulator error at rip {pc:#x}: {err}")
            except _Halt:
                if self._exc is not None:
                    e, self._exc = self._exc, None
                    raise e
                return StopInfo("vm_stopped", stopped=self._stopped, fault=self._stop_fault)
            if count is not None and self.instructions - start >= count:
                return StopInfo("limit")
            if err is None and self.sigint.kicked:
                continue        # stopped by the Ctrl-C helper, but no Ctrl-C is pending
            # (Unicorn probes the `until` page after hlt, but after a count
            # stop too: the byte before pc tells)
            if err is None and self.read_virt(pc - 1, 1) == b"\xf4":
                return StopInfo("hlt", exit_code=0)
            if count is None:
                return StopInfo("error", detail=f"emulator stopped at rip {pc:#x} for no known reason")
            # emu_start ended by its count: go round, the budget check decides
