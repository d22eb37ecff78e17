"""Host memory: one mmap'd buffer that stands for all of host-physical memory.

Untouched pages cost nothing (MAP_NORESERVE, demand-zero). The buffer can be
anonymous, backed by a file (`path`), or a memfd (`shared=True`) that another
process (the PSP in its own process) maps too. A backing file is never one
the user had data in, unless they said so (`overwrite=True`,
`--host-mem-file-overwrite`). The VMM can read and write
every byte of it, NPT pages included: that is the threat model.
"""
import errno
import mmap
import os
import stat
import struct

from hv.errors import BadInput

PAGE = 4096
_Q = struct.Struct("<Q")


class HostMemoryError(BadInput, ValueError):
    """Host memory cannot be set up as asked (size, backing file): bad input.

    A ``ValueError`` too, for callers that used the library before it had
    its own type."""


def parse_size(text):
    """'1G', '256M', '64k', '4096', '0x1000' -> bytes. Raises ValueError."""
    t = str(text).strip().lower()
    mult = 1
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if t.endswith("ib"):
        t = t[:-2]
    elif t.endswith("b") and len(t) > 1 and t[-2] in units:
        t = t[:-1]
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        n = int(t, 0)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 256M, 1G)") from None
    if n <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return n * mult


OVERWRITE_FLAG = "--host-mem-file-overwrite"

# Files this process may (re)use as host memory although they are not empty:
# (st_dev, st_ino, st_size) of each file a HostMemory set up (a later Vmm on
# the same --host-mem-file, as `hv attack` makes one per scenario) or that
# check_file(overwrite=True) was told about.  The size is part of the key so that a
# recycled inode number holding someone else's data does not match.
_reusable = set()


def _file_key(st):
    return (st.st_dev, st.st_ino, st.st_size)


def _refuse_existing(path, nbytes):
    raise HostMemoryError(f"refusing to overwrite {path} (--host-mem-file): it exists and is not "
                          f"empty ({nbytes} bytes); pass {OVERWRITE_FLAG} (Python: "
                          f"overwrite=True) to use it as host memory anyway")


def check_file(path, overwrite=False):
    """Refuse (HostMemoryError) an existing non-empty regular file at ``path``
    unless ``overwrite`` (then it is remembered as allowed: how the CLI's
    --host-mem-file-overwrite reaches the HostMemory that Vmm and the attack
    suite create) or this process already used it as host memory.  Anything else (a new path, an empty
    file, a directory, a device) is left to ``HostMemory`` to accept or
    refuse.  Changes nothing on disk."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode) or not st.st_size:
        return
    if overwrite:
        _reusable.add(_file_key(st))
    elif _file_key(st) not in _reusable:
        _refuse_existing(path, st.st_size)


def _allocate(fd, size):
    """Reserve the file's blocks now (a sparse file runs out of space at a
    page write: SIGBUS).  File systems without fallocate get glibc's
    emulation; where even that is refused (EOPNOTSUPP, EINVAL) the file stays
    sparse."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:           # pragma: no cover - not Linux
        return
    try:
        fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


class HostMemory:
    """``size`` bytes of host memory, zero-filled.

    ``path``: back it with this file (``--host-mem-file``).  A new path or
    an existing empty file is used; an existing non-empty regular file is
    refused unless ``overwrite=True`` (or :func:`check_file` allowed it, or
    this process set it up as host memory before).  A file in use is truncated
    and starts zero-filled, like anonymous memory; it is left in place at
    ``close()``.  Its blocks are allocated up front (``posix_fallocate``): a
    file system without room for it is refused here (HostMemoryError, "No
    space left on device"), not a SIGBUS at the first page the guest touches
    later.  (On tmpfs that makes the whole file resident memory.)  A file
    this object created is removed again when setting up fails (``created``
    says whether it made it); a file that existed before is never removed.
    """

    def __init__(self, size=1 << 30, path=None, shared=False, *, overwrite=False):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PAGE:
            raise HostMemoryError(f"host memory size must be a positive multiple of 4 KiB, "
                                  f"not {size!r}")
        if path is not None:
            path = os.fspath(path)
        self.size = size
        self.path = path
        self.readonly = None        # [lo, hi) mapped read-only over this memory (isolated)
        self.fd = None
        self.created = created = False
        try:
            if path is not None:
                flags = os.O_RDWR | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                try:    # O_EXCL: know for sure whether the file is ours to remove
                    self.fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                    created = True
                except FileExistsError:
                    try:
                        self.fd = os.open(path, flags)
                    except FileNotFoundError:
                        raise HostMemoryError(f"cannot use {path} as host memory "
                                              f"(--host-mem-file): a symbolic link to a missing "
                                              f"file") from None
                st = os.fstat(self.fd)
                if not stat.S_ISREG(st.st_mode):
                    raise HostMemoryError(f"cannot use {path} as host memory (--host-mem-file): "
                                          f"not a regular file")
                if st.st_size and not overwrite and _file_key(st) not in _reusable:
                    _refuse_existing(path, st.st_size)
                # from here on the file is ours: start zero-filled, as
                # anonymous memory does, not with the file's old bytes
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, size)
                _allocate(self.fd, size)
                self.buf = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
                _reusable.add(_file_key(os.fstat(self.fd)))
                self.created = created
            elif shared:
                self.fd = os.memfd_create("hv-host-memory", 0)
                os.ftruncate(self.fd, size)
                self.buf = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
            else:
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
                self.buf = mmap.mmap(-1, size, flags=flags)
        except (OSError, ValueError, OverflowError) as e:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if created:         # leave no file behind that we made for nothing
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if isinstance(e, HostMemoryError):
                raise
            why = getattr(e, "strerror", None) or str(e)
            if path is not None:
                raise HostMemoryError(f"cannot use {path} as host memory (--host-mem-file, "
                                      f"{size >> 20} MiB): {why}") from None
            raise HostMemoryError(f"cannot allocate {size >> 20} MiB of host memory "
                                  f"(--host-mem): {why}") from None

    def _check(self, hpa, n):
        if hpa < 0 or n < 0 or hpa + n > self.size:
            raise ValueError(f"host address range {hpa:#x}+{n:#x} is outside host memory "
                             f"(size {self.size:#x})")

    def read(self, hpa, n):
        self._check(hpa, n)
        return bytes(self.buf[hpa:hpa + n])

    def write(self, hpa, data):
        self._check(hpa, len(data))
        self.buf[hpa:hpa + len(data)] = data

    def read_u64(self, hpa):
        self._check(hpa, 8)
        return _Q.unpack_from(self.buf, hpa)[0]

    def write_u64(self, hpa, value):
        self._check(hpa, 8)
        _Q.pack_into(self.buf, hpa, value & 0xFFFF_FFFF_FFFF_FFFF)

    def zero(self, hpa, n):
        self._check(hpa, n)
        self.buf[hpa:hpa + n] = bytes(n)

    def map_readonly_over(self, fd, hpa, size):
        """Map `fd` (a memfd of the PSP: its sealed table frames, the
        isolated design) read-only over host memory [hpa, hpa + size): the
        walker reads it there, and a store to it faults (SIGSEGV), whatever
        code of this process makes it. OSError if the kernel refuses."""
        from psp_firmware.sealed import buffer_address, map_over
        self._check(hpa, size)
        map_over(buffer_address(self.buf) + hpa, size, fd, writable=False)
        self.readonly = (hpa, hpa + size)

    def close(self):
        try:
            self.buf.close()
        except BufferError:
            pass   # an engine still exports a pointer to it; the mapping goes at exit
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
