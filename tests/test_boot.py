"""hv boot: guests on the emulated vCPU through the PSP-managed NPT.

Parametrized over the vCPU hook backends (c, python) and, where it matters,
the NPT engine backend.  Guest RAM is kept small (4M..32M) for speed.
"""
import json
import struct

import pytest

from nptcore import available_backends
from nptcore.bits import ADDR_MASK, PF_FINAL, PF_ID, PF_WALK

MiB = 1 << 20

gbuild = pytest.importorskip("guests.build")
pytest.importorskip("unicorn")

from hv.machine.boot import Boot  # noqa: E402
from hv.cli.main import main  # noqa: E402
from hv.machine.unicorn_vcpu import available_hooks  # noqa: E402
from hv.vmm.vmm import Vmm  # noqa: E402

HOOKS = [pytest.param(h, marks=[] if h in available_hooks() else
                      [pytest.mark.skip(reason=f"{h} hook not built")], id=h)
         for h in ("c", "python")]
ENGINES = [pytest.param(b, marks=[] if b in available_backends() else
                        [pytest.mark.skip(reason=f"{b} engine not built")], id="eng-" + b)
           for b in ("c", "python")]




@pytest.fixture(params=HOOKS)
def hook(request):
    return request.param


def boot(path, mem=16 * MiB, hook="c", engine=None, max_insns=None, **kw):
    vmm = Vmm(host_mem=128 * MiB, backend=engine)
    try:
        b = Boot(vmm, path, mem=mem, hook=hook, **kw)
        res = b.run(max_insns)
        res.npf_log = list(b.vcpu.npf_log)
        res.touched = set(b.vcpu.touched)
        res.launch = set(b.launch_pages)
        b.close()
        return res
    finally:
        vmm.close()


# (mem, exit_reason, exit code, serial (substring))
GUESTS = {
    "hello": (16 * MiB, "exit_port", 0, "Hello from the guest!\n"),
    "compute": (16 * MiB, "exit_port", 0, "compute: primes below 1000000: 78498, sum 37550402023"),
    "paging": (16 * MiB, "exit_port", 0, "paging: OK\n"),
    "memtouch": (4 * MiB, "exit_port", 0, "memtouch: OK\n"),
    "firsttouch": (4 * MiB, "exit_port", 0, "firsttouch: "),
    "mb_hello": (32 * MiB, "exit_port", 0, "mem_lower=640KB mem_upper=31744KB\n"),
    "triple_fault": (16 * MiB, "triple_fault", 1, "triple_fault: empty IDT, ud2\n"),
    "jump_unmapped": (16 * MiB, "error", 1, "jumping to 0x1001000 (beyond RAM)\n"),
}


@pytest.mark.parametrize("name", sorted(GUESTS))
def test_guest(guests, hook, name):
    mem, reason, code, serial = GUESTS[name]
    r = boot(guests[name], mem, hook)
    assert (r.exit_reason, r.exit_code) == (reason, code), r.reason
    assert serial in r.serial
    assert r.npf >= 1 and r.instructions > 0 and r.launch_pages > 0
    assert r.pages_mapped >= r.launch_pages + r.npf - (1 if reason == "error" else 0)
    assert len(r.measurement) == 64
    if name == "compute":
        assert "compute: OK" in r.serial


def test_c_and_python_hooks_agree(guests):
    if "c" not in available_hooks():
        pytest.skip("C hook not built")
    for name in ("hello", "paging", "mb_hello"):
        mem = GUESTS[name][0]
        a, b = boot(guests[name], mem, "c"), boot(guests[name], mem, "python")
        for f in ("exit_reason", "exit_code", "serial", "npf", "instructions", "pages_mapped",
                  "measurement"):
            assert getattr(a, f) == getattr(b, f), (name, f)
        assert a.npf_log == b.npf_log


