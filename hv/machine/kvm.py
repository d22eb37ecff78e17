"""A /dev/kvm client: VMs, memslots, vCPU file descriptors, exits.

Only `fcntl.ioctl`, `mmap` and `struct`.  Two users:

- the KVM vCPU (hv/machine/kvm_vcpu.py): :class:`KvmVm` (one VM, memslots
  over host ranges the caller owns) and :class:`VcpuFd` (one vCPU: its
  registers, CPUID, the shared ``kvm_run`` page and the decoded exits);
- the yardstick `hv bench` puts beside our NPF cost (:class:`Kvm`,
  :func:`bench_faults`, :func:`bench_exits`): one small memslot for the
  code and one large memslot for the pages to touch, one vCPU in 32-bit
  protected mode (flat segments loaded straight into the descriptor caches
  through KVM_SET_SREGS, no GDT in memory, no paging), and two
  hand-assembled guests:

  - touch: write one byte to each of N consecutive pages of the large
    memslot, then `out` to a port. The host backs the memslot with fresh
    anonymous memory (transparent huge pages disabled by default), so every
    page is an in-kernel demand fault: NPT/EPT violation, get_user_pages,
    zeroing, map, resume. Time per page = the wall time of that KVM_RUN / N.
  - exits: a loop of M `out` instructions, each one a KVM_EXIT_IO to user
    space and back (KVM_RUN from Python): time per exit.

:func:`probe` says why /dev/kvm cannot be used (None when it can);
:func:`available` is its yes/no; the benchmark functions return None when
it cannot.
"""

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import time

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90

KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MEMORY_FAULT_INFO = 232

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_MEMORY_FAULT = 39
EXIT_NAMES = {KVM_EXIT_UNKNOWN: "unknown", KVM_EXIT_EXCEPTION: "exception", KVM_EXIT_IO: "io",
              KVM_EXIT_DEBUG: "debug", KVM_EXIT_HLT: "hlt", KVM_EXIT_MMIO: "mmio",
              KVM_EXIT_SHUTDOWN: "shutdown", KVM_EXIT_FAIL_ENTRY: "fail_entry",
              KVM_EXIT_INTR: "intr", KVM_EXIT_INTERNAL_ERROR: "internal_error",
              KVM_EXIT_MEMORY_FAULT: "memory_fault"}
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

PAGE = 4096
CODE_GPA = 0x1000
CODE_SLOT_SIZE = 1 << 20
BIG_GPA = 1 << 30
PORT = 0x10
MADV_NOHUGEPAGE = 15
MADV_HUGEPAGE = 14

_REGION = struct.Struct("<IIQQQ")
_SEG = struct.Struct("<QIHBBBBBBBBBx")       # struct kvm_segment, 24 bytes
_SREGS_SIZE = 312
_REGS = struct.Struct("<18Q")                # rax..r15, rip, rflags
_CPUID_ENTRY = struct.Struct("<IIIIIIIIII")  # struct kvm_cpuid_entry2, 40 bytes
_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")                # kvm_run.io at 32
_MMIO = struct.Struct("<Q8sIB")              # kvm_run.mmio at 32
_MEMFAULT = struct.Struct("<QQQ")            # kvm_run.memory_fault at 32
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
# struct kvm_sregs: 8 segments, gdt, idt (base u64, limit u16, 3 u16 padding), cr0 cr2 cr3 cr4 cr8 efer apic_base
_SREG_OFF = {"gdt": 192, "idt": 208, "cr0": 224, "cr2": 232, "cr3": 240, "cr4": 248, "cr8": 256,
             "efer": 264, "apic_base": 272}


class KvmError(Exception):
    pass


class KvmUnavailable(KvmError):
    """/dev/kvm is missing or refuses: str() says why, in one line."""


def _signed(x):
    """fcntl.ioctl's integer argument is a C int."""
    return x - (1 << 32) if x >= 1 << 31 else x


_probe_result = []


def probe(refresh=False):
    """None when a VM with a vCPU can be made here, else why not (one line)."""
    if _probe_result and not refresh:
        return _probe_result[0]
    why = None
    try:
        with KvmVm() as vm:
            vm.create_vcpu().setup_cpuid()
    except KvmError as e:
        why = str(e)
    except OSError as e:
        why = f"{e.strerror or e}"
    _probe_result[:] = [why]
    return why


