"""Guest images (guests/build.py), the loader (hv/loader.py) and the
plain-Unicorn reference runner (guests/flat_runner.py)."""
import os
import struct

import pytest

from hv.errors import BadInput
from hv.machine import loader as L
from hv.machine.loader import load_image

from guests import build as gbuild

MiB = 1 << 20
BOOT_PDS = [L.BOOT_PD + i * L.PAGE for i in range(4)]
RAM = 64 * MiB


@pytest.fixture(scope="session")
def guests():
    try:
        return gbuild.build_all()
    except gbuild.BuildError as e:
        if "not found" in str(e):
            pytest.skip(str(e))
        raise


# --------------------------------------------------------------------------
# helpers: hand-made ELF files and patching


def make_elf(segs, entry, bits=64, machine=None, etype=2, extra=b""):
    """segs: [(paddr, data, memsz, flags)] -> ELF bytes (file data after the
    program headers, in order)."""
    if machine is None:
        machine = 62 if bits == 64 else 3
    ehsize, phentsize = (64, 56) if bits == 64 else (52, 32)
    phoff = ehsize
    data_off = phoff + phentsize * len(segs)
    data_off = (data_off + 15) & ~15
    body = bytearray(extra)
    phdrs = b""
    offs = []
    cur = data_off + len(body)
    for paddr, data, memsz, flags in segs:
        offs.append(cur)
        body += data
        cur += len(data)
    for (paddr, data, memsz, flags), off in zip(segs, offs):
        if bits == 64:
            phdrs += struct.pack("<IIQQQQQQ", 1, flags, off, paddr, paddr, len(data), memsz, 0x1000)
        else:
            phdrs += struct.pack("<IIIIIIII", 1, off, paddr, paddr, len(data), memsz, flags, 0x1000)
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    if bits == 64:
        hdr = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, phoff, 0, 0,
                                  ehsize, phentsize, len(segs), 64, 0, 0)
    else:
        hdr = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, phoff, 0, 0,
                                  ehsize, phentsize, len(segs), 40, 0, 0)
    out = bytearray(hdr + phdrs)
    out += bytes(data_off - len(out))
    out += body
    return bytes(out)


