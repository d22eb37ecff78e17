"""Guests on KVM (hv/machine/kvm_vcpu.py): the same guests give the same answers as on
the emulator, every first touch of a page an NPF through the PSP.

Skipped, with the reason, where /dev/kvm is missing or refuses."""
import ctypes
import errno
import shutil
import struct
import subprocess
import threading
import time

import pytest

from nptcore import available_backends
from nptcore.bits import ACC_R, ACC_W, ACC_X, ADDR_MASK
from psp_firmware import Status

from hv.machine import kvm
from hv.machine.boot import Boot
from hv.vmm.vmm import Vmm

MiB = 1 << 20
WHY = kvm.probe()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"KVM is not available: {WHY}")
gbuild = pytest.importorskip("guests.build")

# guest RAM per bundled guest (16 MiB unless said): small, as kvm_pvm emulates CPL0 code
MEM = {"memtouch": 4 * MiB, "firsttouch": 4 * MiB, "mb_hello": 32 * MiB}




def boot(path, accel, mem=16 * MiB, fault_around=1, huge=False, prepare=None, engine=None,
         psp="inprocess", **kw):
    """Boot once; the result with the NPF log and the KVM memslot's pages."""
    vmm = Vmm(host_mem=128 * MiB, shared_mem=True, backend=engine, psp=psp)
    try:
        b = Boot(vmm, str(path), mem=mem, accel=accel, vga=True, **kw)
        b.vm.fault_around, b.vm.huge = fault_around, huge
        if prepare is not None:
            prepare(b)
        res = b.run(max_ms=120_000) if accel == "kvm" else b.run(100_000_000)
        res.npf_log = list(b.vcpu.npf_log)
        res.vm = b.vm
        b.close()
        return res
    finally:
        vmm.close()


def same(u, k):
    """Serial, VGA, exit code/reason, NPF count and the NPF'd pages agree."""
    assert k.accel == "kvm" and k.instructions is None and k.exits > 0
    assert (k.exit_reason, k.exit_code, k.serial, k.vga) == \
           (u.exit_reason, u.exit_code, u.serial, u.vga), (u.reason, k.reason)
    assert k.npf == u.npf
    assert sorted((g >> 12, a) for g, a, _, _ in k.npf_log) == \
           sorted((g >> 12, a) for g, a, _, _ in u.npf_log)


@pytest.mark.parametrize("name", sorted(gbuild.GUESTS))
def test_bundled_guest_same_on_kvm(guests, name):
    mem = MEM.get(name, 16 * MiB)
    u = boot(guests[name], "unicorn", mem)
    k = boot(guests[name], "kvm", mem)
    same(u, k)
    assert u.exit_reason != "error" or name == "jump_unmapped"


@pytest.mark.parametrize("engine", [pytest.param(b, marks=[] if b in available_backends() else
                                                 [pytest.mark.skip(reason=f"{b} engine not built")])
                                    for b in ("c", "python")])
@pytest.mark.parametrize("name", ["memtouch", "paging"])
def test_engines_and_psp_process_on_kvm(guests, engine, name):
    """The VMM's walks of the PSP's table on KVM: C and Python engines alike,
    and with the PSP in its own process."""
    u = boot(guests[name], "unicorn", 8 * MiB, engine=engine)
    same(u, boot(guests[name], "kvm", 8 * MiB, engine=engine))
    if engine == "c":
        same(u, boot(guests[name], "kvm", 8 * MiB, engine=engine, psp="process"))


@pytest.mark.parametrize("fa,huge", [(16, False), (1, True)], ids=["fa16", "2m"])
def test_fault_around_and_huge_same_on_kvm(guests, fa, huge):
    u = boot(guests["memtouch"], "unicorn", 8 * MiB, fa, huge)
    k = boot(guests["memtouch"], "kvm", 8 * MiB, fa, huge)
    same(u, k)
    assert k.serial.endswith("memtouch: OK\n")
    one = boot(guests["memtouch"], "kvm", 8 * MiB)
    assert k.npf * 5 < one.npf    # 16 pages (or 512 outside the image's first 2 MiB) per NPF