def test_decoder_made_with_the_vcpu(guests, hook, monkeypatch):
    """The block hook's capstone decoder is made when the vCPU is set up, not
    by the first block inside the run; a decoder that cannot be made there
    does not stop the set-up (the first block reports it, as before)."""
    import hv.machine.disasm
    real = hv.machine.disasm._cs
    made = []
    monkeypatch.setattr(hv.machine.disasm, "_cs", lambda bits: made.append(bits) or real(bits))
    vmm = Vmm(host_mem=128 * MiB)
    try:
        b = Boot(vmm, guests["hello"], mem=16 * MiB, hook=hook)
        assert made == [64]
        r = b.run()
        assert (r.exit_reason, r.serial) == ("exit_port", "Hello from the guest!\n")
        b.close()

        def missing(bits):
            raise ImportError("no capstone")
        monkeypatch.setattr(hv.machine.disasm, "_cs", missing)
        Boot(vmm, guests["mb_hello"], mem=32 * MiB, hook=hook).close()
    finally:
        vmm.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_agree(guests, hook, engine):
    r = boot(guests["paging"], 16 * MiB, hook, engine=engine)
    assert r.exit_code == 0 and "paging: OK" in r.serial
    assert r.engine == engine


def test_paging_guest_faults(guests, hook):
    # every NPF is either on the guest's table walk or on the final GPA
    r = boot(guests["paging"], 16 * MiB, hook)
    assert r.exit_code == 0
    errs = [e for _, _, e, _ in r.npf_log]
    assert all(bool(e & PF_WALK) != bool(e & PF_FINAL) for e in errs)


def test_walk_npf_then_guest_pf(tmp_path, hook):
    # PML4[1] -> a PDPT at GPA 0x300000 that nothing has touched: reading VA
    # 0x8000000000 makes the guest's walk read that page: an NPF with
    # PF_WALK; the (zero) page maps, its entry is not present: a guest #PF,
    # no IDT: triple fault
    code = (b"\x48\xc7\xc3\x08\x20\x00\x00"             # mov rbx, 0x2008
            + b"\x48\xc7\x03\x03\x00\x30\x00"           # mov qword [rbx], 0x300003
            + b"\x48\xb8" + struct.pack("<Q", 0x8000000000)  # mov rax, 0x8000000000
            + b"\x8a\x00"                                  # mov al, [rax]
            + b"\xb0\x05\xe6\xf4")                         # exit 5 (not reached)
    p = tmp_path / "walknpf"
    p.write_bytes(_elf64([(0x100000, code, len(code))], 0x100000))
    r = boot(p, 8 * MiB, hook)
    assert r.exit_reason == "triple_fault" and r.exit_code == 1
    assert "#PF" in r.reason and "cr2 0x8000000000" in r.reason
    walk = [(g, e) for g, _, e, _ in r.npf_log if e & PF_WALK]
    assert walk and walk[0][0] == 0x300000 and not walk[0][1] & PF_FINAL
    assert r.guest_pf == 1


def test_mb_hello_vga(guests, hook):
    for mem in (8 * MiB, 32 * MiB):
        r = boot(guests["mb_hello"], mem, hook, vga=True)
        assert r.exit_code == 0 and r.kind == "multiboot"
        assert len(r.vga) == 25
        assert r.vga[0] == f"mem_lower=640KB mem_upper={mem // 1024 - 1024}KB"


def test_triple_fault(guests, hook):
    r = boot(guests["triple_fault"], 16 * MiB, hook)
    assert r.exit_reason == "triple_fault" and r.exit_code == 1
    assert "#UD" in r.reason and "#DF" in r.reason and "triple fault" in r.reason
    assert r.registers and r.registers["rip"] == r.last_insns[-1][0]
    assert r.last_insns[-1][2] == "ud2"


def test_jump_unmapped_fetch_npf(guests, hook):
    r = boot(guests["jump_unmapped"], 16 * MiB, hook)
    assert r.exit_reason == "error" and r.exit_code == 1
    target = 16 * MiB + 0x1000
    assert "instruction fetch" in r.reason and f"{target:#x}" in r.reason
    gpa, _, err, rip = r.npf_log[-1]
    assert gpa == target and rip == target
    assert err & PF_ID and err & PF_FINAL and not err & PF_WALK
    assert r.fault["gpa"] == target and r.fault["access"] == "instruction fetch"
    # RAM not a multiple of 2 MiB: the target is past the 2 MiB round-up
    r = boot(guests["jump_unmapped"], 15 * MiB, hook)
    assert r.exit_code == 1 and f"{16 * MiB + 0x1000:#x}" in r.reason


