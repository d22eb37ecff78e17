"""Bad input on the command line: one line on stderr, exit 2, never a traceback.

The contract: "Bad input (a malformed image, trace, command, address or range)
gets a clear error naming the problem and leaves every table and frame as it
was.  The CLI prints one line to stderr and exits 2; never a traceback."
Also: `--json` prints exactly one JSON object on stdout (for exit 1 and 3
too), and `hv boot` without --json streams the guest's serial output.

Every case is a subprocess run of `python -m hv`; cases are grouped and run
a few at a time in parallel to keep the file fast.
"""
import base64
import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENV.pop("HV_DEBUG", None)
SMALL = ["--host-mem", "64M"]
BOOT = ["--mem", "2M"] + SMALL
GUESTS = os.path.join(ROOT, "guests", "build")


def hv(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "hv", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def hv_many(argvs, workers=4):
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda a: hv(*a), argvs))


def assert_bad_input(r, *names, where=""):
    """exit 2, exactly one stderr line naming the problem, no traceback; on
    stdout nothing, or with --json the error as one JSON object."""
    ctx = f"{where}: rc={r.returncode} stdout={r.stdout[:300]!r} stderr={r.stderr[-600:]!r}"
    assert r.returncode == 2, ctx
    assert "Traceback" not in r.stderr, ctx
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("hv: "), ctx
    assert "internal error" not in lines[0], ctx
    for n in names:
        assert str(n) in lines[0], (n, ctx)
    if "--json" in r.args:
        assert one_json(r) == {"exit_reason": "bad_input", "exit_code": 2,
                               "error": lines[0][len("hv: "):]}, ctx
    else:
        assert r.stdout == "", ctx


def one_json(r):
    """stdout is exactly one JSON object on one line."""
    lines = r.stdout.strip("\n").split("\n")
    assert len(lines) == 1, r.stdout[:500]
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def guest(name):
    p = os.path.join(GUESTS, name)
    if not os.path.exists(p):
        r = hv("boot", name, *BOOT, "--max-insns", "1")      # builds the bundled guests
        if not os.path.exists(p):
            pytest.skip(f"bundled guest {name} not built: {r.stderr.strip()}")
    return p


def _patch(blob, off, fmt, val):
    b = bytearray(blob)
    struct.pack_into(fmt, b, off, val)
    return bytes(b)


def aout_kludge(code=b"", header_addr=0x100000, load_addr=0x100000, load_end=0, bss_end=0,
                entry=0x100020, pad=0, total=0x1000):
    """A raw multiboot v1 image (a.out kludge, flags bit 16), code at 0x20."""
    flags = 0x00010003
    hdr = struct.pack("<III5I", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                      header_addr, load_addr, load_end, bss_end, entry)
    body = (b"\0" * pad + hdr).ljust(pad + 0x20, b"\0") + code
    return body.ljust(total, b"\xf4")      # hlt


# --------------------------------------------------------------------------
# usage and option values

