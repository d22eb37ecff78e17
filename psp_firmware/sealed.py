"""PSP-owned memory the VMM may read but not write, enforced by the kernel.

Two protection designs hand the VMM process a view of PSP state that its
code must not be able to change by any means it has:

- `isolated`: the NPT pages and control pages of every guest live in their
  own memfd, mapped over a range of host-physical addresses;
- `rmp`: the reverse map table the CPU's walker reads.

The PSP creates the memfd (`sealed_memfd`), maps it read-write itself, and
only then seals it (`seal`): F_SEAL_FUTURE_WRITE (no new writable mapping,
no write(2), no hole punch, by anyone: the PSP's own mapping made before the
seal stays writable), F_SEAL_SHRINK / F_SEAL_GROW (no truncate), F_SEAL_SEAL
(the seals cannot be lifted). The VMM gets the fd (over a unix socket from
the PSP process) and can map it read-only only: a store through that
mapping faults (SIGSEGV), mprotect(PROT_WRITE) is refused (the mapping has
no VM_MAYWRITE), and so are pwrite, ftruncate, fallocate and writes through
/proc/self/mem.

With the PSP in the VMM's process (`--psp inprocess`) the PSP's writable
mapping is in the VMM's address space too: nothing is enforced then (see
docs/designs.md).
"""
import ctypes
import ctypes.util
import fcntl
import mmap
import os

F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL

PAGE = 4096
_PROT_READ, _PROT_WRITE = 1, 2
_MAP_SHARED, _MAP_FIXED = 0x01, 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)


def sealed_memfd(name, size):
    """A new memfd of `size` bytes that can take seals (not sealed yet)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def seal(fd):
    """Seal `fd` against every later write (see the module docstring)."""
    fcntl.fcntl(fd, F_ADD_SEALS, SEALS)


def seals_of(fd):
    return fcntl.fcntl(fd, F_GET_SEALS)


def buffer_address(buf):
    """Address of the first byte of a writable buffer (an mmap)."""
    export = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(export)
    finally:
        del export


def map_over(addr, size, fd, writable):
    """mmap(MAP_SHARED | MAP_FIXED) `fd` at `addr` (page aligned), replacing
    whatever was mapped there: the range of an existing mapping (host
    memory) then reads and writes the memfd. OSError on failure."""
    if addr % PAGE or size % PAGE or size <= 0:
        raise ValueError(f"map_over: {addr:#x}+{size:#x} is not page aligned")
    prot = _PROT_READ | (_PROT_WRITE if writable else 0)
    r = _libc.mmap(ctypes.c_void_p(addr), size, prot, _MAP_SHARED | _MAP_FIXED, fd, 0)
    if r is None or r == ctypes.c_void_p(-1).value or r != addr:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap over {addr:#x}+{size:#x}: {os.strerror(e)}")


def map_readonly(fd, size):
    """A read-only Python mmap of `fd` (what the VMM gets of a sealed memfd)."""
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