@pytest.mark.parametrize("name", ["hello", "paging", "mb_hello", "memtouch"])
def test_npf_count_is_distinct_pages(guests, name):
    # python hook: it records every GPA page the walker translated (guest
    # table pages included); launch pages are mapped before the run
    mem = GUESTS[name][0]
    r = boot(guests[name], mem, "python")
    assert r.exit_code == 0
    demand = r.touched - r.launch
    assert r.npf == len(demand)
    assert {g >> 12 for g, _, _, _ in r.npf_log} == demand
    assert r.pages_mapped == r.launch_pages + r.npf


def test_max_insns(guests, hook):
    r = boot(guests["compute"], 16 * MiB, hook, max_insns=50_000)
    assert r.exit_reason == "insn_limit" and r.instructions == 50_000 and r.exit_code == 1


def test_measurement(guests):
    hooks = available_hooks()
    m = {boot(guests["hello"], 16 * MiB, h).measurement for h in hooks}
    m.add(boot(guests["hello"], 16 * MiB, hooks[-1], engine="python").measurement)
    assert len(m) == 1
    assert boot(guests["paging"], 16 * MiB).measurement not in m
    # the boot tables do not depend on RAM size; mb info does
    assert boot(guests["hello"], 32 * MiB).measurement in m
    assert boot(guests["mb_hello"], 8 * MiB).measurement != boot(guests["mb_hello"], 16 * MiB).measurement


def test_record_and_replay(guests, tmp_path, capsys):
    from hv.trace.replay import replay
    from hv.trace import load_trace
    for name in ("paging", "jump_unmapped"):
        trace = tmp_path / f"{name}.csv"
        rc = main(["boot", str(guests[name]), "--mem", "16M", "--json", "--record", str(trace)])
        out = json.loads(capsys.readouterr().out)
        assert rc == out["exit_code"]
        t = load_trace(str(trace))
        assert len(t) == out["npf"] and t.rip is not None and t.insn is not None
        # every row has its instruction, except a fetch the VMM could not back
        assert all(len(i) > 0 for i, a in zip(t.insn, t.access) if a != 2)
        rc = main(["replay", str(trace), "--json"])
        rep = json.loads(capsys.readouterr().out)
        assert rc == 0 and rep["npf"] == out["npf"]
        vmm = Vmm(host_mem=128 * MiB)
        vm = vmm.create_vm()
        replay(vmm, vm, t)
        mapped = {g >> 12 for g, _, _, _ in vmm.engine.mappings(vmm.npt_root(vm))}
        assert mapped == {g >> 12 for g in t.gpa}
        vmm.close()


def test_cli_text_mode(guests, capsys, tmp_path):
    ser = tmp_path / "serial.txt"
    rc = main(["boot", str(guests["hello"]), "--mem", "16M", "--serial", str(ser)])
    cap = capsys.readouterr()
    assert rc == 0
    assert cap.out == "Hello from the guest!\n"
    assert "exit_port" in cap.err and "NPF" in cap.err and "launch" in cap.err
    assert ser.read_text() == "Hello from the guest!\n"
    rc = main(["boot", str(guests["mb_hello"]), "--mem", "16M", "--vga", "--json"])
    d = json.loads(capsys.readouterr().out)
    for k in ("exit_reason", "exit_code", "serial", "npf", "instructions", "pages_mapped",
              "measurement", "vga"):
        assert k in d
    assert rc == 0 and d["vga"][0] == "mem_lower=640KB mem_upper=15360KB"


def _elf64(segs, entry):
    ehsize, phentsize = 64, 56
    off = ehsize + phentsize * len(segs)
    phdrs, body = b"", b""
    for paddr, data, memsz in segs:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, off + len(body), paddr, paddr, len(data), memsz, 0x1000)
        body += data
    hdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, ehsize, 0, 0, ehsize, phentsize, len(segs), 64, 0, 0)
    return hdr + phdrs + body


def test_hlt_guest(tmp_path, hook):
    # mov dx, 0x3f8; mov al, 'A'; out dx, al; hlt
    code = b"\x66\xba\xf8\x03\xb0\x41\xee\xf4"
    p = tmp_path / "hlt"
    p.write_bytes(_elf64([(0x100000, code, len(code))], 0x100000))
    r = boot(p, 4 * MiB, hook)
    assert (r.exit_reason, r.exit_code, r.serial, r.instructions) == ("hlt", 0, "A", 4)