def test_bad_options_exit_2_naming_the_option(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("access,gpa\nr,0x1000\n")
    cases = [
        ([], "usage"),
        (["nosuchcommand"], "nosuchcommand"),
        (["boot"], "image"),
        (["boot", "hello", "--mem", "1", *SMALL], "--mem"),
        (["boot", "hello", "--mem", "3.5G", *SMALL], "--mem"),
        (["boot", "hello", "--mem", "1T", *SMALL], "--mem"),
        (["boot", "hello", "--mem", "60M", *SMALL], "--mem"),          # > usable host memory
        (["boot", "hello", "--mem", "2M", "--host-mem", "1"], "--host-mem"),
        (["boot", "hello", "--mem", "2M", "--host-mem", "65537k"], "--host-mem"),
        (["boot", "hello", *BOOT, "--max-insns", "0"], "--max-insns"),
        (["boot", "hello", *BOOT, "--check-insns", "0"], "--check-insns"),
        (["boot", "hello", *BOOT, "--check-ms", "0"], "--check-ms"),
        (["boot", "hello", *BOOT, "--psp", "process", "--psp-timeout", "0"], "--psp-timeout"),
        (["replay", t, *SMALL, "--psp", "process", "--psp-timeout", "nan"], "--psp-timeout"),
        (["replay", t, *SMALL, "--fault-around", "0"], "--fault-around"),
        (["replay", t, *SMALL, "--fault-around", "513"], "--fault-around"),
        (["attack", "--check-ms", "inf", *SMALL], "--check-ms"),
        (["bench", "--tiny", "--only", ","], "--only"),
    ]
    for (argv, name), r in zip(cases, hv_many([a for a, _ in cases])):
        assert_bad_input(r, name, where=argv)


# --------------------------------------------------------------------------
# images

def _bad_images(d):
    hello = open(guest("hello"), "rb").read()
    mb = open(guest("mb_hello"), "rb").read()
    imgs = {}

    def put(name, blob):
        p = d / name
        p.write_bytes(blob)
        imgs[name] = p

    put("empty.elf", b"")
    put("random.bin", bytes((i * 7919 + 13) & 0xFF for i in range(8192)))
    put("machine.elf", _patch(hello, 18, "<H", 40))                      # EM_ARM
    put("class.elf", _patch(hello, 4, "B", 3))
    put("phoff_max.elf", _patch(hello, 32, "<Q", (1 << 64) - 1))
    put("phnum.elf", _patch(hello, 56, "<H", 0xFFFF))
    put("nophdrs.elf", _patch(hello, 56, "<H", 0))
    put("poffset.elf", _patch(hello, 64 + 8, "<Q", (1 << 64) - 1))
    put("memsz_lt_filesz.elf", _patch(hello, 64 + 40, "<Q", 10))
    put("paddr_2_64.elf", _patch(hello, 64 + 24, "<Q", (1 << 64) - 0x100))
    put("lowboot.elf", _patch(_patch(hello, 64 + 24, "<Q", 0x2000), 24, "<Q", 0x2000))
    put("entry.elf", _patch(hello, 24, "<Q", 0x500000))
    ov = _patch(hello, 64 + 56, "<I", 1)                                # 2nd phdr -> PT_LOAD
    ov = _patch(_patch(ov, 64 + 56 + 24, "<Q", 0x100100), 64 + 56 + 40, "<Q", 0x100)
    put("overlap.elf", ov)
    i = mb.find(b"\x02\xb0\xad\x1b")
    nomb = bytearray(mb)
    nomb[i:i + 4] = b"XXXX"
    put("elf32_nomb.elf", bytes(nomb))
    put("mb_checksum.elf", _patch(mb, i + 8, "<I", struct.unpack_from("<I", mb, i + 8)[0] ^ 1))
    put("aout_load_gt_hdr.bin", aout_kludge(load_addr=0x200000))
    put("aout_end_beyond.bin", aout_kludge(load_end=0xFFFFFFFF))
    put("aout_low.bin", aout_kludge(header_addr=0x1000, load_addr=0x1000, entry=0x1020))
    put("aout_beyond_8k.bin", aout_kludge(header_addr=0x102000, pad=0x2000, total=0x3000))
    return imgs


def test_bad_images_exit_2_naming_the_file(tmp_path):
    imgs = _bad_images(tmp_path)
    d = tmp_path / "adir"
    d.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop1"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    paths = list(imgs.values()) + [d, fifo, loop, "/dev/zero"]
    for p, r in zip(paths, hv_many([["boot", p, *BOOT, "--json"] for p in paths])):
        assert_bad_input(r, os.path.basename(str(p)), where=p)


def test_bad_image_creates_no_output_files(tmp_path):
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\0" * 100)
    outs = [tmp_path / "serial.txt", tmp_path / "rec.csv", tmp_path / "hostmem"]
    r = hv("boot", bad, *BOOT, "--serial", outs[0], "--record", outs[1],
           "--host-mem-file", outs[2])
    assert_bad_input(r, "bad.elf")
    assert not any(p.exists() for p in outs)


def test_boot_unusable_output_and_host_memory(tmp_path):
    hello = guest("hello")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop1"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    cases = [
        (["--host-mem-file", tmp_path / "nodir" / "mem"], "nodir"),
        (["--host-mem-file", tmp_path], str(tmp_path)),
        (["--host-mem-file", "/dev/null"], "/dev/null"),
        (["--host-mem-file", fifo], "fifo"),
        (["--host-mem-file", loop], "loop1"),
        (["--serial", tmp_path], "--serial"),
        (["--serial", tmp_path / "nodir" / "s.txt"], "s.txt"),
        (["--record", tmp_path], "--record"),
        (["--record", tmp_path / "nodir" / "r.csv.gz"], "r.csv.gz"),
    ]
    rs = hv_many([["boot", hello, *BOOT, *extra] for extra, _ in cases]
                 + [["boot", hello, "--mem", "2M", "--host-mem", "1000T", "--json"]])
    for (extra, name), r in zip(cases, rs):
        assert_bad_input(r, name, where=extra)
    # host memory that cannot be mapped is the user's --host-mem, not exit 1
    assert_bad_input(rs[-1], "--host-mem", where="--host-mem 1000T")


