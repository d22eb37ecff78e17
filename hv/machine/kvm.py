"""A minimal /dev/kvm client: the yardstick `hv bench` puts beside our NPF cost.

Only `fcntl.ioctl` and `mmap`: create a VM, one small memslot for the code
and one large memslot for the pages to touch, one vCPU in 32-bit protected
mode (flat segments loaded straight into the descriptor caches through
KVM_SET_SREGS, no GDT in memory, no paging), and two hand-assembled guests:

- touch: write one byte to each of N consecutive pages of the large memslot,
  then `out` to a port. The host backs the memslot with fresh anonymous
  memory (transparent huge pages disabled by default), so every page is an
  in-kernel demand fault: NPT/EPT violation, get_user_pages, zeroing, map,
  resume. Time per page = the wall time of that KVM_RUN / N.
- exits: a loop of M `out` instructions, each one a KVM_EXIT_IO to user space
  and back (KVM_RUN from Python): time per exit.

`available()` says whether /dev/kvm can be used; the benchmark functions
return None when it cannot.
"""
import ctypes
import fcntl
import mmap
import os
import struct
import time

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {KVM_EXIT_IO: "io", KVM_EXIT_HLT: "hlt", KVM_EXIT_SHUTDOWN: "shutdown",
              KVM_EXIT_FAIL_ENTRY: "fail_entry", KVM_EXIT_INTERNAL_ERROR: "internal_error"}

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


class KvmError(Exception):
    pass


def _signed(x):
    """fcntl.ioctl's integer argument is a C int."""
    return x - (1 << 32) if x >= 1 << 31 else x


def available():
    """True when /dev/kvm exists and a VM can be created."""
    try:
        with Kvm():
            return True
    except (OSError, KvmError):
        return False


def _addr(mm):
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


class Kvm:
    """One VM with one vCPU. Use as a context manager."""

    def __init__(self):
        self._fds = []
        self._maps = []
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self._fds.append(self.kvm)
        if fcntl.ioctl(self.kvm, KVM_GET_API_VERSION, 0) != 12:
            raise KvmError("unexpected KVM API version")
        self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self._fds.append(self.vm)
        try:
            fcntl.ioctl(self.vm, KVM_SET_TSS_ADDR, _signed(0xFFFBD000))
        except OSError:
            pass
        self._slot = 0
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
        region = _REGION.pack(self._slot, 0, gpa, size, _addr(mm))
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region)
        self._slot += 1
        return mm

    # -- vCPU --------------------------------------------------------------
    def create_vcpu(self):
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        self._fds.append(self.vcpu)
        size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run_map = mmap.mmap(self.vcpu, size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._maps.append(self.run_map)
        # 32-bit protected mode, flat 4 GiB segments, no paging
        sregs = bytearray(fcntl.ioctl(self.vcpu, KVM_GET_SREGS, bytes(_SREGS_SIZE)))
        code = _SEG.pack(0, 0xFFFFFFFF, 8, 11, 1, 0, 1, 1, 0, 1, 0, 0)
        data = _SEG.pack(0, 0xFFFFFFFF, 16, 3, 1, 0, 1, 1, 0, 1, 0, 0)
        sregs[0:24] = code                         # cs
        for i in (1, 2, 3, 4, 5):                  # ds es fs gs ss
            sregs[24 * i:24 * (i + 1)] = data
        cr0_off = 8 * 24 + 2 * 16
        cr0 = struct.unpack_from("<Q", sregs, cr0_off)[0]
        struct.pack_into("<Q", sregs, cr0_off, (cr0 | 1) & ~(1 << 31))   # PE, no PG
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, bytes(sregs))

    def set_regs(self, rip, **kw):
        regs = [0] * 18
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"]
        for k, v in kw.items():
            regs[names.index(k)] = v
        regs[16] = rip
        regs[17] = 2
        fcntl.ioctl(self.vcpu, KVM_SET_REGS, _REGS.pack(*regs))

    def run(self):
        """One KVM_RUN; returns (exit_reason, io_port or None)."""
        fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("<I", self.run_map, 8)[0]
        if reason == KVM_EXIT_IO:
            return reason, struct.unpack_from("<H", self.run_map, 34)[0]
        return reason, None

    def close(self):
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
