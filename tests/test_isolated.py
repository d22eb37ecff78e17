"""The isolated design (docs/designs.md): the NPT and control pages live in a
sealed memfd of the PSP process, mapped read-only in the VMM. Every way the
VMM's code has to write there is tried, each in a child process (a store
kills the process with SIGSEGV; the test must survive it), and must fail;
the PSP's own writes still land, and guests run."""
import ctypes
import mmap
import os
import resource
import signal
import subprocess
import sys

import pytest

from hv.errors import BadInput
from hv.vmm.vmm import Vmm
from nptcore.bits import A, ACC_R, ACC_W, ADDR_MASK, D, P
from psp_firmware.sealed import F_SEAL_FUTURE_WRITE, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK

PAGE = 4096


@pytest.fixture
def iso():
    v = Vmm(host_mem=128 << 20, protect="isolated")
    vm = v.create_vm()
    for i in range(8):
        v.touch(vm, 0x100000 + i * PAGE, ACC_W)
    yield v, vm
    v.close()


def _in_child(fn):
    """Run fn() in a forked child; ('signal', n) or ('exit', code)."""
    pid = os.fork()
    if pid == 0:            # the child: no core file, no faulthandler noise
        try:
            import faulthandler
            faulthandler.disable()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            fn()
            os._exit(0)
        except BaseException:
            os._exit(7)
    _, st = os.waitpid(pid, 0)
    if os.WIFSIGNALED(st):
        return ("signal", os.WTERMSIG(st))
    return ("exit", os.WEXITSTATUS(st))


def test_table_and_control_page_are_in_the_psp_range(iso):
    v, vm = iso
    lo, hi = v.iso_base, v.iso_base + v.iso_size
    assert v.psp_kind == "process" and v.mem.readonly == (lo, hi)
    assert lo <= vm.vmsa < hi
    pages = v.engine.table_pages(v.npt_root(vm))
    assert len(pages) == 4 and all(lo <= h < hi for h, _l in pages)
    assert not lo <= v.walk(vm, 0x100000).hpa < hi          # guest data is VMM memory
    assert v.alloc.limit <= lo                              # the allocator never hands it out


def test_entries_are_written_with_accessed_and_dirty(iso):
    v, vm = iso
    for gpa, _hpa, _size, e in v.engine.mappings(v.npt_root(vm)):
        assert e & (P | A | D) == P | A | D, hex(e)


@pytest.mark.parametrize("what", ["leaf", "root_entry", "ncr3"])
def test_a_vmm_store_to_the_range_faults(iso, what):
    v, vm = iso
    root = v.npt_root(vm)
    addr = {"leaf": None, "root_entry": root, "ncr3": vm.vmsa}[what]
    if addr is None:
        from hv.attacks.lab import entry_addr
        addr = entry_addr(v, vm, 0x100000)
    before = v.mem.read(addr & ~0xFFF, PAGE)
    assert _in_child(lambda: v.mem.write_u64(addr, 0x41414141)) == ("signal", signal.SIGSEGV)
    assert v.mem.read(addr & ~0xFFF, PAGE) == before
    assert v.walk(vm, 0x100000, ACC_R).ok                   # the guest's table is intact
    v.touch(vm, 0x200000, ACC_W)                            # and the PSP still writes it


def test_a_store_outside_the_range_lands(iso):
    """The probe is fair: the same child store to a VMM frame goes through
    (host memory is a shared memfd, so the parent sees it)."""
    v, _vm = iso
    f = v.alloc.alloc(1)
    assert _in_child(lambda: v.mem.write_u64(f, 0x41414141)) == ("exit", 0)
    assert v.mem.read_u64(f) == 0x41414141


def test_other_ways_to_write_are_refused(iso):
    v, vm = iso
    root = v.npt_root(vm)
    from psp_firmware.sealed import buffer_address
    addr = buffer_address(v.mem.buf) + root
    libc = ctypes.CDLL(None, use_errno=True)
    # mprotect the read-only view writable: the mapping may never be written
    assert libc.mprotect(ctypes.c_void_p(addr & ~0xFFF), PAGE, 3) != 0
    assert ctypes.get_errno() == 13                          # EACCES
    # write through /proc/self/mem (what a debugger does)
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"\x41" * 8, addr)
    finally:
        os.close(fd)
    assert v.mem.read_u64(root) == v.mem.read_u64(root)    # (readable)
    # reopen the memfd behind the mapping (root can, through map_files):
    # sealed against write(2), writable mmap, truncate
    lo = buffer_address(v.mem.buf) + v.iso_base
    path = f"/proc/self/map_files/{lo:x}-{lo + v.iso_size:x}"
    try:
        mfd = os.open(path, os.O_RDWR)
    except OSError:
        pytest.skip(f"{path} cannot be opened here")
    try:
        import fcntl
        seals = fcntl.fcntl(mfd, 1034)                      # F_GET_SEALS
        assert seals & (F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == \
            F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
        for attempt in (lambda: os.pwrite(mfd, b"\x41", root - v.iso_base),
                        lambda: mmap.mmap(mfd, PAGE, flags=mmap.MAP_SHARED),
                        lambda: os.ftruncate(mfd, 0),
                        lambda: fcntl.fcntl(mfd, 1033, 0)):   # F_ADD_SEALS: sealed for good
            with pytest.raises(OSError):
                attempt()
    finally:
        os.close(mfd)


def test_guests_run(iso):
    v, _vm = iso
    from guests.build import build_all
    from hv.machine.boot import Boot
    b = Boot(v, str(build_all()["memtouch"]), mem=4 << 20)
    try:
        r = b.run()
    finally:
        b.close()
    assert r.exit_reason == "exit_port" and r.exit_code == 0 and "memtouch: OK" in r.serial
    assert r.npf >= 700                     # ~3 MiB of pages written, each mapped by the PSP
    assert r.protect == "isolated"


def test_in_process_psp_is_refused():
    with pytest.raises(BadInput, match="needs the PSP in its own process"):
        Vmm(host_mem=64 << 20, protect="isolated", psp="inprocess")


def test_cli_refuses_isolated_in_process():
    p = subprocess.run([sys.executable, "-m", "hv", "boot", "hello", "--protect", "isolated",
                        "--psp", "inprocess"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "needs the PSP in its own process" in p.stderr
    assert "Traceback" not in p.stderr


def test_decommission_returns_the_frames_to_the_psp(iso):
    v, vm = iso
    before = v.psp.platform_status().fields
    assert v.psp.decommission(vm.handle).ok
    after = v.psp.platform_status().fields
    assert after["frames_table"] == 0 and after["frames_vmsa"] == 0
    assert after["pool_free"] == before["pool_free"] + before["frames_table"] + 1
    assert v.mem.read(v.iso_base, v.iso_size) == bytes(v.iso_size)   # scrubbed
    vm2 = v.create_vm()                                  # and a new guest gets them
    v.touch(vm2, 0x5000, ACC_W)
    assert v.iso_base <= v.npt_root(vm2) < v.iso_base + v.iso_size
    assert v.mem.read_u64(v.npt_root(vm2)) & ADDR_MASK