# --------------------------------------------------------------------------
# traces

GOOD_TRACES = {
    "crlf.csv": b"access,gpa\r\nr,0x1000\r\nw,0x2000\r\n",
    "bom.csv": "\ufeffaccess,gpa\nr,0x1000\n".encode(),
    "tabs.csv": b"access,\tgpa\n\tr\t,\t0x1000\t\n",
    "mixed.ftrace": b"  qemu-1 [000] 1.0: kvm_page_fault: address 1000 error_code 2\n"
                    b"  qemu-1 [000] 1.1: kvm_page_fault: vcpu 0 rip 0x1 address 0x2000 "
                    b"error_code 0x14\n",
    "chatter.lackey": b"==1== Lackey\nI  04000000,3\n L 04001000,8\n M 04003000,4\n==1== end\n",
}

BAD_TRACES = {
    "trailing_comma_hdr.csv": b"access,gpa,\nr,0x1000,\n",
    "cross_limit.csv": b"access,gpa,size\nr,0xfffffffffff8,9\n",
    "at_limit.csv": b"access,gpa\nr,0x1000000000000\n",
    "neg.csv": b"access,gpa\nr,-1\n",
    "quoted.csv": b'access,gpa\n"r","0x1000"\n',
    "latin1.csv": b"access,gpa\nr,0x1000\n# caf\xe9\n",
    "utf16.csv": "access,gpa\nr,0x1000\n".encode("utf-16"),
    "odd.lackey": b"I  04000000,3\n X 04001000,8\n",
    "past_limit.lackey": b" L ffffffffffff,8\n",
    "bad.ftrace": b"  qemu-1 [000] 1.0: kvm_page_fault: address zzz error_code 2\n",
    "junk.gz": b"\x1f\x8bjunkjunkjunk",
}


def test_traces(tmp_path):
    import gzip
    for name, data in {**GOOD_TRACES, **BAD_TRACES}.items():
        (tmp_path / name).write_bytes(data)
    body = b"access,gpa\n" + b"r,0x1000\n" * 2000
    (tmp_path / "trunc.csv.gz").write_bytes(gzip.compress(body)[:40])
    (tmp_path / "ok.csv.gz").write_bytes(gzip.compress(body))
    d = tmp_path / "adir"
    d.mkdir()
    loop = tmp_path / "loop1"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    good = list(GOOD_TRACES) + ["ok.csv.gz"]
    bad = list(BAD_TRACES) + ["trunc.csv.gz"]
    extra_bad = [d, loop, "/dev/zero"]
    argvs = ([["replay", tmp_path / n, *SMALL, "--json"] for n in good + bad]
             + [["replay", p, *SMALL, "--json"] for p in extra_bad])
    rs = hv_many(argvs)
    for n, r in zip(good, rs):
        assert r.returncode == 0, (n, r.stderr)
        assert one_json(r)["accesses"] >= 1
    for p, r in zip(bad + extra_bad, rs[len(good):]):
        assert_bad_input(r, os.path.basename(str(p)), where=p)


