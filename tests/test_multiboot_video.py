"""A Multiboot kernel whose header asks for a video mode (flags bit 2) boots
in VGA text mode with a warning, as under QEMU -kernel (issue 13: the GRUB
manual's example kernel sets that bit).  The image is made here: a raw
a.out-kludge Multiboot image (flags bit 16) of hand-assembled 32-bit code."""
import json
import struct

import pytest

pytest.importorskip("unicorn")

from hv.cli.main import main  # noqa: E402
from hv.machine.unicorn_vcpu import available_hooks  # noqa: E402

MiB = 1 << 20
BASE = 0x100000
MB_MAGIC = 0x1BADB002

# eax == 0x2BADB002?  write mem_lower and mem_upper (ebx+4, ebx+8) to COM1 as
# 4 little-endian bytes each, 'O','K' into the VGA text buffer, then hlt;
# a wrong eax ends the run through port 0xF4 with code 7
_OUT4 = b"\xee\xc1\xe8\x08" * 3 + b"\xee"          # (out dx, al; shr eax, 8) x4
_GOOD = (b"\xba\xf8\x03\x00\x00"                 # mov edx, 0x3f8
         b"\x8b\x43\x04" + _OUT4 +                 # mov eax, [ebx+4]   mem_lower
         b"\x8b\x43\x08" + _OUT4 +                 # mov eax, [ebx+8]   mem_upper
         b"\x66\xc7\x05\x00\x80\x0b\x00\x4f\x07"   # mov word [0xb8000], 0x074f 'O'
         b"\x66\xc7\x05\x02\x80\x0b\x00\x4b\x07"   # mov word [0xb8002], 0x074b 'K'
         b"\xf4")                                 # hlt
_BAD = b"\xb0\x07\xe6\xf4\xf4"                     # mov al, 7; out 0xf4, al; hlt
CODE = (b"\x3d\x02\xb0\xad\x2b"                    # cmp eax, 0x2BADB002
        + b"\x75" + bytes([len(_GOOD)])           # jne bad
        + _GOOD + _BAD)


def test_hand_assembly_decodes_as_written():
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs
    insns = [(i.mnemonic, i.op_str) for i in Cs(CS_ARCH_X86, CS_MODE_32).disasm(CODE, BASE + 32)]
    assert insns[0] == ("cmp", "eax, 0x2badb002")
    assert insns[1] == ("jne", hex(BASE + 32 + len(CODE) - len(_BAD)))
    assert insns[-4:] == [("hlt", ""), ("mov", "al, 7"), ("out", "0xf4, al"), ("hlt", "")]
    assert ("mov", "eax, dword ptr [ebx + 8]") in insns


def mb_image(flags):
    hdr = struct.pack("<III5I", MB_MAGIC, flags, (-(MB_MAGIC + flags)) & 0xFFFFFFFF,
                      BASE, BASE, 0, BASE + 0x2000, BASE + 32)
    return hdr.ljust(32, b"\0") + CODE


HOOKS = [pytest.param(h, marks=[] if h in available_hooks() else
                      [pytest.mark.skip(reason=f"{h} hook not built")]) for h in ("c", "python")]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("mem", [16 * MiB, 64 * MiB])
def test_video_mode_request_boots_in_text_mode(tmp_path, capsys, hook, mem):
    img = tmp_path / "mbvideo.bin"
    img.write_bytes(mb_image(0x00010007))       # bits 0, 1, 2 (video) and 16 (a.out kludge)
    rc = main(["boot", str(img), "--mem", str(mem), "--host-mem", "128M", "--vga", "--json",
               "--hook", hook])
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert rc == 0 and d["exit_reason"] == "hlt", (d, err)
    # the multiboot info the kernel read: 640 KiB below 1 MiB, RAM above it
    serial = d["serial"].encode("latin-1")
    lower, upper = struct.unpack("<II", serial)
    assert (lower, upper) == (640, mem // 1024 - 1024)
    assert d["vga"][0].startswith("OK")
    # one warning line on stderr, and the same in the report
    warn = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "video mode (flags bit 2)" in warn[0] and str(img) in warn[0]
    assert d["warnings"] == [warn[0].split(": ", 3)[-1]]


def test_unmet_requirement_is_still_refused(tmp_path, capsys):
    img = tmp_path / "mbbit3.bin"
    img.write_bytes(mb_image(0x0001000B))       # bit 3: no such feature
    rc = main(["boot", str(img), "--mem", "16M", "--host-mem", "128M"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "flags bits 3" in err and "Traceback" not in err