def test_launch_pages_may_arrive_by_exits(guests):
    """The image's pages left out of the memslot: the entry's instruction
    fetch (an emulation failure, RIP translated through the guest's own
    tables), code and data come in by exits; the table maps them, so none of
    it is an NPF.  (The boot GDT and page tables stay: KVM reads those
    itself, without an exit.)"""
    def empty(b):
        ram = b.vcpu.ram
        image = [p for p in sorted(ram.pages) if p >= 0x100]
        assert 0x100 in image
        for page in image:
            ram._unmap(page, 1)
        assert min(ram.pages) < 8 and max(ram.pages) < 0x100
    u = boot(guests["hello"], "unicorn")
    k = boot(guests["hello"], "kvm", prepare=empty)
    same(u, k)


def _elf64(segs, entry):
    ehsize, phentsize = 64, 56
    off = ehsize + phentsize * len(segs)
    phdrs, body = b"", b""
    for paddr, data, memsz in segs:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off + len(body), paddr, paddr, len(data), memsz,
                             0x1000)
        body += data
    hdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, ehsize, 0, 0, ehsize, phentsize, len(segs), 64, 0, 0)
    return hdr + phdrs + body


def test_fetch_npf_from_a_fresh_page(tmp_path):
    """The guest jumps into a page nothing has touched: an instruction-fetch
    NPF; the zeros there (add [rax], al with al = 0) slide it into the next
    segment, which exits with 5."""
    first = (b"\x48\xc7\xc0\x00\x08\x10\x00"       # mov rax, 0x100800
             + b"\x31\xc9"                         # xor ecx, ecx (al = 0 below)
             + b"\x88\xc8"                         # mov al, cl
             + b"\xe9" + struct.pack("<i", 0x101000 - (0x100000 + 16)))  # jmp 0x101000
    last = b"\xb0\x05\xe6\xf4"                     # mov al, 5; out 0xf4, al
    p = tmp_path / "fetch"
    p.write_bytes(_elf64([(0x100000, first, len(first)), (0x102000, last, len(last))], 0x100000))
    u = boot(p, "unicorn", 4 * MiB)
    k = boot(p, "kvm", 4 * MiB)
    same(u, k)
    assert k.exit_code == 5 and (0x101000, ACC_X) in [(g, a) for g, a, _, _ in k.npf_log]


ELF_GUEST = r"""
static void out(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static unsigned long table[4096];
static char buf[4096 * 3];
void _start(void) {
    const char *msg = "outside elf64 guest: ok\n";
    unsigned long sum = 0;
    for (int i = 0; i < 4096; i++) table[i] = (unsigned long)i * i;
    for (int i = 0; i < 4096; i += 7) sum += table[i];
    for (int i = 0; i < 4096 * 3; i++) buf[i] = (char)i;
    __builtin_memcpy(buf + 4096, buf, 256);
    int ok = sum == 3278349165UL && buf[4096 + 255] == (char)255;
    if (!ok) msg = "outside elf64 guest: WRONG\n";
    for (const char *c = msg; *c; c++) out(0x3f8, (unsigned char)*c);
    volatile unsigned short *vga = (unsigned short *)0xb8000;
    for (int i = 0; msg[i] != '\n'; i++) vga[80 + i] = 0x0700 | (unsigned char)msg[i];
    out(0xf4, ok ? 0 : 1);
    for (;;) __asm__ volatile("hlt");
}
"""

MB_GUEST_C = r"""
static void out(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static unsigned int table[8192];
void kmain(unsigned int magic, unsigned int *info) {
    volatile unsigned short *vga = (unsigned short *)0xb8000;
    const char *m = "outside multiboot kernel";
    unsigned int sum = 0;
    for (int i = 0; i < 8192; i++) table[i] = i * 3u;
    for (int i = 0; i < 8192; i += 1024) sum += table[i];
    for (int i = 0; m[i]; i++) { vga[160 + i] = 0x1f00 | (unsigned char)m[i]; out(0x3f8, m[i]); }
    out(0x3f8, '\n');
    out(0xf4, magic == 0x2BADB002 && (info[0] & 1) && sum == 86016 ? 0 : 9);
}
"""

MB_GUEST_S = r"""
    .text
    .align 4
    .long 0x1BADB002
    .long 0x00000002
    .long -(0x1BADB002 + 0x00000002)
    .globl _start
_start:
    mov $stack_top, %esp
    push %ebx
    push %eax
    call kmain
1:  hlt
    jmp 1b
    .bss
    .align 16
    .space 8192
stack_top:
"""