def test_replay_save_to_unusable_path(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("access,gpa\nr,0x1000\n")
    cases = [tmp_path, tmp_path / "nodir" / "s.json"]
    for p, r in zip(cases, hv_many([["replay", t, *SMALL, "--save", p, "--json"] for p in cases])):
        assert_bad_input(r, "--save", str(p), where=p)


# --------------------------------------------------------------------------
# snapshots (hv inspect)

@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    d = tmp_path_factory.mktemp("snap")
    t = d / "t.csv"
    t.write_text("access,gpa\nr,0x1000\nw,0x3000\nx,0x40000000\n")
    s = d / "s.json"
    r = hv("replay", t, *SMALL, "--save", s)
    assert r.returncode == 0, r.stderr
    return json.loads(s.read_text())


def test_inspect_bad_snapshots(tmp_path, snapshot):
    s = snapshot
    root, tables = s["root"], s["tables"]
    pml4 = bytearray(base64.b64decode(tables[0][2]))
    struct.pack_into("<Q", pml4, 8 * 7, root | 3)         # an entry pointing back at the root
    cyclic = [[root, 4, base64.b64encode(bytes(pml4)).decode()]] + tables[1:]
    bad = {
        "list.json": [1, 2],
        "string.json": "snapshot",
        "neg_root.json": {**s, "root": -4096},
        "root_outside.json": {**s, "root": s["host_size"]},
        "root_not_table.json": {**s, "root": root + (64 << 10)},
        "huge_host.json": {**s, "host_size": 1 << 60},
        "float_host.json": {**s, "host_size": 1.5e9},
        "dup_hpa.json": {**s, "tables": tables + [tables[0]]},
        "short_page.json": {**s, "tables": [[root, 4, "AAAA"]]},
        "digest_num.json": {**s, "digest": 12345},
        "frames_list.json": {**s, "frames": [1, 2]},
    }
    for name, obj in bad.items():
        (tmp_path / name).write_text(json.dumps(obj))
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "garbage.json").write_bytes(b"\xff\xfe{not json")
    good = {
        "cyclic.json": {**s, "tables": cyclic},
        "big_host.json": {**s, "host_size": 1 << 50},      # must not map 1 PiB
    }
    for name, obj in good.items():
        (tmp_path / name).write_text(json.dumps(obj))
    d = tmp_path / "adir"
    d.mkdir()
    badp = [tmp_path / n for n in list(bad) + ["deep.json", "garbage.json"]] + [d, "/dev/zero"]
    argvs = ([["inspect", p] for p in badp[:-2]] + [["inspect", p, "--json"] for p in badp[-2:]]
             + [["inspect", tmp_path / n, "--json"] for n in good] + [["inspect", tmp_path / "cyclic.json"]])
    rs = hv_many(argvs)
    for p, r in zip(badp, rs):
        assert_bad_input(r, os.path.basename(str(p)), where=p)
    rg = rs[len(badp):]
    for n, r in zip(good, rg):
        assert r.returncode == 0, (n, r.stderr)
        rep = one_json(r)
        assert rep["mappings"] == 3 and rep["table_pages"]["4"] == 1
    assert rg[-1].returncode == 0 and "table pages per level" in rg[-1].stdout


# --------------------------------------------------------------------------
# attack and bench: bad configuration is exit 2, checked before the work

