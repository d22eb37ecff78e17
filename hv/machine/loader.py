"""Guest image loaders: toy ELF64 images and Multiboot v1 kernels.

``load_image(path, ram_size) -> Image`` parses and validates an image and
returns everything the VMM and the vCPU need to start it; it never touches
host memory.  Any problem with the file (or a RAM size that cannot hold it)
raises :class:`hv.errors.BadInput` with a one-line message.

Guest-physical layout (see guests/README.md):

    0x0000-0x0fff   unused (null page, not provided)
    0x1000          boot GDT (both kinds)              \\
    0x2000          PML4 of the boot identity map       |  BOOT_AREA_END
    0x3000          PDPT                                |  = 0x8000: no
    0x4000-0x7fff   4 PDs (2 MiB pages, 4 GiB)          /   segment here
    0x9000          multiboot info (multiboot only)
    0x9100          multiboot memory map
    0x9200          boot loader name "hv"
    0xa0000-0xfffff VGA text buffer (0xb8000) / ROM hole (multiboot: no
                    segment may live here)
    0x100000        where the guests are linked (1 MiB)

ELF64 toy ABI: entered in 64-bit long mode at ``e_entry``, paging on with
CR3 = 0x2000 (identity map of the first 4 GiB with 2 MiB pages),
rdi = RAM size, rsp = RAM size.  Multiboot: 32-bit protected mode, paging
off, flat segments, eax = 0x2BADB002, ebx = 0x9000.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field

from hv.errors import BadInput

__all__ = [
    "Image", "load_image", "boot_tables", "boot_gdt", "multiboot_info",
    "PAGE", "LOAD_BASE", "BOOT_GDT", "BOOT_PML4", "BOOT_PDPT", "BOOT_PD",
    "BOOT_AREA_END", "MB_INFO", "MB_MAGIC", "MB_BOOT_MAGIC", "STACK_HEADROOM",
    "MAX_RAM", "SEL_CODE64", "SEL_DATA", "SEL_CODE32",
]

PAGE = 0x1000
LOAD_BASE = 0x100000          # where the guests are linked
BOOT_GDT = 0x1000
BOOT_PML4 = 0x2000
BOOT_PDPT = 0x3000
BOOT_PD = 0x4000              # PDs at 0x4000, 0x5000, 0x6000, 0x7000
BOOT_AREA_END = 0x8000        # [0, 0x8000) belongs to the boot structures
MB_INFO = 0x9000              # multiboot info page
MB_MMAP = MB_INFO + 0x100
MB_NAME = MB_INFO + 0x200
MB_STACK = MB_INFO - 0x10     # esp handed to multiboot kernels (they set their own)
LOW_HOLE = (0xA0000, 0x100000)  # VGA + ROM hole (multiboot kernels)
MB_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002
MB_SEARCH = 8192
STACK_HEADROOM = 64 * 1024    # RAM needed above the image for the stack
MAX_RAM = 4 << 30             # 4 boot PDs; multiboot mem_upper is 32-bit
MAX_IMAGE_FILE = 256 << 20

SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18
GDT_ENTRIES = (
    0,
    0x00AF9B000000FFFF,       # 0x08: 64-bit code, DPL0, accessed
    0x00CF93000000FFFF,       # 0x10: flat 4 GiB data, DPL0, accessed
    0x00CF9B000000FFFF,       # 0x18: flat 4 GiB 32-bit code, DPL0, accessed
)

# x86 control-register bits used in Image.cpu
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_PG = 1, 2, 0x10, 0x20, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA, EFER_NXE = 0x100, 0x400, 0x800

PF_X, PF_W, PF_R = 1, 2, 4
PT_LOAD = 1
EM_386, EM_X86_64 = 3, 62

# Page-table entry bits for the boot identity map (A/D preset so that a
# hardware-like walker need not write them back).
_P, _W, _A, _D, _PS = 1, 2, 0x20, 0x40, 0x80


@dataclass
class Image:
    """A loaded (validated, not yet placed) guest image.

    ``segments``: list of ``(gpa, data, memsz)``; bytes ``[len(data), memsz)``
    are zero (bss).  ``seg_flags``: the ELF ``p_flags`` of each segment
    (PF_R=4, PF_W=2, PF_X=1).  ``extra_pages``: ``(gpa, bytes)`` to place
    besides the segments (boot GDT, boot page tables, multiboot info), page
    aligned, 4096 bytes each.  ``initial_regs``: general registers at entry
    (``rdi``/``rsp`` or ``eax``/``ebx``/``esp``, plus ``rip``/``eip`` and
    ``rflags``).  ``cpu``: system state at entry (cr0, cr3, cr4, efer,
    gdt_base, gdt_limit, cs, ds, es, ss, fs, gs).
    """

    name: str
    path: str
    kind: str                      # "elf64" | "multiboot"
    mode: int                      # 64 | 32
    entry: int
    ram_size: int
    segments: list = field(default_factory=list)
    seg_flags: list = field(default_factory=list)
    extra_pages: list = field(default_factory=list)
    initial_regs: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    image_end: int = 0             # end of the highest segment, page rounded
    min_ram: int = 0               # smallest RAM size that holds the image
    multiboot_flags: int | None = None
    multiboot_info: int | None = None   # gpa of the info block
    warnings: list = field(default_factory=list)   # optional requests not met (one line each)

    @property
    def cr3(self) -> int:
        return self.cpu.get("cr3", 0)

    def image_ranges(self):
        """[(gpa, memsz)] of the segments."""
        return [(gpa, memsz) for gpa, _, memsz in self.segments]

    def initial_pages(self, include_zero: bool = False) -> list:
        """Merged page contents to place before the first instruction.

        Returns ``[(page_gpa, bytes(4096))]`` sorted by gpa: every page that
        holds segment file data, plus the extra pages.  Pages that are pure
        bss are left out unless ``include_zero`` (demand-faulted RAM is zero
        anyway), so they become ordinary NPFs on first touch.
        """
        pages: dict[int, bytearray] = {}
        for gpa, data, memsz in self.segments:
            if include_zero:
                first, last = gpa & ~(PAGE - 1), (gpa + memsz + PAGE - 1) & ~(PAGE - 1)
            else:
                first, last = gpa & ~(PAGE - 1), (gpa + len(data) + PAGE - 1) & ~(PAGE - 1)
            for p in range(first, last, PAGE):
                pages.setdefault(p, bytearray(PAGE))
            off = 0
            while off < len(data):
                a = gpa + off
                p = a & ~(PAGE - 1)
                n = min(PAGE - (a - p), len(data) - off)
                pages[p][a - p:a - p + n] = data[off:off + n]
                off += n
        for gpa, data in self.extra_pages:
            pages[gpa] = bytearray(data)
        return [(p, bytes(pages[p])) for p in sorted(pages)]

    def load(self, write, include_zero: bool = True) -> None:
        """Place the image with ``write(gpa, bytes)`` (e.g. into flat RAM)."""
        for gpa, data in self.initial_pages(include_zero=include_zero):
            write(gpa, data)


def _bad(msg):
    return BadInput(msg)


def _check_ram(ram_size):
    if isinstance(ram_size, bool) or not isinstance(ram_size, int):
        raise _bad(f"RAM size must be an integer, not {type(ram_size).__name__}")
    if ram_size <= 0 or ram_size % PAGE:
        raise _bad(f"RAM size {ram_size:#x} must be a positive multiple of 4 KiB")
    if ram_size > MAX_RAM:
        raise _bad(f"RAM size {ram_size:#x} is above the supported maximum of 4 GiB")


def _fmt_size(n):
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


# --------------------------------------------------------------------------
# boot structures


def boot_gdt() -> bytes:
    """The 4 KiB page at BOOT_GDT holding the boot GDT."""
    return b"".join(struct.pack("<Q", e) for e in GDT_ENTRIES).ljust(PAGE, b"\0")


def boot_tables(ram_size: int) -> list:
    """Identity map of the first 4 GiB with 2 MiB pages.

    Returns ``[(gpa, bytes(4096))]``: PML4 at 0x2000, PDPT at 0x3000, four
    PDs at 0x4000-0x7fff.  The map covers all of [0, 4 GiB) whatever the RAM
    size, as firmware identity maps do: a guest access beyond its RAM then
    passes the guest's own walk and reaches the NPT as a nested page fault
    (which the VMM refuses), instead of being a guest #PF.  Entries are P|W
    (+A, +D|PS on leaves), no U, no NX.  ``ram_size`` is validated only.
    """
    _check_ram(ram_size)
    n_pd = MAX_RAM >> 30
    pml4 = bytearray(PAGE)
    struct.pack_into("<Q", pml4, 0, BOOT_PDPT | _P | _W | _A)
    pdpt = bytearray(PAGE)
    pds = []
    for i in range(n_pd):
        struct.pack_into("<Q", pdpt, 8 * i, (BOOT_PD + i * PAGE) | _P | _W | _A)
        pd = bytearray(PAGE)
        for j in range(512):
            pa = ((512 * i + j) << 21)
            struct.pack_into("<Q", pd, 8 * j, pa | _P | _W | _A | _D | _PS)
        pds.append(bytes(pd))
    out = [(BOOT_PML4, bytes(pml4)), (BOOT_PDPT, bytes(pdpt))]
    out += [(BOOT_PD + i * PAGE, pd) for i, pd in enumerate(pds)]
    return out


def multiboot_info(ram_size: int) -> bytes:
    """The 4 KiB page at MB_INFO: info block, memory map, loader name."""
    page = bytearray(PAGE)
    mem_lower = 640
    mem_upper = max(0, ram_size // 1024 - 1024)
    flags = (1 << 0) | (1 << 6) | (1 << 9)        # mem_*, mmap_*, boot_loader_name
    mmap = b""
    for base, length, typ in ((0, 0x9FC00, 1), (0x9FC00, 0x400, 2),
                              (0xF0000, 0x10000, 2),
                              (0x100000, max(0, ram_size - 0x100000), 1)):
        mmap += struct.pack("<IQQI", 20, base, length, typ)
    struct.pack_into("<III", page, 0, flags, mem_lower, mem_upper)
    struct.pack_into("<II", page, 44, len(mmap), MB_MMAP)
    struct.pack_into("<I", page, 64, MB_NAME)
    page[MB_MMAP - MB_INFO:MB_MMAP - MB_INFO + len(mmap)] = mmap
    name = b"hv\0"
    page[MB_NAME - MB_INFO:MB_NAME - MB_INFO + len(name)] = name
    return bytes(page)


# --------------------------------------------------------------------------
# parsing


def _find_multiboot(blob: bytes):
    """(offset, magic, flags, checksum) of the first valid header, or None.

    Raises BadInput when a magic is present but no header checksums."""
    first_bad = None
    lim = min(len(blob), MB_SEARCH)
    for off in range(0, lim - 11, 4):
        if blob[off:off + 4] != b"\x02\xb0\xad\x1b":
            continue
        magic, flags, csum = struct.unpack_from("<III", blob, off)
        if (magic + flags + csum) & 0xFFFFFFFF == 0:
            return off, flags
        if first_bad is None:
            first_bad = (off, flags, csum)
    if first_bad is not None:
        off, flags, csum = first_bad
        raise _bad(f"bad multiboot header checksum at offset {off:#x} "
                   f"(magic+flags+checksum = {(MB_MAGIC + flags + csum) & 0xFFFFFFFF:#x}, want 0)")
    return None


def _elf_segments(blob, elf_bits):
    """Parse the ELF header and PT_LOAD headers with pyelftools.

    Returns (machine, e_type, entry, [(paddr, data, memsz, flags)])."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    if blob[5] != 1:
        raise _bad("not a little-endian ELF image (EI_DATA != ELFDATA2LSB)")
    ehsize = 52 if elf_bits == 32 else 64
    if len(blob) < ehsize:
        raise _bad(f"truncated ELF: {len(blob)} bytes, the ELF header alone needs {ehsize}")
    try:
        elf = ELFFile(io.BytesIO(blob))
        hdr = elf.header
        machine = hdr["e_machine"]
        e_type = hdr["e_type"]
        entry = hdr["e_entry"]
        phoff, phnum, phentsize = hdr["e_phoff"], hdr["e_phnum"], hdr["e_phentsize"]
    except (ELFError, struct.error, ValueError) as e:
        raise _bad(f"malformed ELF header: {e}") from None
    want_ent = 32 if elf_bits == 32 else 56
    if phnum and phentsize < want_ent:
        raise _bad(f"malformed ELF: e_phentsize {phentsize} < {want_ent}")
    if phnum and phoff + phnum * phentsize > len(blob):
        raise _bad(f"truncated ELF: program headers end at {phoff + phnum * phentsize:#x}, "
                   f"file is {len(blob):#x} bytes")
    segs = []
    try:
        for i, seg in enumerate(elf.iter_segments()):
            if seg["p_type"] not in ("PT_LOAD", PT_LOAD):
                continue
            off, filesz, memsz = seg["p_offset"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz:
                raise _bad(f"malformed ELF: segment {i} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
            if memsz == 0:
                continue
            if off + filesz > len(blob):
                raise _bad(f"truncated ELF: segment {i} data ends at {off + filesz:#x}, "
                           f"file is {len(blob):#x} bytes")
            segs.append((seg["p_paddr"], bytes(blob[off:off + filesz]), memsz, seg["p_flags"], i))
    except (ELFError, struct.error) as e:
        raise _bad(f"malformed ELF program headers: {e}") from None
    return machine, e_type, entry, segs


def _machine_name(m):
    return m if isinstance(m, str) else f"machine {m}"


def _load_aout_kludge(blob, off, flags):
    if off + 32 > len(blob):
        raise _bad("truncated multiboot header (a.out kludge fields past end of file)")
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", blob, off + 12)
    if load_addr > header_addr:
        raise _bad(f"bad multiboot header: load_addr {load_addr:#x} > header_addr {header_addr:#x}")
    file_start = off - (header_addr - load_addr)
    if file_start < 0:
        raise _bad("bad multiboot header: load_addr lies before the start of the file")
    if load_end == 0:
        size = len(blob) - file_start
    else:
        if load_end < load_addr:
            raise _bad(f"bad multiboot header: load_end_addr {load_end:#x} < load_addr {load_addr:#x}")
        size = load_end - load_addr
        if file_start + size > len(blob):
            raise _bad(f"truncated multiboot image: needs {file_start + size:#x} bytes, "
                       f"file is {len(blob):#x}")
    memsz = size
    if bss_end:
        if bss_end < load_addr + size:
            raise _bad(f"bad multiboot header: bss_end_addr {bss_end:#x} < load end {load_addr + size:#x}")
        memsz = bss_end - load_addr
    data = bytes(blob[file_start:file_start + size])
    segs = [(load_addr, data, memsz, PF_R | PF_W | PF_X, 0)] if memsz else []
    return entry, segs


def load_image(path, ram_size: int, name: str | None = None) -> Image:
    """Parse and validate the guest image at `path` for a guest of `ram_size` bytes."""
    _check_ram(ram_size)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _bad(f"image not found: {path}")
    if not os.path.isfile(path):
        raise _bad(f"image is not a regular file: {path}")
    try:
        size = os.path.getsize(path)
        if size > MAX_IMAGE_FILE:
            raise _bad(f"image too large: {path} is {size} bytes (max {MAX_IMAGE_FILE})")
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise _bad(f"cannot read image {path}: {e.strerror or e}") from None
    if name is None:
        name = os.path.basename(path)

    def err(msg):
        return _bad(f"{path}: {msg}")

    try:
        return _load(blob, path, name, ram_size)
    except BadInput as e:
        raise err(str(e)) from None


def _load(blob, path, name, ram_size) -> Image:
    if len(blob) == 0:
        raise _bad("not an ELF image (empty file)")
    is_elf = blob[:4] == b"\x7fELF"
    mb = _find_multiboot(blob)          # may raise on a bad checksum
    mb_flags = None
    warnings = []
    if mb is not None:
        mb_off, mb_flags = mb
        # bits 0-15 are requirements a loader must refuse when it cannot meet
        # them; bit 0 (page-aligned modules: there are none) and bit 1 (memory
        # information) are met.  Bit 2 asks for a video mode: like QEMU's
        # -kernel (and GRUB falling back to text mode) boot in VGA text mode
        # without video information, with a warning.  Bits 16-31 are optional
        # (bit 16: the a.out kludge addresses, honoured below).
        unsupported = mb_flags & 0xFFF8
        if unsupported:
            raise _bad(f"multiboot header requires unsupported features: flags bits "
                       f"{', '.join(str(b) for b in range(3, 16) if unsupported >> b & 1)} "
                       f"(flags {mb_flags:#x}; this loader knows bits 0-2 and 16)")
        if mb_flags & 4:
            warnings.append("multiboot header asks for a video mode (flags bit 2): booting in "
                            "VGA text mode without video information, as QEMU -kernel does")

    if mb is not None and mb_flags & (1 << 16):
        kind, mode = "multiboot", 32
        entry, segs = _load_aout_kludge(blob, mb_off, mb_flags)
    else:
        if not is_elf:
            if len(blob) < 4 and b"\x7fELF".startswith(blob):
                raise _bad("truncated ELF: the file ends inside the ELF magic")
            raise _bad("not an ELF image (bad magic) and no multiboot header")
        if len(blob) < 6:
            raise _bad(f"truncated ELF: {len(blob)} bytes")
        ei_class = blob[4]
        if ei_class == 1:
            elf_bits = 32
        elif ei_class == 2:
            elf_bits = 64
        else:
            raise _bad(f"not a valid ELF image (EI_CLASS {ei_class})")
        machine, e_type, entry, segs = _elf_segments(blob, elf_bits)
        if e_type != "ET_EXEC":
            raise _bad(f"unsupported ELF type {e_type}: link a static executable "
                       f"(-static -no-pie)")
        if elf_bits == 64:
            if machine != "EM_X86_64":
                raise _bad(f"ELF64 image is not x86-64 ({_machine_name(machine)})")
            kind, mode = "elf64", 64
        else:
            if machine not in ("EM_386", "EM_X86_64"):
                raise _bad(f"not an x86 image ({_machine_name(machine)})")
            if mb is None:
                raise _bad("ELF32 image without a multiboot header "
                           "(32-bit images must be multiboot v1 kernels)")
            if machine != "EM_386":
                raise _bad(f"multiboot ELF32 image has e_machine {machine}, want EM_386")
            kind, mode = "multiboot", 32

    if not segs:
        raise _bad("no loadable segments")

    # ranges: overflow, guest-physical space, reserved areas, overlaps
    limit = MAX_RAM
    for gpa, data, memsz, _, idx in segs:
        end = gpa + memsz
        if gpa < 0 or end > (1 << 64) or (mode == 32 and end > (1 << 32)):
            raise _bad(f"segment {idx} at {gpa:#x} size {memsz:#x} overflows the address space")
        if end > limit:
            raise _bad(f"segment {idx} ({gpa:#x}-{end - 1:#x}) lies outside guest RAM "
                       f"(guest-physical space ends at {limit:#x})")
        if gpa < BOOT_AREA_END:
            raise _bad(f"segment {idx} ({gpa:#x}-{end - 1:#x}) overlaps the boot area "
                       f"0x0-{BOOT_AREA_END - 1:#x} (GDT, boot page tables)")
        if kind == "multiboot":
            for lo, hi, what in ((MB_INFO, MB_INFO + PAGE, "multiboot info"),
                                 (LOW_HOLE[0], LOW_HOLE[1], "VGA/ROM hole")):
                if gpa < hi and end > lo:
                    raise _bad(f"segment {idx} ({gpa:#x}-{end - 1:#x}) overlaps the "
                               f"{what} at {lo:#x}-{hi - 1:#x}")
    ordered = sorted(segs, key=lambda s: s[0])
    for a, b in zip(ordered, ordered[1:]):
        if b[0] < a[0] + a[2]:
            raise _bad(f"segments {a[4]} ({a[0]:#x}-{a[0] + a[2] - 1:#x}) and {b[4]} "
                       f"({b[0]:#x}-{b[0] + b[2] - 1:#x}) overlap")

    if not any(gpa <= entry < gpa + memsz for gpa, _, memsz, _, _ in segs):
        raise _bad(f"entry point {entry:#x} is outside every loadable segment")

    top = max(gpa + memsz for gpa, _, memsz, _, _ in segs)
    image_end = (top + PAGE - 1) & ~(PAGE - 1)
    min_ram = image_end + STACK_HEADROOM
    if kind == "multiboot":
        min_ram = max(min_ram, LOW_HOLE[1] + STACK_HEADROOM)
    if ram_size < min_ram:
        raise _bad(f"guest RAM too small for the image: it ends at {top:#x} and needs "
                   f"{_fmt_size(STACK_HEADROOM)} of stack headroom, so RAM must be at least "
                   f"{_fmt_size(min_ram)}; have {_fmt_size(ram_size)}")

    img = Image(name=name, path=path, kind=kind, mode=mode, entry=entry,
                ram_size=ram_size, image_end=image_end, min_ram=min_ram,
                segments=[(gpa, data, memsz) for gpa, data, memsz, _, _ in ordered],
                seg_flags=[fl for _, _, _, fl, _ in ordered],
                multiboot_flags=mb_flags, warnings=warnings)
    gdt = (BOOT_GDT, boot_gdt())
    if kind == "elf64":
        img.extra_pages = [gdt] + boot_tables(ram_size)
        img.initial_regs = {"rip": entry, "rdi": ram_size, "rsp": ram_size, "rflags": 0x2}
        # SSE on (the x86-64 psABI assumes it: plain gcc output uses it for
        # floating point and block copies), as a 64-bit boot loader leaves it
        img.cpu = {"cr0": CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG, "cr3": BOOT_PML4,
                   "cr4": CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
                   "efer": EFER_LME | EFER_LMA | EFER_NXE,
                   "gdt_base": BOOT_GDT, "gdt_limit": 8 * len(GDT_ENTRIES) - 1,
                   "cs": SEL_CODE64, "ds": SEL_DATA, "es": SEL_DATA, "ss": SEL_DATA,
                   "fs": SEL_DATA, "gs": SEL_DATA}
    else:
        img.multiboot_info = MB_INFO
        img.extra_pages = [gdt, (MB_INFO, multiboot_info(ram_size))]
        img.initial_regs = {"eip": entry, "eax": MB_BOOT_MAGIC, "ebx": MB_INFO,
                            "esp": MB_STACK, "eflags": 0x2}
        img.cpu = {"cr0": CR0_PE | CR0_ET, "cr3": 0, "cr4": 0, "efer": 0,
                   "gdt_base": BOOT_GDT, "gdt_limit": 8 * len(GDT_ENTRIES) - 1,
                   "cs": SEL_CODE32, "ds": SEL_DATA, "es": SEL_DATA, "ss": SEL_DATA,
                   "fs": SEL_DATA, "gs": SEL_DATA}
    return img