def _gcc(tmp_path, args, out):
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed")
    r = subprocess.run(["gcc", *args, "-o", str(out)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot build the outside image here: {r.stderr.strip()[:200]}")
    return out


def test_outside_elf64_same_on_kvm(tmp_path):
    """An ELF64 built by gcc here, outside guests/ (linked at 2 MiB)."""
    (tmp_path / "g.c").write_text(ELF_GUEST)
    img = _gcc(tmp_path, ["-O2", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-static",
                          "-mno-red-zone", "-fno-stack-protector", "-mgeneral-regs-only",
                          "-Wl,-Ttext=0x200000", "-Wl,-z,max-page-size=4096",
                          str(tmp_path / "g.c")], tmp_path / "g")
    u = boot(img, "unicorn")
    k = boot(img, "kvm")
    same(u, k)
    assert k.serial == "outside elf64 guest: ok\n" and k.vga[1] == "outside elf64 guest: ok"


def test_sse_guest_on_kvm(tmp_path):
    """Plain gcc output with SSE: the same answers where KVM runs the guest
    natively; where KVM emulates supervisor code (kvm_pvm) and its emulator
    has no such instruction, a clean guest error naming it."""
    from test_boot import SSE_GUEST
    (tmp_path / "s.c").write_text(SSE_GUEST)
    img = _gcc(tmp_path, ["-O2", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-static",
                          "-mno-red-zone", "-fno-stack-protector", "-Wl,-Ttext=0x100000",
                          "-Wl,-z,max-page-size=4096", str(tmp_path / "s.c")], tmp_path / "s")
    u = boot(img, "unicorn")
    k = boot(img, "kvm")
    if k.exit_reason == "error":
        assert "KVM could not emulate the instruction" in k.reason and "xmm" in k.reason
        assert k.exit_code == 1 and k.last_insns
    else:
        same(u, k)


def test_outside_multiboot_same_on_kvm(tmp_path):
    """A Multiboot kernel built here (its own header, linked at 2 MiB)."""
    (tmp_path / "k.c").write_text(MB_GUEST_C)
    (tmp_path / "s.S").write_text(MB_GUEST_S)
    img = _gcc(tmp_path, ["-m32", "-O2", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib",
                          "-static", "-fno-stack-protector", "-mgeneral-regs-only",
                          "-Wl,-Ttext=0x200000", "-Wl,-z,max-page-size=4096",
                          "-Wl,--build-id=none", str(tmp_path / "s.S"), str(tmp_path / "k.c")],
               tmp_path / "k")
    u = boot(img, "unicorn", 8 * MiB)
    k = boot(img, "kvm", 8 * MiB)
    same(u, k)
    assert k.kind == "multiboot" and k.exit_code == 0, k.serial
    assert k.vga[2] == "outside multiboot kernel"


# --------------------------------------------------------------------------
# the memslot follows the table

def _host_bytes(ram, gpa, n):
    return ctypes.string_at(ram.base + gpa, n)


def test_memslot_follows_remap_unmap_and_permissions(guests):
    """Map a page, rewrite its NPT entry (a SEVered remap), resync: the
    memslot shows the other frame; clear W: mapped read-only; clear P: gone."""
    vmm = Vmm(host_mem=128 * MiB, shared_mem=True)
    try:
        b = Boot(vmm, str(guests["hello"]), mem=16 * MiB, accel="kvm")
        ram, vm = b.vcpu.ram, b.vm
        gpa = 0x400000
        b.vcpu._fault(gpa, ACC_W)
        assert vm.npf == 1 and ram.mapped(gpa)[1] is True
        hpa = ram.mapped(gpa)[0]
        other = vmm.alloc.alloc(1)
        vmm.mem.write(hpa, b"victim page")
        vmm.mem.write(other, b"OTHER SECRET")
        assert _host_bytes(ram, gpa, 11) == b"victim page"
        leaf = _leaf(vmm, vm, gpa)
        e = vmm.mem.read_u64(leaf)
        vmm.mem.write_u64(leaf, (e & ~ADDR_MASK) | other)
        assert _host_bytes(ram, gpa, 11) == b"victim page"     # until the VMM remaps
        b.vcpu.flush_tlb()
        assert ram.mapped(gpa) == (other, True) and _host_bytes(ram, gpa, 12) == b"OTHER SECRET"
        vmm.mem.write_u64(leaf, ((e & ~ADDR_MASK) | other) & ~2)          # W cleared
        b.vcpu.flush_tlb()
        assert ram.mapped(gpa) == (other, False)
        vmm.mem.write_u64(leaf, 0)                                         # P cleared
        b.vcpu.flush_tlb()
        assert ram.mapped(gpa) is None
        assert vmm.psp.check_all().status == Status.INTEGRITY_FAILURE
        b.close()
    finally:
        vmm.close()


def _leaf(vmm, vm, gpa):
    t = vmm.npt_root(vm)
    for lvl in (4, 3, 2):
        t = vmm.mem.read_u64(t + 8 * ((gpa >> (12 + 9 * (lvl - 1))) & 511)) & ADDR_MASK
    return t + 8 * ((gpa >> 12) & 511)


REMAP_GUEST = (b"\x66\xba\xf8\x03"                 # mov dx, 0x3f8
               + b"\x8a\x04\x25\x00\x00\x40\x00"   # mov al, [0x400000]   (first touch: NPF)
               + b"\xee"                           # out dx, al           (the VMM acts here)
               + b"\x8a\x04\x25\x00\x00\x40\x00"   # mov al, [0x400000]   (same GPA again)
               + b"\xee"                           # out dx, al
               + b"\xb0\x00\xe6\xf4")              # mov al, 0; out 0xf4, al


@pytest.mark.parametrize("accel", ["unicorn", "kvm"])
def test_severed_remap_the_guest_really_reads_the_other_page(tmp_path, accel):
    """The malicious VMM rewrites the entry of a page the guest has read and
    remaps it: the guest's next read of the same GPA returns the other
    guest's byte, and the PSP's check finds the changed entry."""
    p = tmp_path / "remap"
    p.write_bytes(_elf64([(0x100000, REMAP_GUEST, len(REMAP_GUEST))], 0x100000))
    vmm = Vmm(host_mem=128 * MiB, shared_mem=True)
    try:
        other_vm = vmm.create_vm()
        other = vmm.touch(other_vm, 0x100000, ACC_W) & ~0xFFF
        vmm.mem.write(other, b"S")
        state = {}

        def sink(byte):
            if "done" in state:
                return
            state["done"] = True
            leaf = _leaf(vmm, b.vm, 0x400000)
            vmm.mem.write_u64(leaf, (vmm.mem.read_u64(leaf) & ~ADDR_MASK) | other)
            for cb in b.vm.on_npt_change:       # the VMM can always flush / remap
                cb()
        b = Boot(vmm, str(p), mem=8 * MiB, accel=accel, serial_sink=sink, check_ms=60_000)
        res = b.run()
        assert res.serial == "\x00S"
        assert res.exit_reason == "psp_stopped" and res.exit_code == 3     # the last check
        b.close()
    finally:
        vmm.close()


# --------------------------------------------------------------------------
# exits of other kernels, time slices, vCPUs

def test_memory_fault_exit_style(guests, monkeypatch):
    """Kernels with hardware EPT/NPT report an unmapped memslot page as
    -EFAULT + KVM_EXIT_MEMORY_FAULT: map the GPA, KVM_RUN again."""
    from hv.machine import kvm_vcpu
    vmm = Vmm(host_mem=128 * MiB, shared_mem=True)
    try:
        b = Boot(vmm, str(guests["hello"]), mem=16 * MiB, accel="kvm")
        rm = b.vcpu.cpu.run_map
        real = kvm_vcpu.fcntl.ioctl
        calls = []

        def ioctl(fd, req, arg=0, *a):
            if req == kvm.KVM_RUN and not calls:
                calls.append(1)
                struct.pack_into("<I", rm, 8, kvm.KVM_EXIT_MEMORY_FAULT)
                struct.pack_into("<QQQ", rm, 32, 0, 0x600000, 4096)
                raise OSError(errno.EFAULT, "Bad address")
            return real(fd, req, arg, *a)
        monkeypatch.setattr(kvm_vcpu.fcntl, "ioctl", ioctl)
        res = b.run()
        assert calls and res.exit_reason == "exit_port" and res.serial == "Hello from the guest!\n"
        assert (0x600000, ACC_R) in [(g, a) for g, a, _, _ in b.vcpu.npf_log]
        assert b.vcpu.ram.mapped(0x600000) is not None
        b.close()
    finally:
        vmm.close()


def test_time_limit_and_check_ms_on_a_spinning_guest(tmp_path):
    """A guest that never exits: the kicker ends each slice on time, the
    periodic check runs (--check-ms), and max_ms ends the run."""
    p = tmp_path / "spin"
    code = b"\xeb\xfe"                               # jmp $
    p.write_bytes(_elf64([(0x100000, code, len(code))], 0x100000))
    vmm = Vmm(host_mem=128 * MiB, shared_mem=True)
    try:
        b = Boot(vmm, str(p), mem=4 * MiB, accel="kvm", check_ms=20)
        t = time.perf_counter()
        res = b.run(max_ms=300)
        took = time.perf_counter() - t
        assert res.exit_reason == "time_limit" and res.exit_code == 1
        assert res.checks >= 2 and b.vcpu.kicks >= 2
        assert took < 30       # (not a timing assertion: it ends at all)
        b.close()
    finally:
        vmm.close()


def test_two_vcpus_fault_the_same_pages(guests):
    """Two vCPUs (one thread each) run memtouch over the same RAM: each page
    is one NPF however many vCPUs touch it first, and both finish."""
    from hv.machine.devices import Devices
    from hv.machine.kvm_vcpu import KvmVcpu
    from hv.machine.loader import load_image
    mem = 4 * MiB
    single = boot(guests["memtouch"], "kvm", mem)
    vmm = Vmm(host_mem=128 * MiB, shared_mem=True)
    try:
        b = Boot(vmm, str(guests["memtouch"]), mem=mem, accel="kvm")
        first = b.vcpu
        dev2 = Devices()
        second = KvmVcpu(vmm, b.vm, load_image(str(guests["memtouch"]), mem), devices=dev2,
                         kvm_vm=first.kvm_vm, ram=first.ram, vcpu_id=1,
                         regs={"rsp": mem - 0x8000})
        out = {}
        th = threading.Thread(target=lambda: out.__setitem__(2, second.run()))
        th.start()
        out[1] = first.run()
        th.join(120)
        assert out[1].kind == out[2].kind == "exit_port"
        assert out[1].exit_code == out[2].exit_code == 0
        assert b.devices.serial.text().endswith("memtouch: OK\n")
        assert dev2.serial.text().endswith("memtouch: OK\n")
        # every page one NPF, whichever vCPU touched it first: memtouch's
        # pages, plus the second vCPU's own stack page
        pages = [g >> 12 for g, _, _, _ in first.npf_log + second.npf_log]
        assert len(pages) == len(set(pages)) == b.vm.npf
        assert set(pages) == {g >> 12 for g, _, _, _ in single.npf_log} | {(mem - 0x8008) >> 12}
        second.close()
        b.close()
    finally:
        vmm.close()


def test_anonymous_host_memory_is_refused(guests):
    from hv.errors import BadInput
    vmm = Vmm(host_mem=128 * MiB)
    try:
        with pytest.raises(BadInput, match="memfd or file"):
            Boot(vmm, str(guests["hello"]), mem=16 * MiB, accel="kvm")
    finally:
        vmm.close()


def test_record_on_kvm(guests, tmp_path):
    """--record on KVM: one row per NPF (a write has no rip: KVM has retired it)."""
    from hv.trace import load_trace
    out = tmp_path / "f.csv"
    k = boot(guests["memtouch"], "kvm", 4 * MiB, record=str(out))
    t = load_trace(str(out))
    rows = list(t)
    assert len(rows) == k.npf
    assert {(r.gpa >> 12) for r in rows} == {g >> 12 for g, _, _, _ in k.npf_log}


def test_host_mapping_failure_is_a_guest_error(guests, monkeypatch):
    """A frame that cannot be mapped into the memslot (e.g. vm.max_map_count
    reached) ends the run as a guest error naming it, not a traceback."""
    from hv.machine import kvm_memory
    real = kvm_memory._mmap
    calls = []

    def failing(addr, n, prot, flags, fd, off):
        if fd >= 0 and calls:
            ctypes.set_errno(errno.ENOMEM)
            return kvm_memory._MAP_FAILED
        if fd >= 0:
            calls.append(1)
        return real(addr, n, prot, flags, fd, off)

    def prepare(b):
        monkeypatch.setattr(kvm_memory, "_mmap", failing)
    k = boot(guests["memtouch"], "kvm", 4 * MiB, prepare=prepare)
    assert k.exit_reason == "error" and k.exit_code == 1
    assert "vm.max_map_count" in k.reason and "Cannot allocate memory" in k.reason