def test_attack_and_bench_bad_configuration(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    cases = [
        (["attack", "severed_remap", "--host-mem", "1000T", "--json"], "--host-mem"),
        (["attack", "severed_remap", "--host-mem", "1"], "--host-mem"),
        (["attack", "severed_remap", *SMALL, "--host-mem-file", tmp_path / "nodir" / "m"], "nodir"),
        (["attack", "severed_remap", *SMALL, "--psp", "process", "--psp-timeout", "0"],
         "--psp-timeout"),
        (["bench", "--tiny", "--only", "sha256", "--plot", f], "afile"),
        (["bench", "--tiny", "--only", "sha256", "--plot", f / "sub"], "--plot"),
    ]
    for (argv, name), r in zip(cases, hv_many([a for a, _ in cases])):
        assert_bad_input(r, name, where=argv)


# --------------------------------------------------------------------------
# --json is one object for exit 1 and 3; serial output streams

def test_json_one_object_for_guest_failure_and_insn_limit(tmp_path):
    loop = tmp_path / "loop.bin"
    loop.write_bytes(aout_kludge(b"\xeb\xfe"))                      # jmp $
    rs = hv_many([["boot", guest("triple_fault"), *BOOT, "--json"],
                  ["boot", guest("jump_unmapped"), *BOOT, "--json"],
                  ["boot", loop, *BOOT, "--json", "--max-insns", "5000"],
                  ["boot", loop, *BOOT, "--json", "--max-insns", "5000", "--insn-limit-ok"]])
    # a run cut short by --max-insns is not a clean exit, unless --insn-limit-ok
    for r, reason, code in zip(rs, ("triple_fault", "error", "insn_limit", "insn_limit"),
                               (1, 1, 1, 0)):
        assert r.returncode == code, r.stderr
        d = one_json(r)
        assert d["exit_reason"] == reason and d["exit_code"] == code
        assert "Traceback" not in r.stderr


TAMPER = r"""
import sys
import hv.machine.boot as hb
orig = hb.Boot.__init__

def tamper(b, insns):
    if getattr(b, "_done", False):
        return
    vmm = b.vmm
    for hpa, lvl in vmm.engine.table_pages(vmm.npt_root(b.vm)):
        if lvl == 1:
            for i in range(512):
                e = vmm.mem.read_u64(hpa + 8 * i)
                if e & 1:
                    vmm.mem.write_u64(hpa + 8 * i, e ^ 0x1000)
                    b._done = True
                    return

def init(self, *a, **kw):
    kw["on_slice"] = tamper
    orig(self, *a, **kw)

hb.Boot.__init__ = init
from hv.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

INTERNAL = r"""
import sys
import hv.trace.replay
def boom(*a, **kw):
    raise RuntimeError("simulated bug\nsecond line")
hv.trace.replay.replay = boom
from hv.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_json_one_object_for_tamper_and_internal_error(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("access,gpa\nr,0x1000\n")
    compute = guest("compute")

    def py(script, *args):
        return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=120)
    with ThreadPoolExecutor(2) as ex:
        ft = ex.submit(py, TAMPER, "boot", compute, "--mem", "16M", *SMALL,
                       "--check-insns", "20000", "--json")
        fi = ex.submit(py, INTERNAL, "replay", t, *SMALL, "--json")
        rt, ri = ft.result(), fi.result()
    assert rt.returncode == 3, rt.stderr
    d = one_json(rt)
    assert d["exit_reason"] == "psp_stopped" and d["exit_code"] == 3 and d["tamper"]
    # an internal error (a bug, exit 1) still gives one JSON object and one stderr line
    assert ri.returncode == 1, ri.stderr
    assert one_json(ri)["exit_reason"] == "error"
    assert len(ri.stderr.strip().splitlines()) == 1 and "Traceback" not in ri.stderr


def test_boot_streams_serial_output(tmp_path):
    # prints "A\n" on COM1, then spins forever: the line must arrive while it runs
    code = b"\x66\xba\xf8\x03" b"\xb0\x41\xee" b"\xb0\x0a\xee" b"\xeb\xfe"
    img = tmp_path / "spin.bin"
    img.write_bytes(aout_kludge(code))
    p = subprocess.Popen([sys.executable, "-m", "hv", "boot", str(img), *BOOT], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=30), "no serial output within 30 s"
        assert p.stdout.readline() == b"A\n"
        assert p.poll() is None          # still running: the output was streamed
    finally:
        p.kill()
        p.communicate(timeout=30)
