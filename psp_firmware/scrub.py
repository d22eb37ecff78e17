"""What the PSP asks the host kernel about its memory: the buffer's mapping
(private, shared memfd, file), how a frame is zeroed (scrub mode), and which
pages are still holes (SEEK_DATA, /proc/self/pagemap)."""
import errno
import logging
import mmap
import os


from .integrity import PAGE

log = logging.getLogger("psp")


_SCRUB_MADVISE_MIN = 16 * PAGE       # as csrc/psp_core.c: smaller ranges are written
_SCRUB_ADVICE = {"auto": None, "write": 0, "dontneed": mmap.MADV_DONTNEED,
                 "remove": mmap.MADV_REMOVE}


HOLE_NONE, HOLE_SEEK, HOLE_PAGEMAP = 0, 1, 2        # struct psp_ctx.hole_kind
_HOLE_NAMES = {HOLE_NONE: "none", HOLE_SEEK: "seek_data", HOLE_PAGEMAP: "pagemap"}
_PM_DATA = (1 << 63) | (1 << 62)          # pagemap: present | swapped


def _buffer_address(membuf):
    import ctypes
    export = ctypes.c_char.from_buffer(membuf)
    try:
        return ctypes.addressof(export)
    finally:
        del export


def _mapping_of(membuf):
    """The /proc/self/maps fields of the mapping that holds `membuf` (an
    mmap object), or None: not an mmap, or /proc/self/maps cannot tell."""
    if not isinstance(membuf, mmap.mmap) or len(membuf) == 0:
        return None
    try:
        addr = _buffer_address(membuf)
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi:
                    return parts if len(parts) >= 5 and len(parts[1]) >= 4 else None
    except (OSError, ValueError, TypeError, IndexError):
        pass
    return None


def scrub_mode_for(membuf, mapping=False):
    """How frames of `membuf` can be zeroed: "dontneed" for a private
    anonymous mmap (MADV_DONTNEED makes it demand-zero), "remove" for a
    shared mapping (MADV_REMOVE punches the pages out of the memfd or file),
    "write" for anything else: a private file mapping (DONTNEED would bring
    the file's bytes back), a buffer that is not an mmap object (its pages
    may hold other objects), or when /proc/self/maps cannot tell.
    mapping: _mapping_of(membuf), if the caller has it."""
    parts = _mapping_of(membuf) if mapping is False else mapping
    if parts is None:
        return "write"
    if parts[1][3] == "s":
        return "remove"
    return "dontneed" if int(parts[4]) == 0 else "write"


def hole_probe_for(membuf, mem_fd=None, mapping=False):
    """(hole_kind, fd) for psp_scrub_probe: how the PSP can tell, without
    touching a page of `membuf`, that it still reads as zero.

    HOLE_SEEK with a dup of mem_fd when mem_fd is a memfd that `membuf`
    maps shared from offset 0 (the same inode, per /proc/self/maps: a VMM
    that passes one file and maps another gets no probe); HOLE_PAGEMAP with
    /proc/self/pagemap for a private anonymous mapping; else (HOLE_NONE, -1):
    every page is compared (files: their holes are the filesystem's to
    report, and a private file mapping's are the file's bytes).
    mapping: _mapping_of(membuf), if the caller has it."""
    parts = _mapping_of(membuf) if mapping is False else mapping
    if parts is None:
        return HOLE_NONE, -1
    shared, offset, inode = parts[1][3] == "s", int(parts[2], 16), int(parts[4])
    try:
        if mem_fd is not None:
            st = os.fstat(mem_fd)
            target = os.readlink(f"/proc/self/fd/{mem_fd}")
            if shared and offset == 0 and st.st_ino == inode and target.startswith("/memfd:"):
                fd = os.dup(mem_fd)
                try:
                    os.lseek(fd, 0, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:       # ENXIO: all holes, the probe works
                        os.close(fd)
                        return HOLE_NONE, -1
                return HOLE_SEEK, fd
            return HOLE_NONE, -1
        if not shared and inode == 0 and offset == 0:
            return HOLE_PAGEMAP, os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    return HOLE_NONE, -1
