"""The scrub's hole probe (csrc/psp_core.c psp_scrub_probe, its Python twin
Psp._data_ranges, psp_firmware.scrub.hole_probe_for).

A frame the host kernel never allocated already reads as zero; the probe
lets the PSP skip it instead of faulting it in to compare it. What must
hold: every scrubbed page reads as zero afterwards whatever state it was in
(a hole, data, zeros, a page an earlier scrub gave back), pages outside the
range are untouched, a hole stays a hole (the point of the probe), and the
probe is only used where the kernel's answer is about the very pages the
PSP maps.
"""
import errno
import mmap
import os

import pytest

from psp_firmware import Psp
from psp_firmware import core as psp_core
from psp_firmware.scrub import HOLE_NONE, HOLE_PAGEMAP, HOLE_SEEK, hole_probe_for

PAGE = 4096
SIZE = 64 * PAGE
CORES = ["python", "c"] if psp_core.available() else ["python"]
needs_c = pytest.mark.skipif(not psp_core.available(), reason="C core not built")


def _pagemap_readable():
    try:
        with open("/proc/self/pagemap", "rb") as f:
            return len(f.read(8)) == 8
    except OSError:
        return False


PAGEMAP = _pagemap_readable()      # where it is not, the probe is off (HOLE_NONE)
BACKINGS = ["memfd"] + (["anon"] if PAGEMAP else [])


def _memfd(size=SIZE):
    fd = os.memfd_create("hv-test-holes", 0)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED)


def _anon(size=SIZE):
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _is_hole_memfd(fd, page):
    try:
        return os.lseek(fd, page * PAGE, os.SEEK_DATA) > page * PAGE
    except OSError as e:
        assert e.errno == errno.ENXIO
        return True