def test_guest_pf_delivered_through_idt(tmp_path, hook):
    # a guest with an IDT: its #PF handler (vector 14) prints 'P' and exits 7
    # with the faulting address's low byte check.  Page tables: the boot
    # identity map; the guest clears the PD entry for 2M..4M, then touches it.
    base = 0x100000
    handler = base + 0x100
    idt = base + 0x800
    code = bytearray(0x1000)
    prog = (b"\x48\xc7\xc0" + struct.pack("<I", idt)           # mov rax, idt
            + b"\x48\x83\xec\x10"                              # sub rsp, 16
            + b"\x66\xc7\x04\x24\xff\x0f"                      # mov word [rsp], 0xfff
            + b"\x48\x89\x44\x24\x02"                          # mov [rsp+2], rax
            + b"\x0f\x01\x1c\x24"                              # lidt [rsp]
            + b"\x48\xc7\xc3\x08\x40\x00\x00"                  # mov rbx, 0x4008 (PD[1])
            + b"\x48\xc7\x03\x00\x00\x00\x00"                  # mov qword [rbx], 0
            + b"\x0f\x01\x3c\x25\x00\x00\x20\x00"              # invlpg [0x200000]
            + b"\x8a\x04\x25\x34\x12\x20\x00"                  # mov al, [0x201234] -> #PF
            + b"\xb0\x02\xe6\xf4")                             # mov al, 2; out 0xf4, al
    code[:len(prog)] = prog
    hnd = (b"\x66\xba\xf8\x03\xb0\x50\xee"                     # out 'P'
           + b"\x0f\x20\xd0"                                   # mov rax, cr2
           + b"\xe6\xf4")                                      # out 0xf4, al (0x34)
    code[0x100:0x100 + len(hnd)] = hnd
    gate = struct.pack("<HHBBHII", handler & 0xFFFF, 0x08, 0, 0x8E, handler >> 16, 0, 0)
    code[0x800 + 14 * 16:0x800 + 15 * 16] = gate
    p = tmp_path / "pfidt"
    p.write_bytes(_elf64([(base, bytes(code), len(code))], base))
    r = boot(p, 8 * MiB, hook)
    assert r.serial == "P" and r.exit_code == 0x34, r.reason
    assert r.guest_pf == 1 and r.exceptions[0][0] == 14


BAD = {
    "truncated": lambda: b"\x7fELF\x02\x01\x01" + bytes(20),
    "not_x86": lambda: _elf64([(0x100000, b"\xf4", 1)], 0x100000)[:18] + struct.pack("<H", 183)
    + _elf64([(0x100000, b"\xf4", 1)], 0x100000)[20:],
    "overlap": lambda: _elf64([(0x100000, b"\xf4" * 0x2000, 0x2000), (0x101000, b"\x90", 1)], 0x100000),
    "outside_ram": lambda: _elf64([(0x100000, b"\xf4", 1), (0x8000000, b"\x90", 1)], 0x100000),
    "mb_checksum": lambda: struct.pack("<III", 0x1BADB002, 0, 0) + bytes(64),
}