def mb_header(flags=0x3, kludge=None):
    csum = (-(L.MB_MAGIC + flags)) & 0xFFFFFFFF
    h = struct.pack("<III", L.MB_MAGIC, flags, csum)
    if kludge:
        h += struct.pack("<5I", *kludge)
    return h


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def phdrs64(blob):
    e_phoff, = struct.unpack_from("<Q", blob, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", blob, 54)
    return [e_phoff + i * e_phentsize for i in range(e_phnum)]


def load_phdrs64(blob):
    return [o for o in phdrs64(blob) if struct.unpack_from("<I", blob, o)[0] == 1]


def bad(path, ram=RAM):
    with pytest.raises(BadInput) as ei:
        load_image(path, ram)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------
# building


def test_build_is_idempotent(guests):
    assert set(guests) == {"hello", "memtouch", "firsttouch", "compute", "paging", "jump_unmapped",
                           "triple_fault", "mb_hello"}
    mtimes = {n: os.stat(p).st_mtime_ns for n, p in guests.items()}
    again = gbuild.build_all()
    assert again == guests
    assert {n: os.stat(p).st_mtime_ns for n, p in again.items()} == mtimes


def test_build_out_dir_and_missing_compiler(tmp_path, monkeypatch, guests):
    out = gbuild.build_all(tmp_path / "b")
    assert all(p.parent == tmp_path / "b" and p.is_file() for p in out.values())
    monkeypatch.setenv("HV_GUEST_CC", str(tmp_path / "no-such-gcc"))
    with pytest.raises(gbuild.BuildError, match="gcc not found"):
        gbuild.build_all(tmp_path / "c")
    assert gbuild.main(["--out", str(tmp_path / "c")]) == 1


# --------------------------------------------------------------------------
# loading the real guests


@pytest.mark.parametrize("name", ["hello", "memtouch", "compute", "paging",
                                  "jump_unmapped", "triple_fault"])
def test_elf64_guests(guests, name):
    img = load_image(guests[name], RAM)
    assert img.kind == "elf64" and img.mode == 64 and img.name == name
    assert img.entry == L.LOAD_BASE
    assert img.segments[0][0] == L.LOAD_BASE
    assert img.seg_flags[0] & L.PF_X
    for gpa, data, memsz in img.segments:
        assert gpa % L.PAGE == 0 and len(data) <= memsz
    assert img.initial_regs["rdi"] == RAM and img.initial_regs["rsp"] == RAM
    assert img.initial_regs["rip"] == img.entry
    assert img.cpu["cr3"] == L.BOOT_PML4 and img.cr3 == L.BOOT_PML4
    assert img.cpu["cr0"] & L.CR0_PG and img.cpu["efer"] & L.EFER_LMA
    assert img.cpu["cs"] == L.SEL_CODE64
    gpas = [g for g, _ in img.extra_pages]
    assert gpas == [L.BOOT_GDT, L.BOOT_PML4, L.BOOT_PDPT] + BOOT_PDS
    assert all(len(d) == L.PAGE for _, d in img.extra_pages)
    assert max(g for g, _ in img.extra_pages) + L.PAGE <= L.BOOT_AREA_END
    assert img.min_ram == img.image_end + L.STACK_HEADROOM <= RAM
    assert img.multiboot_info is None


def test_compute_has_bss(guests):
    img = load_image(guests["compute"], RAM)
    (g0, d0, m0), (g1, d1, m1) = img.segments
    assert img.seg_flags == [L.PF_R | L.PF_X, L.PF_R | L.PF_W]
    assert g1 == 0x101000 and len(d1) == 0 and m1 >= 1000000
    pages = img.initial_pages()
    # pure-bss pages are demand-faulted, not preloaded
    assert [g for g, _ in pages] == [L.BOOT_GDT, L.BOOT_PML4, L.BOOT_PDPT] + BOOT_PDS + [0x100000]
    assert pages[-1][1][:len(d0)] == d0 and pages[-1][1][len(d0):] == bytes(L.PAGE - len(d0))
    allp = img.initial_pages(include_zero=True)
    assert len(allp) == 8 + (m1 + L.PAGE - 1) // L.PAGE


def test_jump_unmapped_single_segment(guests):
    # it jumps beyond its RAM (an instruction-fetch NPF under hv), so its
    # image is one ordinary segment and small RAM sizes load
    img = load_image(guests["jump_unmapped"], RAM)
    assert [g for g, _, _ in img.segments] == [0x100000]
    load_image(guests["jump_unmapped"], 2 * MiB)


def test_multiboot_guest(guests):
    img = load_image(guests["mb_hello"], RAM)
    assert img.kind == "multiboot" and img.mode == 32
    assert img.multiboot_flags == 0x3
    assert img.initial_regs["eax"] == 0x2BADB002
    assert img.initial_regs["ebx"] == img.multiboot_info == L.MB_INFO
    assert img.initial_regs["eip"] == img.entry
    assert L.BOOT_AREA_END <= img.initial_regs["esp"] <= L.MB_INFO
    assert img.cpu["cr0"] & L.CR0_PE and not img.cpu["cr0"] & L.CR0_PG
    assert img.cpu["cs"] == L.SEL_CODE32
    pages = dict(img.extra_pages)
    assert set(pages) == {L.BOOT_GDT, L.MB_INFO}
    info = pages[L.MB_INFO]
    flags, lower, upper = struct.unpack_from("<III", info, 0)
    assert flags & 1 and lower == 640 and upper == RAM // 1024 - 1024
    assert flags & (1 << 6)
    mlen, maddr = struct.unpack_from("<II", info, 44)
    entries = [struct.unpack_from("<IQQI", info, maddr - L.MB_INFO + o) for o in range(0, mlen, 24)]
    assert (20, 0x100000, RAM - 0x100000, 1) in entries
    name_ptr, = struct.unpack_from("<I", info, 64)
    assert info[name_ptr - L.MB_INFO:].split(b"\0")[0] == b"hv"


def test_gdt():
    gdt = L.boot_gdt()
    code64, = struct.unpack_from("<Q", gdt, L.SEL_CODE64)
    assert code64 & (1 << 53) and not code64 & (1 << 54)     # L=1, D=0
    code32, = struct.unpack_from("<Q", gdt, L.SEL_CODE32)
    assert code32 & (1 << 54) and not code32 & (1 << 53)     # D=1, L=0


def _walk(pages, va):
    """Minimal 4-level walk over {gpa: bytes}; returns pa or None."""
    table = L.BOOT_PML4
    for level in (4, 3, 2, 1):
        idx = (va >> (12 + 9 * (level - 1))) & 511
        e, = struct.unpack_from("<Q", pages[table], 8 * idx)
        if not e & 1:
            return None
        if level == 2 and e & 0x80:
            return (e & 0x000FFFFFFFE00000) | (va & 0x1FFFFF)
        table = e & 0x000FFFFFFFFFF000
    return table | (va & 0xFFF)


@pytest.mark.parametrize("ram", [2 * MiB, 3 * MiB, RAM, (1 << 30) + 4096, 4 << 30])
def test_boot_tables_identity_map(ram):
    # the first 4 GiB are identity mapped whatever the RAM size (accesses
    # beyond RAM reach the NPT as nested page faults, not guest #PFs)
    pages = dict(L.boot_tables(ram))
    assert sorted(pages) == [L.BOOT_PML4, L.BOOT_PDPT] + BOOT_PDS
    assert all(L.BOOT_PML4 <= g < L.BOOT_AREA_END for g in pages)
    for va in (0, 0xB8000, 0x100000, ram - 1, ram, ram + 0x201000, ram // 2 + 12345,
               (3 << 30) + 5, (4 << 30) - 1):
        if va < 4 << 30:
            assert _walk(pages, va) == va
    assert _walk(pages, 4 << 30) is None
    for g in pages:
        for i in range(512):
            e, = struct.unpack_from("<Q", pages[g], 8 * i)
            if e:
                assert e & 3 == 3 and not e & 4 and not e >> 63


# --------------------------------------------------------------------------
# crafted images that load


def test_crafted_elf64_and_bss(tmp_path):
    code = b"\xf4"
    p = write(tmp_path, "k", make_elf([(0x200000, code, 0x3000, 5)], 0x200000))
    img = load_image(p, 4 * MiB)
    assert img.segments == [(0x200000, code, 0x3000)]
    assert img.image_end == 0x203000 and img.min_ram == 0x213000
    flat = {}
    img.load(lambda g, d: flat.__setitem__(g, d))
    assert set(range(0x200000, 0x203000, 0x1000)) <= set(flat)


def test_aout_kludge(tmp_path):
    base = 0x100000
    code = (b"\x66\xba\xf8\x03"        # mov dx, 0x3f8
            b"\xb0K\xee"               # mov al,'K'; out dx, al
            b"\x31\xc0\xe6\xf4")       # xor eax,eax; out 0xf4, al
    hdr = mb_header(0x10003, (base, base, 0, base + 0x3000, base + 32))
    blob = hdr.ljust(32, b"\0") + code
    p = write(tmp_path, "aout.bin", blob)
    img = load_image(p, RAM)
    assert img.kind == "multiboot" and img.mode == 32 and img.entry == base + 32
    assert img.segments == [(base, blob, 0x3000)]
    # header not at file start: load_addr < header_addr
    blob2 = b"\x90" * 64 + hdr[:12] + struct.pack("<5I", base + 64, base, 0, 0, base)
    img2 = load_image(write(tmp_path, "aout2.bin", blob2), RAM)
    assert img2.segments == [(base, blob2, len(blob2))]
    with pytest.raises(BadInput, match="load_addr"):
        load_image(write(tmp_path, "aout3.bin",
                         hdr[:12] + struct.pack("<5I", base, base + 0x10, 0, 0, base)), RAM)
    with pytest.raises(BadInput, match="truncated"):
        load_image(write(tmp_path, "aout4.bin",
                         hdr[:12] + struct.pack("<5I", base, base, base + 0x10000, 0, base)), RAM)


# --------------------------------------------------------------------------
# bad input


def test_bad_ram_size(guests):
    for ram in (0, -4096, 12345, (4 << 30) + 4096, 1.5, "64M"):
        with pytest.raises(BadInput):
            load_image(guests["hello"], ram)


def test_missing_and_not_a_file(tmp_path):
    assert "not found" in bad(tmp_path / "nope")
    assert "not a regular file" in bad(tmp_path)


def test_not_elf(tmp_path):
    assert "not an ELF" in bad(write(tmp_path, "e", b""))
    assert "not an ELF" in bad(write(tmp_path, "t", b"#!/bin/sh\necho hi\n" * 10))
    assert "truncated" in bad(write(tmp_path, "m", b"\x7fEL"))


def test_truncated(guests, tmp_path):
    blob = guests["hello"].read_bytes()
    for n in (6, 40, 64 + 20, 0x1000 + 100):
        msg = bad(write(tmp_path, f"t{n}", blob[:n]))
        assert "truncated" in msg or "malformed" in msg, msg
    assert "truncated" in bad(write(tmp_path, "t2", blob[:0x1000 + 100]))


def test_wrong_machine(guests, tmp_path):
    blob = bytearray(guests["hello"].read_bytes())
    struct.pack_into("<H", blob, 18, 183)             # EM_AARCH64
    assert "not x86-64" in bad(write(tmp_path, "arm64", blob))
    mb = bytearray(guests["mb_hello"].read_bytes())
    struct.pack_into("<H", mb, 18, 40)                # EM_ARM
    assert "not an x86 image" in bad(write(tmp_path, "arm", mb))


def test_elf32_without_multiboot(guests, tmp_path):
    mb = bytearray(guests["mb_hello"].read_bytes())
    i = mb.find(struct.pack("<I", L.MB_MAGIC))
    assert 0 <= i < 8192
    mb[i:i + 4] = b"\0\0\0\0"
    assert "without a multiboot header" in bad(write(tmp_path, "nomb", mb))
    # header beyond the first 8 KiB does not count
    elf = make_elf([(0x100000, b"\x90" * 9000 + mb_header(), 0x4000, 5)], 0x100000, bits=32)
    assert "without a multiboot header" in bad(write(tmp_path, "far", elf))


def test_bad_multiboot_checksum(guests, tmp_path):
    mb = bytearray(guests["mb_hello"].read_bytes())
    i = mb.find(struct.pack("<I", L.MB_MAGIC))
    mb[i + 8] ^= 1
    assert "checksum" in bad(write(tmp_path, "csum", mb))


def test_multiboot_unsupported_flags(tmp_path):
    # bit 2 (video mode) is a request a text-mode loader may decline, as
    # QEMU -kernel does: the image loads, with a warning
    elf = make_elf([(0x100000, mb_header(0x7) + b"\xf4", 0x1000, 5)], 0x10000c, bits=32)
    img = load_image(write(tmp_path, "vid", elf), RAM)
    assert img.multiboot_flags == 0x7
    assert len(img.warnings) == 1 and "video mode (flags bit 2)" in img.warnings[0]
    # bits 3..15 are requirements nobody defined: refused, naming the bits
    for flags, named in ((0xB, "bits 3 "), (0x8003, "bits 15 "), (0x1403, "bits 10, 12 ")):
        elf = make_elf([(0x100000, mb_header(flags) + b"\xf4", 0x1000, 5)], 0x10000c, bits=32)
        assert named in bad(write(tmp_path, f"f{flags:x}", elf))
    # bits 17..31 are optional: ignored
    elf = make_elf([(0x100000, mb_header(0x80000003) + b"\xf4", 0x1000, 5)], 0x10000c, bits=32)
    assert load_image(write(tmp_path, "opt", elf), RAM).warnings == []


def test_overlapping_segments(guests, tmp_path):
    blob = bytearray(guests["compute"].read_bytes())
    o = load_phdrs64(blob)[1]
    struct.pack_into("<Q", blob, o + 24, 0x100100)    # p_paddr into segment 0
    assert "overlap" in bad(write(tmp_path, "ovl", blob))
    elf = make_elf([(0x100000, b"\xf4", 0x2000, 5), (0x101000, b"x", 0x10, 6)], 0x100000)
    assert "overlap" in bad(write(tmp_path, "ovl2", elf))


def test_segment_outside_ram(guests, tmp_path):
    blob = bytearray(guests["hello"].read_bytes())
    o = load_phdrs64(blob)[0]
    struct.pack_into("<Q", blob, o + 24, 0x1_0000_0000)
    struct.pack_into("<Q", blob, 24, 0x1_0000_0000)       # entry follows
    assert "outside guest RAM" in bad(write(tmp_path, "far", blob))
    struct.pack_into("<Q", blob, o + 24, (1 << 64) - 0x1000)
    struct.pack_into("<Q", blob, 24, (1 << 64) - 0x1000)
    struct.pack_into("<Q", blob, o + 40, 0x2000)              # p_memsz wraps
    assert "overflows" in bad(write(tmp_path, "wrap", blob))
    struct.pack_into("<Q", blob, o + 40, 0x1000)
    struct.pack_into("<Q", blob, o + 24, 0x2000)
    struct.pack_into("<Q", blob, 24, 0x2000)
    assert "boot area" in bad(write(tmp_path, "low", blob))


def test_multiboot_reserved_areas(tmp_path):
    for addr, what in ((0x9000, "multiboot info"), (0xB8000, "VGA")):
        elf = make_elf([(addr, mb_header() + b"\xf4", 0x1000, 5)], addr + 12, bits=32)
        assert what in bad(write(tmp_path, f"r{addr:x}", elf))


def test_ram_too_small(guests):
    msg = bad(guests["hello"], 1 * MiB)
    assert "too small" in msg and "at least" in msg
    img = load_image(guests["hello"], 2 * MiB)
    with pytest.raises(BadInput, match="too small"):
        load_image(guests["hello"], img.min_ram - L.PAGE)
    load_image(guests["hello"], img.min_ram)
    with pytest.raises(BadInput, match="too small"):
        load_image(guests["compute"], 2 * MiB)


def test_no_loadable_segments(guests, tmp_path):
    blob = bytearray(guests["hello"].read_bytes())
    for o in load_phdrs64(blob):
        struct.pack_into("<I", blob, o, 4)             # PT_NOTE
    assert "no loadable segments" in bad(write(tmp_path, "noload", blob))
    assert "no loadable segments" in bad(write(tmp_path, "empty", make_elf([], 0x100000)))


def test_other_malformed(tmp_path):
    ok = [(0x100000, b"\xf4", 0x1000, 5)]
    assert "ET_DYN" in bad(write(tmp_path, "dyn", make_elf(ok, 0x100000, etype=3)))
    assert "entry point" in bad(write(tmp_path, "ent", make_elf(ok, 0x300000)))
    fs = make_elf([(0x100000, b"\xf4" * 16, 8, 5)], 0x100000)
    assert "p_filesz" in bad(write(tmp_path, "fs", fs))
    be = bytearray(make_elf(ok, 0x100000))
    be[5] = 2
    assert "little-endian" in bad(write(tmp_path, "be", be))
    cls = bytearray(make_elf(ok, 0x100000))
    cls[4] = 9
    assert "EI_CLASS" in bad(write(tmp_path, "cls", cls))


# --------------------------------------------------------------------------
# sanity run in plain Unicorn (the speed baseline's harness)

try:
    from guests.flat_runner import run_flat_unicorn
except ImportError:                                    # pragma: no cover
    run_flat_unicorn = None
pytestmark_unicorn = pytest.mark.skipif(run_flat_unicorn is None, reason="unicorn not installed")

EXPECT = {
    "hello": (0, b"Hello from the guest!\n"),
    "memtouch": (0, b"memtouch: touched 16111 pages\nmemtouch: OK\n"),
    "compute": (0, b"compute: primes below 1000000: 78498, sum 37550402023"),
    "paging": (0, b"paging: OK\n"),
    "mb_hello": (0, b"mem_lower=640KB mem_upper=64512KB\n"),
}


@pytestmark_unicorn
def test_flat_unicorn_jump_unmapped(guests):
    # flat Unicorn maps only RAM: the jump beyond it is a fetch fault there
    r = run_flat_unicorn(load_image(guests["jump_unmapped"], RAM), RAM, 1_000_000)
    assert r.reason == "fault", r
    assert b"jump_unmapped: jumping to 0x4001000 (beyond RAM)\n" in r.serial


@pytestmark_unicorn
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_flat_unicorn_runs(guests, name):
    code, serial, n = r = run_flat_unicorn(load_image(guests[name], RAM), RAM, 50_000_000,
                                           count_insns=(name != "compute"))
    want_code, want_out = EXPECT[name]
    assert r.reason == "exit" and code == want_code, r
    assert want_out in serial
    if name == "mb_hello":
        assert r.vga.splitlines()[0] == "mem_lower=640KB mem_upper=64512KB"
    if name != "compute":
        assert 0 < n < 1_000_000


@pytestmark_unicorn
@pytest.mark.parametrize("name", ["hello", "memtouch", "firsttouch"])
def test_flat_unicorn_per_access_fill_c_matches_python(guests, name):
    """The speed baseline's identity fill in C (csrc/vcpu.c identity_fill)
    runs each identity-mapped guest as the Python hook does, and as the flat
    RWX mapping does: the same exit and serial output (memtouch reads back
    every page it wrote and says MISMATCH if one differs)."""
    from guests.flat_runner import fill_hooks
    if "c" not in fill_hooks():
        pytest.skip("hv's C vCPU module is not built")
    img = load_image(guests[name], 8 * MiB)
    runs = [run_flat_unicorn(img, 8 * MiB, 0, count_insns=False, **kw)
            for kw in (dict(tlb="per_access", fill="c", block_count=True),
                       dict(tlb="per_access", fill="python", block_count=True))]
    flat = run_flat_unicorn(img, 8 * MiB, 0)
    for r in runs:
        assert (r.reason, r.exit_code, r.serial) == ("exit", 0, flat.serial), r
    with pytest.raises(ValueError, match="unknown fill"):
        run_flat_unicorn(img, 8 * MiB, 0, tlb="per_access", fill="asm")


@pytestmark_unicorn
def test_flat_unicorn_triple_fault(guests):
    r = run_flat_unicorn(guests["triple_fault"], RAM, 1_000_000)
    assert r.reason == "fault" and r.exit_code is None
    assert b"empty IDT" in r.serial


@pytestmark_unicorn
def test_flat_unicorn_count_is_exact(guests):
    img = load_image(guests["hello"], RAM)
    code, serial, n = run_flat_unicorn(img, RAM, 1_000_000)
    assert code == 0
    r = run_flat_unicorn(img, RAM, n - 1)
    assert r.reason == "budget" and r.insn_count == n - 1 and r.exit_code is None
    r = run_flat_unicorn(img, RAM, n, count_insns=False)
    assert r.reason == "exit" and r.insn_count is None
    # across chunk boundaries too
    img = load_image(guests["memtouch"], 8 * MiB)
    a = run_flat_unicorn(img, 8 * MiB, 0)
    b = run_flat_unicorn(img, 8 * MiB, 0, chunk=1000)
    assert a.reason == b.reason == "exit" and a.insn_count == b.insn_count > 1000
    assert run_flat_unicorn(img, 8 * MiB, a.insn_count - 1, chunk=777).reason == "budget"


@pytestmark_unicorn
def test_flat_unicorn_hlt(tmp_path):
    code = b"\xb0H\x66\xba\xf8\x03\xee\xf4"       # mov al,'H'; mov dx,0x3f8; out dx,al; hlt
    p = write(tmp_path, "hlt", make_elf([(0x100000, code, 0x1000, 5)], 0x100000))
    r = run_flat_unicorn(p, 4 * MiB, 1000)
    assert (r.exit_code, r.serial, r.insn_count, r.reason) == (0, b"H", 4, "hlt")
    # a budget that runs out right after an instruction ending in byte 0xF4
    code = b"\xb0\xf4" * 10 + b"\xf4"                # mov al, 0xf4 (x10); hlt
    p = write(tmp_path, "f4", make_elf([(0x100000, code, 0x1000, 5)], 0x100000))
    r = run_flat_unicorn(p, 4 * MiB, 0, chunk=3)
    assert (r.reason, r.insn_count) == ("hlt", 11)
    r = run_flat_unicorn(p, 4 * MiB, 6, chunk=3)
    assert (r.reason, r.insn_count) == ("budget", 6)