def available():
    """True when /dev/kvm exists and a VM can be created."""
    try:
        with Kvm():
            return True
    except (OSError, KvmError):
        return False


def _addr(mm):
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


def _ioctl(fd, req, arg, what):
    try:
        return fcntl.ioctl(fd, req, arg)
    except OSError as e:
        raise KvmError(f"{what} failed: {e.strerror or e}") from None


class KvmVm:
    """One KVM VM: its fds, memslots and vCPUs. Use as a context manager."""

    def __init__(self):
        self._fds = []
        self._maps = []
        self.vcpus = []
        try:
            self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"/dev/kvm: {e.strerror or e}") from None
        self._fds.append(self.kvm)
        try:
            if fcntl.ioctl(self.kvm, KVM_GET_API_VERSION, 0) != 12:
                raise KvmUnavailable("/dev/kvm: unexpected KVM API version")
            try:
                self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
            except OSError as e:
                raise KvmUnavailable(f"KVM_CREATE_VM: {e.strerror or e}") from None
            self._fds.append(self.vm)
            try:
                fcntl.ioctl(self.vm, KVM_SET_TSS_ADDR, _signed(0xFFFBD000))
            except OSError:
                pass
        except BaseException:
            self.close()
            raise
        self._slot = 0
        self.run_size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0)

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on the VM (0: not supported)."""
        try:
            return fcntl.ioctl(self.vm, KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def add_slot(self, gpa, size, host_addr, flags=0):
        """A memslot: guest-physical [gpa, gpa+size) -> host virtual host_addr. Returns its id."""
        slot = self._slot
        _ioctl(self.vm, KVM_SET_USER_MEMORY_REGION,
               _REGION.pack(slot, flags, gpa, size, host_addr), "KVM_SET_USER_MEMORY_REGION")
        self._slot += 1
        return slot

    def create_vcpu(self, vcpu_id=None):
        """A new vCPU (id: the next free one). Returns its VcpuFd."""
        v = VcpuFd(self, len(self.vcpus) if vcpu_id is None else vcpu_id)
        self.vcpus.append(v)
        return v

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as bytes of struct kvm_cpuid2."""
        n = 64
        while True:
            buf = bytearray(8 + n * _CPUID_ENTRY.size)
            _U32.pack_into(buf, 0, n)
            try:
                fcntl.ioctl(self.kvm, KVM_GET_SUPPORTED_CPUID, buf, True)
                return bytes(buf[:8 + _U32.unpack_from(buf, 0)[0] * _CPUID_ENTRY.size])
            except OSError as e:
                if e.errno != errno.E2BIG or n >= 4096:
                    raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {e.strerror or e}") from None
                n *= 2

    def close(self):
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        for m in self._maps:
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        self._maps = []
        for fd in reversed(self._fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Sregs:
    """struct kvm_sregs as a bytearray, with named fields."""

    def __init__(self, raw):
        self.raw = bytearray(raw)

    def __getitem__(self, name):
        return struct.unpack_from("<Q", self.raw, _SREG_OFF[name])[0]

    def __setitem__(self, name, value):
        struct.pack_into("<Q", self.raw, _SREG_OFF[name], value)

    def segment(self, name):
        """(base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable)"""
        return _SEG.unpack_from(self.raw, 24 * SEG_NAMES.index(name))

    def set_segment(self, name, base, limit, selector, type_, present=1, dpl=0, db=0, s=1, l=0,
                    g=0, avl=0, unusable=0):
        _SEG.pack_into(self.raw, 24 * SEG_NAMES.index(name), base, limit, selector, type_, present,
                       dpl, db, s, l, g, avl, unusable)

    def set_table(self, name, base, limit):
        """gdt / idt: base and limit."""
        struct.pack_into("<QH", self.raw, _SREG_OFF[name], base, limit)

    def table(self, name):
        return struct.unpack_from("<QH", self.raw, _SREG_OFF[name])


class VcpuFd:
    """One vCPU: its fd, the kvm_run page, registers, and the decoded exits."""

    def __init__(self, vm, vcpu_id):
        self.vm = vm
        self.id = vcpu_id
        self.run_map = None
        self.fd = _ioctl(vm.vm, KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        try:
            self.run_map = mmap.mmap(self.fd, vm.run_size, flags=mmap.MAP_SHARED,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise

    def setup_cpuid(self):
        """Give the vCPU what KVM supports (long mode needs CPUID.LM)."""
        # (a mutable buffer: fcntl.ioctl copies immutable ones into 1 KiB)
        _ioctl(self.fd, KVM_SET_CPUID2, bytearray(self.vm.supported_cpuid()), "KVM_SET_CPUID2")

    # -- registers ------------------------------------------------------------
    def get_regs(self):
        return list(_REGS.unpack(fcntl.ioctl(self.fd, KVM_GET_REGS, bytes(_REGS.size))))

    def set_regs(self, regs):
        fcntl.ioctl(self.fd, KVM_SET_REGS, _REGS.pack(*regs))

    def regs(self):
        return dict(zip(REG_NAMES, self.get_regs()))

    def get_sregs(self):
        return Sregs(fcntl.ioctl(self.fd, KVM_GET_SREGS, bytes(_SREGS_SIZE)))

    def set_sregs(self, sregs):
        _ioctl(self.fd, KVM_SET_SREGS, bytes(sregs.raw), "KVM_SET_SREGS")

    # -- running ---------------------------------------------------------------
    def run(self):
        """One KVM_RUN; returns the exit reason.  An interrupting signal
        raises InterruptedError (as KVM returns -EINTR); -EFAULT with
        KVM_EXIT_MEMORY_FAULT returns KVM_EXIT_MEMORY_FAULT."""
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as e:
            if e.errno == errno.EFAULT and self.exit_reason() == KVM_EXIT_MEMORY_FAULT:
                return KVM_EXIT_MEMORY_FAULT
            raise
        return _U32.unpack_from(self.run_map, 8)[0]

    def exit_reason(self):
        return _U32.unpack_from(self.run_map, 8)[0]

    def set_immediate_exit(self, on):
        self.run_map[1] = 1 if on else 0

    def io(self):
        """(direction, size, port, count, data_offset) of a KVM_EXIT_IO."""
        return _IO.unpack_from(self.run_map, 32)

    def mmio(self):
        """(phys_addr, data bytes, len, is_write) of a KVM_EXIT_MMIO."""
        pa, data, n, w = _MMIO.unpack_from(self.run_map, 32)
        return pa, data[:n], n, bool(w)

    def set_mmio_data(self, data):
        """A read's answer, before the next KVM_RUN."""
        self.run_map[40:40 + len(data)] = data

    def internal(self):
        """(suberror, [data...]) of a KVM_EXIT_INTERNAL_ERROR."""
        sub, nd = struct.unpack_from("<II", self.run_map, 32)
        nd = min(nd, 16)
        return sub, list(struct.unpack_from(f"<{nd}Q", self.run_map, 40))

    def memory_fault(self):
        """(flags, gpa, size) of a KVM_EXIT_MEMORY_FAULT."""
        return _MEMFAULT.unpack_from(self.run_map, 32)

    def close(self):
        if self.run_map is not None:
            try:
                self.run_map.close()
            except (BufferError, ValueError):
                pass
            self.run_map = None
            try:
                os.close(self.fd)
            except OSError:
                pass


class Kvm(KvmVm):
    """One VM with one 32-bit vCPU, for the yardsticks. Use as a context manager."""

    def __init__(self):
        super().__init__()
        self.vcpu = None
        self.run_map = None

    # -- memory ------------------------------------------------------------
    def add_memory(self, gpa, size, huge=False):
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                       | getattr(mmap, "MAP_NORESERVE", 0))
        try:
            mm.madvise(MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE)
        except (OSError, AttributeError, ValueError):
            pass
        self._maps.append(mm)
        self.add_slot(gpa, size, _addr(mm))
        return mm

    # -- vCPU --------------------------------------------------------------
    def create_vcpu(self, vcpu_id=None):
        v = super().create_vcpu(vcpu_id)
        self._v = v
        self.vcpu, self.run_map = v.fd, v.run_map
        # 32-bit protected mode, flat 4 GiB segments, no paging
        s = v.get_sregs()
        s.set_segment("cs", 0, 0xFFFFFFFF, 8, 11, db=1, g=1)
        for name in ("ds", "es", "fs", "gs", "ss"):
            s.set_segment(name, 0, 0xFFFFFFFF, 16, 3, db=1, g=1)
        s["cr0"] = (s["cr0"] | 1) & ~(1 << 31)                 # PE, no PG
        v.set_sregs(s)
        return v

    def set_regs(self, rip, **kw):
        regs = [0] * 18
        for k, val in kw.items():
            regs[REG_NAMES.index(k)] = val
        regs[16] = rip
        regs[17] = 2
        self._v.set_regs(regs)

    def run(self):
        """One KVM_RUN; returns (exit_reason, io_port or None)."""
        fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        reason = _U32.unpack_from(self.run_map, 8)[0]
        if reason == KVM_EXIT_IO:
            return reason, struct.unpack_from("<H", self.run_map, 34)[0]
        return reason, None


# ---------------------------------------------------------------------------
# the guests (32-bit code, hand-assembled)
def touch_code(start, npages, stride=PAGE):
    loop = (b"\x88\x07"                                  # mov [edi], al
            + b"\x81\xC7" + struct.pack("<I", stride)    # add edi, stride
            + b"\x49"                                    # dec ecx
            + b"\x75\xF5")                               # jnz loop (-11)
    return (b"\xBF" + struct.pack("<I", start)           # mov edi, start
            + b"\xB9" + struct.pack("<I", npages)        # mov ecx, npages
            + loop
            + bytes([0xE6, PORT])                        # out PORT, al
            + b"\xF4")                                   # hlt


def exits_code(n):
    return (b"\xB9" + struct.pack("<I", n)               # mov ecx, n
            + bytes([0xE6, PORT])                        # loop: out PORT, al
            + b"\x49"                                    # dec ecx
            + b"\x75\xFB"                                # jnz loop (-5)
            + b"\xF4")                                   # hlt


def _run_until_port(k):
    reason, port = k.run()
    if reason != KVM_EXIT_IO or port != PORT:
        raise KvmError(f"unexpected KVM exit {EXIT_NAMES.get(reason, reason)} (port {port})")


def bench_faults(npages=16384, huge=False):
    """In-kernel demand faults. Returns a dict, or None without usable KVM.

    fault_us: µs per page of the first touch (each page a fresh demand fault);
    touch_us: µs per page of a second pass over the same (now mapped) pages."""
    try:
        k = Kvm()
    except (OSError, KvmError):
        return None
    try:
        code = k.add_memory(0, CODE_SLOT_SIZE)
        k.add_memory(BIG_GPA, npages * PAGE, huge=huge)
        prog = touch_code(BIG_GPA, npages)
        code[CODE_GPA:CODE_GPA + len(prog)] = prog
        k.create_vcpu()
        # warm up the vCPU (first entry costs extra) with a 1-page touch of the code slot
        warm = touch_code(0x8000, 1)
        code[0x2000:0x2000 + len(warm)] = warm
        k.set_regs(0x2000)
        _run_until_port(k)
        k.set_regs(CODE_GPA)
        t0 = time.perf_counter()
        _run_until_port(k)
        t1 = time.perf_counter()
        k.set_regs(CODE_GPA)
        _run_until_port(k)
        t2 = time.perf_counter()
        return {"npages": npages, "huge": huge,
                "fault_us": (t1 - t0) * 1e6 / npages,
                "touch_us": (t2 - t1) * 1e6 / npages}
    except OSError as e:
        raise KvmError(f"KVM ioctl failed: {e}") from e
    finally:
        k.close()


def bench_exits(nexits=20000):
    """User-space exit round trip (KVM_EXIT_IO and KVM_RUN again), µs per exit."""
    try:
        k = Kvm()
    except (OSError, KvmError):
        return None
    try:
        code = k.add_memory(0, CODE_SLOT_SIZE)
        prog = exits_code(nexits)
        code[CODE_GPA:CODE_GPA + len(prog)] = prog
        k.create_vcpu()
        k.set_regs(CODE_GPA)
        run = k.run
        _run_until_port(k)             # first exit: warm-up
        t0 = time.perf_counter()
        for _ in range(nexits - 1):
            reason, port = run()
            if reason != KVM_EXIT_IO:
                raise KvmError(f"unexpected KVM exit {EXIT_NAMES.get(reason, reason)}")
        t1 = time.perf_counter()
        reason, _ = run()
        if reason != KVM_EXIT_HLT:
            raise KvmError(f"expected hlt, got {EXIT_NAMES.get(reason, reason)}")
        return {"nexits": nexits, "exit_us": (t1 - t0) * 1e6 / (nexits - 1)}
    except OSError as e:
        raise KvmError(f"KVM ioctl failed: {e}") from e
    finally:
        k.close()


if __name__ == "__main__":
    print(bench_faults(), bench_faults(huge=True), bench_exits())