def _pagemap_entry(mem, page):
    import ctypes
    import struct
    export = ctypes.c_char.from_buffer(mem)
    addr = ctypes.addressof(export)
    del export
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((addr // PAGE + page) * 8)
        return struct.unpack("<Q", f.read(8))[0]


def _is_hole_anon(mem, page):
    return not _pagemap_entry(mem, page) & (3 << 62)


def test_probe_kind_follows_the_mapping(tmp_path):
    fd, mem = _memfd()
    other, omem = _memfd()
    try:
        kind, pfd = hole_probe_for(mem, fd)
        assert kind == HOLE_SEEK and pfd not in (fd, -1)    # its own dup
        os.close(pfd)
        # a memfd that is not the one mapped: no probe (its holes say nothing)
        assert hole_probe_for(mem, other) == (HOLE_NONE, -1)
        assert hole_probe_for(mem, None) == (HOLE_NONE, -1)     # shared, no fd
        kind, pfd = hole_probe_for(_anon(), None)
        assert kind == (HOLE_PAGEMAP if PAGEMAP else HOLE_NONE)
        if pfd >= 0:
            os.close(pfd)
        assert hole_probe_for(mmap.mmap(-1, SIZE), None) == (HOLE_NONE, -1)   # shared anon
        assert hole_probe_for(bytearray(SIZE), None) == (HOLE_NONE, -1)
        p = tmp_path / "host"
        p.write_bytes(bytes(SIZE))
        with open(p, "r+b") as f:                        # a file: not a memfd
            fmem = mmap.mmap(f.fileno(), SIZE, flags=mmap.MAP_SHARED)
            assert hole_probe_for(fmem, f.fileno()) == (HOLE_NONE, -1)
            fmem.close()
    finally:
        os.close(fd)
        os.close(other)


@pytest.mark.parametrize("core", CORES)
def test_probe_can_be_turned_off(core, monkeypatch):
    fd, mem = _memfd()
    try:
        assert Psp(mem, core=core, mem_fd=fd).holes == "seek_data"
        assert Psp(mem, core=core, mem_fd=fd, holes=False).holes == "none"
        monkeypatch.setenv("HV_PSP_HOLES", "0")
        assert Psp(mem, core=core, mem_fd=fd).holes == "none"
        assert Psp(_anon(), core=core, holes=True).holes == ("pagemap" if PAGEMAP else "none")
    finally:
        os.close(fd)


def _fill(mem, fd, states):
    """Put page i into states[i]: hole, data (0xA5s), zero (allocated zeros)
    or given_back (data, then handed back to the kernel)."""
    for i, s in enumerate(states):
        if s in ("data", "given_back"):
            mem[i * PAGE:(i + 1) * PAGE] = b"\xA5" * PAGE
        elif s == "zero":
            mem[i * PAGE] = 1
            mem[i * PAGE] = 0
        if s == "given_back":
            mem.madvise(mmap.MADV_REMOVE if fd is not None else mmap.MADV_DONTNEED,
                        i * PAGE, PAGE)


STATES = ["hole", "data", "zero", "given_back"]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.parametrize("holes", [True, False])
def test_every_page_reads_zero_and_holes_stay_holes(core, backing, holes):
    fd, mem = _memfd() if backing == "memfd" else (None, _anon())
    try:
        psp = Psp(mem, core=core, scrub="write", mem_fd=fd, holes=holes)
        assert psp.holes == ({"memfd": "seek_data", "anon": "pagemap"}[backing] if holes
                             else "none")
        # pages 1..15 (below the madvise size): every state, in a mixed order
        states = ["data"] + [STATES[(i * 7) % 4] for i in range(15)] + ["data"] * 48
        _fill(mem, fd, states)
        psp._scrub(1 * PAGE, 15 * PAGE)
        for i in range(1, 16):           # before anything reads the pages
            if states[i] in ("hole", "given_back"):
                hole = _is_hole_memfd(fd, i) if fd is not None else _is_hole_anon(mem, i)
                if holes:
                    assert hole, f"page {i} ({states[i]}) was faulted in"
                elif backing == "memfd":
                    assert not hole      # compared: the read fault allocated it
        assert bytes(mem[PAGE:16 * PAGE]) == bytes(15 * PAGE)
        assert bytes(mem[:PAGE]) == b"\xA5" * PAGE            # outside: untouched
        assert bytes(mem[16 * PAGE:17 * PAGE]) == b"\xA5" * PAGE
    finally:
        if fd is not None:
            os.close(fd)


@needs_c
@pytest.mark.parametrize("kind", [HOLE_SEEK, HOLE_PAGEMAP])
def test_a_probe_that_fails_still_scrubs(kind):
    """A bad fd (or any probe error): every page is compared and written."""
    lib, ffi = psp_core.lib, psp_core.ffi
    mem = _anon()
    mem[:] = b"\x5A" * SIZE
    r, w = os.pipe()                 # an fd that cannot seek nor be read at an offset
    try:
        lib.psp_scrub_probe(ffi.from_buffer(mem), PAGE, 8 * PAGE, 0, kind, r)
    finally:
        os.close(r)
        os.close(w)
    assert bytes(mem[PAGE:9 * PAGE]) == bytes(8 * PAGE)
    assert mem[0] == 0x5A and mem[9 * PAGE] == 0x5A


@pytest.mark.parametrize("psp_kind", ["process"] + (["inprocess"] if PAGEMAP else []))
def test_update_npt_leaves_a_fresh_frame_unallocated(psp_kind):
    """End to end: UPDATE_NPT of a frame the host never touched does not make
    the host allocate it (the PSP process gets the memfd to probe); the
    guest's first touch does, and then sees zeros."""
    from hv.vmm.vmm import Vmm
    from psp_firmware.commands import ATTR_RWX
    vmm = Vmm(host_mem=64 << 20, psp=psp_kind)
    try:
        vm = vmm.create_vm()
        hpa = vmm.alloc.alloc(4)
        fd, buf = vmm.mem.fd, vmm.mem.buf

        def hole(i):
            page = hpa // PAGE + i
            return _is_hole_memfd(fd, page) if fd is not None else _is_hole_anon(buf, page)
        assert [hole(i) for i in range(4)] == [True] * 4
        buf[hpa + 2 * PAGE] = 0x77                     # old data in one frame
        r = vmm.psp.update_npt(vm.handle, 0x10_0000, hpa, level=1, attrs=ATTR_RWX, npages=4)
        assert r.ok, r.name
        assert [hole(i) for i in range(4)] == [True, True, False, True]
        assert bytes(buf[hpa:hpa + 4 * PAGE]) == bytes(4 * PAGE)
    finally:
        vmm.close()


@needs_c
@pytest.mark.parametrize("backing", BACKINGS)
def test_ring_scrub_reads_the_kernel_once_per_window_and_misses_nothing(backing):
    """psp_ring_fast's cached probe (struct frame_probe): 300 UPDATE_NPTs in one
    ring over frames in every state, across a PROBE_WINDOW (256 frames) edge
    and through runs of holes that end in data. Every frame reads zero after,
    the holes are still holes, and the statuses, frames and host bytes match
    the Python twin with no probe."""
    import hashlib
    from test_psp_fast import MB, _boot, _ring, _update_buf
    psp, mem = _boot("c", True, backing="memfd" if backing == "memfd" else "private")
    twin, tmem = _boot("python", False)
    fd = psp._hole_fd
    base = 8 * MB
    # runs: 5 holes, data, zero, 3 holes, given back, data ... (pattern of 11)
    pattern = ["hole"] * 5 + ["data", "zero"] + ["hole"] * 3 + ["given_back"]
    states = [pattern[i % len(pattern)] for i in range(300)]
    for i, s in enumerate(states):
        a = base + i * PAGE
        if s in ("data", "given_back"):
            mem[a:a + PAGE] = b"\xA5" * PAGE
            tmem[a:a + PAGE] = b"\xA5" * PAGE
        elif s == "zero":
            mem[a] = 1
            mem[a] = 0
        if s == "given_back":
            mem.madvise(mmap.MADV_REMOVE if backing == "memfd" else mmap.MADV_DONTNEED, a, PAGE)
            tmem[a:a + PAGE] = bytes(PAGE)
    for p in (psp, twin):            # the leaf table exists: the ring stays in C
        st, _ = p.mailbox(0x20, _update_buf(1, 1, 0x4000_0000, 7 * MB, 3, 1))
        assert st == 0
    ring = [("u", 1, 1, 0x4000_0000 + (1 + i) * PAGE, base + i * PAGE, 3, 1) for i in range(300)]
    slow = []
    orig = psp._run_ring_py
    psp._run_ring_py = lambda ring_, s, n, *a, **k: (slow.append(n - s), orig(ring_, s, n, *a, **k))[1]
    got = _ring(psp, ring)
    assert got == _ring(twin, ring)
    assert {s for s, _ in got} == {0}
    assert slow == []                        # all 300 answered by psp_ring_fast
    for i, s in enumerate(states):           # before anything reads them
        if s in ("hole", "given_back"):
            page = base // PAGE + i
            hole = _is_hole_memfd(fd, page) if backing == "memfd" else _is_hole_anon(mem, page)
            assert hole, (i, s)
    assert bytes(mem[base:base + 300 * PAGE]) == bytes(300 * PAGE)
    assert hashlib.sha256(mem).digest() == hashlib.sha256(tmem).digest()
    assert psp._frames.snapshot() == twin._frames.snapshot()