@pytest.mark.parametrize("case", sorted(BAD) + ["mem_too_small", "missing", "bad_mem"])
def test_cli_bad_input(tmp_path, capsys, guests, case):
    p = tmp_path / case
    args = ["boot", str(p), "--mem", "16M"]
    if case in BAD:
        p.write_bytes(BAD[case]())
    elif case == "mem_too_small":
        args = ["boot", str(guests["compute"]), "--mem", "1M"]
    elif case == "bad_mem":
        args = ["boot", str(guests["hello"]), "--mem", "lots"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("hv: ") and err.count("\n") == 1 and "Traceback" not in err


def _tamper_first_leaf(boot_obj):
    """Remap the first 4 KiB leaf of the guest's NPT to another frame (as
    SEVered does); returns (table page hpa, index, old, new)."""
    vmm, eng = boot_obj.vmm, boot_obj.vmm.engine
    root = vmm.npt_root(boot_obj.vm)
    for hpa, level in eng.table_pages(root):
        if level != 1:
            continue
        for i in range(512):
            e = vmm.mem.read_u64(hpa + 8 * i)
            if e & 1:
                new = (e & ~ADDR_MASK) | ((e & ADDR_MASK) ^ 0x1000)
                vmm.mem.write_u64(hpa + 8 * i, new)
                return hpa, i, e, new
    raise AssertionError("no leaf")


def test_check_insns_catches_tamper(guests, hook):
    vmm = Vmm(host_mem=128 * MiB)
    done = {}

    def attack(b, insns):
        if not done:
            done["t"] = _tamper_first_leaf(b)
            done["at"] = insns

    b = Boot(vmm, guests["compute"], mem=16 * MiB, hook=hook, check_insns=200_000, on_slice=attack)
    r = b.run()
    assert r.exit_reason == "psp_stopped" and r.exit_code == 3
    hpa, idx, old, new = done["t"]
    t = r.tamper
    assert t["page_hpa"] == hpa and t["entry_index"] == idx
    assert t["expected"] & ADDR_MASK == old & ADDR_MASK and t["found"] & ADDR_MASK == new & ADDR_MASK
    assert t["detected_by"] == "CHECK_ALL"
    # on_slice runs after a boundary's check: the tamper is live for one
    # whole interval and caught at the next check
    assert r.instructions == done["at"] + 200_000
    assert r.checks == done["at"] // 200_000 + 1
    b.close()
    vmm.close()


def test_update_npt_refused_after_tamper(guests, hook):
    # no periodic check: the next NPF's UPDATE_NPT finds the tamper (full
    # integrity mode re-hashes every table page before each update)
    vmm = Vmm(host_mem=128 * MiB, integrity="full")
    done = {}

    def attack(b, insns):
        if not done:
            done["t"] = _tamper_first_leaf(b)

    b = Boot(vmm, guests["memtouch"], mem=4 * MiB, hook=hook, on_slice=attack, slice_insns=5_000)
    r = b.run()
    assert r.exit_reason == "psp_stopped" and r.exit_code == 3, r.reason
    assert r.tamper["detected_by"] == "UPDATE_NPT"
    assert r.tamper["page_hpa"] == done["t"][0] and r.tamper["entry_index"] == done["t"][1]
    b.close()
    vmm.close()


def test_cli_check_ms(guests, capsys):
    rc = main(["boot", str(guests["hello"]), "--mem", "16M", "--json", "--check-ms", "1",
               "--check-insns", "50"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["checks"] >= 1 and d["exit_reason"] == "exit_port"


SSE_GUEST = r"""
typedef unsigned long u64;
static inline void outb(unsigned short p, unsigned char v)
{ __asm__ volatile("outb %0,%1" :: "a"(v), "Nd"(p)); }
struct big { u64 a[8]; };
static struct big src = {{1, 2, 3, 4, 5, 6, 7, 8}};
static struct big dst;
__attribute__((noinline)) double scale(double x) { return x * 1.5; }
void _start(u64 ram)
{
    dst = src;                                   /* SSE block copy */
    volatile double d = scale((double)dst.a[3]); /* SSE floating point */
    const char *m = d == 6.0 ? "sse ok\n" : "sse WRONG\n";
    for (; *m; m++) outb(0x3f8, *m);
    outb(0xf4, d == 6.0 ? 0 : 1);
    for (;;) __asm__ volatile("hlt");
}
"""


def test_plain_gcc_guest_with_sse(tmp_path, hook):
    """A toy guest compiled by plain gcc (no -mgeneral-regs-only) uses SSE for
    copies and floating point: the 64-bit entry state must have it enabled."""
    import shutil
    import subprocess
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed")
    src, img = tmp_path / "g.c", tmp_path / "g"
    src.write_text(SSE_GUEST)
    subprocess.run(["gcc", "-O2", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-static",
                    "-mno-red-zone", "-fno-stack-protector", "-Wl,-Ttext=0x100000",
                    "-Wl,-z,max-page-size=4096", "-o", str(img), str(src)], check=True)
    assert b"xmm" in subprocess.run(["objdump", "-d", str(img)], capture_output=True).stdout
    res = boot(str(img), hook=hook)
    assert (res.exit_reason, res.exit_code, res.serial) == ("exit_port", 0, "sse ok\n")


def test_firsttouch_touches_every_page_once(guests, hook):
    """The first-touch benchmark guest writes each page from the end of its
    image (the ELF's __image_end, rounded up) to RAM - 64 KiB once: that many
    NPFs, each a new page, plus the stack's."""
    from elftools.elf.elffile import ELFFile
    path = guests["firsttouch"]
    with open(path, "rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name("__image_end")[0]
    start = (sym["st_value"] + 4095) & ~4095
    mem = 4 * MiB
    want = (mem - 64 * 1024 - start) // 4096
    r = boot(path, mem, hook)
    assert (r.exit_reason, r.exit_code) == ("exit_port", 0), r.reason
    assert r.serial == f"firsttouch: {want} pages\n"
    # every touched page took its own NPF (fault-around 1): the data pages,
    # and at least one stack page; nothing else ran
    assert want < r.npf <= want + 4
    assert r.pages_mapped - r.launch_pages == r.npf


# ---------------------------------------------------------------------------
# the C NPF fast path (csrc/vcpu.c fast_npf) against the Python NPF path

def _boot_full(path, mem, fast, monkeypatch, racer=False, protect="digest"):
    """Boot with the NPF fast path on or off; everything the VMM, the PSP and
    the report say about the run."""
    import threading
    monkeypatch.setenv("HV_NPF_FAST", "1" if fast else "0")
    vmm = Vmm(host_mem=128 * MiB, protect=protect)
    stop = threading.Event()
    try:
        b = Boot(vmm, path, mem=mem, hook="c")
        if racer:      # another thread sends commands while the guest faults
            def race():
                while not stop.is_set():
                    vmm.psp.nop()
                    vmm.psp.guest_status(b.vm.handle)
            th = threading.Thread(target=race)
            th.start()
        try:
            r = b.run()
        finally:
            stop.set()
            if racer:
                th.join()
        st = vmm.psp.guest_status(b.vm.handle)
        out = {"exit": (r.exit_reason, r.exit_code), "serial": r.serial, "npf": r.npf,
               "npf_log": list(b.vcpu.npf_log), "pages_mapped": r.pages_mapped,
               "mapped": sorted(b.vm.mapped), "hpa_of": dict(b.vm.hpa_of),
               "digest": st.fields.get("digest"), "psp_pages": st.fields.get("mapped_pages"),
               "table": _table_bytes(vmm, b.vm),
               "python_npfs": b.vcpu._ctx.npf_calls, "frames_left": vmm.alloc.free_pages()}
        b.close()
        return out, vmm.psp.commands
    finally:
        vmm.close()


def _table_bytes(vmm, vm):
    """Every page of the guest's NPT, as the walker sees it in host memory."""
    return {t: vmm.mem.read(t, 4096) for t, _ in vmm.engine.table_pages(vmm.npt_root(vm))}


@pytest.mark.parametrize("protect", ["digest", "none"])
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_npf_fast_path_gives_the_python_paths_answers(guests, name, protect, monkeypatch):
    """digest: the C path's UPDATE_NPT through the PSP's entry; none: the C
    path's own write of the leaf. Either way the same NPFs, frames, books,
    table bytes (and digest) as the Python NPF path."""
    if "c" not in available_hooks():
        pytest.skip("the C vCPU hook is not built")
    mem = GUESTS[name][0]
    fast, fast_cmds = _boot_full(guests[name], mem, True, monkeypatch, protect=protect)
    slow, slow_cmds = _boot_full(guests[name], mem, False, monkeypatch, protect=protect)
    took = fast.pop("python_npfs"), slow.pop("python_npfs")
    # same NPFs in the same order, same frames, same table, same digest
    assert fast == slow
    assert fast_cmds == slow_cmds           # the fast path's UPDATE_NPTs are counted
    assert took[1] == slow["npf"]           # off: every NPF went to Python
    if slow["npf"] > 20 and name != "jump_unmapped":
        assert took[0] < slow["npf"] // 2   # on: most never left C


def test_npf_fast_path_with_a_racing_thread(guests, monkeypatch):
    """Commands from another thread while the guest faults through the fast
    path: the firmware's lock word keeps them apart; the outcome is the
    sequential one."""
    if "c" not in available_hooks():
        pytest.skip("the C vCPU hook is not built")
    alone, _ = _boot_full(guests["firsttouch"], 8 * MiB, True, monkeypatch)
    raced, _ = _boot_full(guests["firsttouch"], 8 * MiB, True, monkeypatch, racer=True)
    assert raced == alone
