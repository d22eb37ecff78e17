"""Rough edges of the CLI and its libraries (review follow-ups):

1. --host-mem-file / HostMemory(path=...) refuses to overwrite a non-empty
   file unless told to, and never removes a file it did not create;
2. a size cap on traces (plain file size and gzip-decompressed bytes), for
   both parser backends;
3. `hv bench` does not take the shared --psp/--backend/... options;
4. `hv boot --max-insns` used up exits 1 unless --insn-limit-ok.
"""
import gzip
import json
import os
import struct
import subprocess
import sys
import threading
import zlib

import pytest

from hv import trace as trace_mod
from hv.trace import cparse as trace_cparse
from hv.trace import files as trace_files
from hv.trace import text as trace_text
from test_cli_badinput import assert_bad_input   # one definition of "bad input"
from hv.cli.main import main
from hv.errors import TraceError
from hv.vmm.hostmem import HostMemory, HostMemoryError
from hv.trace import MAX_TRACE_BYTES, load_trace, parse_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENV.pop("HV_DEBUG", None)
MiB = 1 << 20
SMALL = ["--host-mem", "64M"]
TRACE = b"access,gpa\nr,0x1000\nw,0x2000\n"


def hv(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hv", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)




def run_main(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def trace_file(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(TRACE)
    return p


# --------------------------------------------------------------------------
# 1. --host-mem-file does not clobber the user's file

USER_DATA = b"the user's precious data\n" * 10


def test_library_refuses_nonempty_file_and_leaves_it(tmp_path):
    f = tmp_path / "precious.bin"
    f.write_bytes(USER_DATA)
    with pytest.raises(HostMemoryError, match="precious.bin") as ei:
        HostMemory(64 * MiB, path=f)
    assert "overwrite" in str(ei.value) and "--host-mem-file-overwrite" in str(ei.value)
    assert f.read_bytes() == USER_DATA           # not truncated, not removed
    with pytest.raises(HostMemoryError):         # str path too, and a shared request
        HostMemory(64 * MiB, str(f), shared=True)
    assert f.read_bytes() == USER_DATA


def test_library_overwrite_starts_zero_filled_and_keeps_the_file(tmp_path):
    f = tmp_path / "mem.bin"
    f.write_bytes(b"\xaa" * 3 * 4096)
    m = HostMemory(64 * MiB, path=f, overwrite=True)
    try:
        # host memory is zero-filled like anonymous memory, not the old bytes
        assert m.read(0, 3 * 4096) == bytes(3 * 4096)
        m.write_u64(0x1000, 0x1122334455667788)
    finally:
        m.close()
    assert f.stat().st_size == 64 * MiB
    assert f.read_bytes()[0x1000:0x1008] == struct.pack("<Q", 0x1122334455667788)


@pytest.mark.parametrize("pre", ["new", "empty"])
def test_library_new_or_empty_file_is_fine(tmp_path, pre):
    f = tmp_path / "mem.bin"
    if pre == "empty":
        f.write_bytes(b"")
    m = HostMemory(64 * MiB, path=f)
    m.write(0, b"x")
    m.close()
    assert f.stat().st_size == 64 * MiB


def test_library_reuses_its_own_file_in_the_same_process(tmp_path):
    # a new Vmm per scenario on one --host-mem-file (hv attack) must work
    f = tmp_path / "mem.bin"
    m = HostMemory(64 * MiB, path=f)
    m.write(0, b"old run")
    m.close()
    m = HostMemory(64 * MiB, path=f)
    try:
        assert m.read(0, 7) == bytes(7)          # and it starts zero-filled again
    finally:
        m.close()
    # the same file is not "ours" once someone else changed its size
    f.write_bytes(USER_DATA)
    with pytest.raises(HostMemoryError, match="mem.bin"):
        HostMemory(64 * MiB, path=f)
    assert f.read_bytes() == USER_DATA


def _failing_mmap(*a, **k):
    raise OSError(12, "Cannot allocate memory")


def test_failure_removes_only_a_file_it_created(tmp_path, monkeypatch):
    import hv.vmm.hostmem as hm
    monkeypatch.setattr(hm.mmap, "mmap", _failing_mmap)
    new = tmp_path / "new.bin"
    with pytest.raises(HostMemoryError, match="new.bin"):
        HostMemory(64 * MiB, path=new)
    assert not new.exists()                       # ours: removed again
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(HostMemoryError, match="empty.bin"):
        HostMemory(64 * MiB, path=empty)
    assert empty.exists()                         # the user's: kept
    given = tmp_path / "given.bin"
    given.write_bytes(USER_DATA)
    with pytest.raises(HostMemoryError, match="given.bin"):
        HostMemory(64 * MiB, path=given, overwrite=True)
    assert given.exists()


def test_dangling_symlink_is_refused_and_creates_nothing(tmp_path):
    link = tmp_path / "link"
    os.symlink(tmp_path / "target", link)
    with pytest.raises(HostMemoryError, match="link"):
        HostMemory(64 * MiB, path=link)
    assert not (tmp_path / "target").exists() and os.path.islink(link)


def test_vmm_twice_on_one_file(tmp_path):
    from hv import Vmm
    f = tmp_path / "mem.bin"
    for _ in range(2):
        v = Vmm(host_mem=64 * MiB, host_mem_path=str(f))
        vm = v.create_vm()
        v.touch(vm, 0x1234, access=1)
        v.close()


def test_cli_refuses_nonempty_host_mem_file(tmp_path, trace_file):
    f = tmp_path / "precious.bin"
    f.write_bytes(USER_DATA)
    serial = tmp_path / "serial.txt"
    rs = [hv("replay", trace_file, *SMALL, "--host-mem-file", f),
          hv("boot", "hello", "--mem", "2M", *SMALL, "--host-mem-file", f, "--serial", serial),
          hv("attack", "severed_remap", *SMALL, "--host-mem-file", f)]
    for r in rs:
        assert_bad_input(r, "precious.bin", "--host-mem-file-overwrite")
    assert f.read_bytes() == USER_DATA
    assert not serial.exists()                    # refused before any output file


def test_cli_overwrite_flag_and_empty_file(tmp_path, trace_file, capsys):
    f = tmp_path / "mem.bin"
    f.write_bytes(USER_DATA)
    rc, out, err = run_main(capsys, "replay", trace_file, *SMALL, "--host-mem-file", f,
                            "--host-mem-file-overwrite", "--json")
    assert rc == 0, err
    assert json.loads(out)["npf"] == 2
    assert f.stat().st_size == 64 * MiB
    e = tmp_path / "empty.bin"
    e.write_bytes(b"")
    rc, out, err = run_main(capsys, "replay", trace_file, *SMALL, "--host-mem-file", e, "--json")
    assert rc == 0, err
    assert e.stat().st_size == 64 * MiB


def test_cli_overwrite_flag_needs_a_file(trace_file):
    assert_bad_input(hv("replay", trace_file, *SMALL, "--host-mem-file-overwrite"),
                     "--host-mem-file-overwrite", "--host-mem-file FILE")


def test_attack_runs_several_vmms_on_one_new_file(tmp_path):
    f = tmp_path / "mem.bin"
    r = hv("attack", "severed_remap", *SMALL, "--host-mem-file", f, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["scenarios"]
    assert len(res) == 1 and res[0]["outcome"] in ("refused", "detected"), res
    assert f.stat().st_size == 64 * MiB
    # a second run finds the file non-empty: refused without the flag
    assert_bad_input(hv("attack", "severed_remap", *SMALL, "--host-mem-file", f),
                     "mem.bin", "--host-mem-file-overwrite")


# --------------------------------------------------------------------------
# 2. the trace size cap

@pytest.fixture(params=["c", "python"])
def tbackend(request):
    if request.param not in trace_mod.available_backends():
        pytest.skip("C trace parser not built")
    return request.param


def _text(n_lines):
    return b"access,gpa\n" + b"r,0x1000\n" * n_lines


def test_default_cap_is_4_gib():
    assert MAX_TRACE_BYTES == 4 << 30
    import inspect
    assert inspect.signature(load_trace).parameters["max_bytes"].default == MAX_TRACE_BYTES
    assert inspect.signature(parse_trace).parameters["max_bytes"].default == MAX_TRACE_BYTES


def test_gzip_cap_boundary_both_backends(tmp_path, tbackend):
    text = _text(1000)
    p = tmp_path / "t.csv.gz"
    p.write_bytes(gzip.compress(text))
    assert len(load_trace(p, backend=tbackend, max_bytes=len(text))) == 1000
    with pytest.raises(TraceError) as ei:
        load_trace(p, backend=tbackend, max_bytes=len(text) - 1)
    assert ei.value.path == str(p) and "gzip" in ei.value.msg
    assert f"{len(text) - 1} bytes" in ei.value.msg and "--max-trace-bytes" in ei.value.msg
    # bytes handed to parse_trace directly are capped the same way
    with pytest.raises(TraceError, match="1 KiB"):
        parse_trace(gzip.compress(text), backend=tbackend, max_bytes=1024)


def test_plain_file_cap_boundary_both_backends(tmp_path, tbackend):
    text = _text(100)
    p = tmp_path / "t.csv"
    p.write_bytes(text)
    assert len(load_trace(p, backend=tbackend, max_bytes=len(text))) == 100
    with pytest.raises(TraceError, match=f"{len(text)} bytes.*{len(text) - 1} bytes"):
        load_trace(p, backend=tbackend, max_bytes=len(text) - 1)
    with pytest.raises(TraceError, match="trace text"):
        parse_trace(text, backend=tbackend, max_bytes=len(text) - 1)


def test_nested_gzip_is_capped_too(tmp_path, tbackend):
    text = _text(1000)
    p = tmp_path / "t.csv.gz.gz"
    p.write_bytes(gzip.compress(gzip.compress(text)))
    assert len(load_trace(p, backend=tbackend)) == 1000
    with pytest.raises(TraceError, match="decompresses to more than"):
        load_trace(p, backend=tbackend, max_bytes=len(text) - 1)


def test_max_bytes_none_and_bad_values(tmp_path):
    p = tmp_path / "t.csv.gz"
    p.write_bytes(gzip.compress(_text(10)))
    assert len(load_trace(p, max_bytes=None)) == 10
    for bad in (0, -1, 1.5, True, "1M"):
        with pytest.raises(ValueError):
            load_trace(p, max_bytes=bad)


class _CountingDecompressor:
    def __init__(self, inner, counter):
        self._inner, self._counter = inner, counter

    def decompress(self, data, max_length=0):
        out = self._inner.decompress(data, max_length)
        self._counter[0] += len(out)
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_bomb_stops_at_the_cap_without_inflating_it_all(tmp_path, monkeypatch):
    # 64 MiB of newlines in a ~64 KiB file; with a 1 MiB cap decompression
    # must stop right after the cap, not inflate the whole bomb first
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = c.compress(b"access,gpa\nr,0x1000\n") + c.compress(b"\n" * (64 * MiB)) + c.flush()
    assert len(bomb) < MiB
    p = tmp_path / "bomb.csv.gz"
    p.write_bytes(bomb)
    produced = [0]
    real = zlib.decompressobj

    class Z:
        MAX_WBITS = zlib.MAX_WBITS
        error = zlib.error

        @staticmethod
        def decompressobj(*a):
            return _CountingDecompressor(real(*a), produced)

    monkeypatch.setattr(trace_files, "zlib", Z)
    with pytest.raises(TraceError, match="bomb.csv.gz.*1 MiB"):
        load_trace(p, max_bytes=MiB)
    assert MiB < produced[0] <= MiB + 1


def test_gzip_members_padding_and_corruption(tmp_path, tbackend):
    a, b = b"access,gpa\nr,0x1000\n", b"w,0x2000\n"
    p = tmp_path / "m.csv.gz"
    p.write_bytes(gzip.compress(a) + b"\0" * 7 + gzip.compress(b))     # as gzip.decompress
    t = load_trace(p, backend=tbackend)
    assert list(t.gpa) == [0x1000, 0x2000]
    for name, blob, what in [("trail.gz", gzip.compress(a) + b"junk", "trailing"),
                             ("trunc.gz", gzip.compress(a)[:-5], "gzip"),
                             ("crc.gz", gzip.compress(a)[:-8] + b"\0" * 8, "gzip")]:
        q = tmp_path / name
        q.write_bytes(blob)
        with pytest.raises(TraceError, match=what) as ei:
            load_trace(q, backend=tbackend)
        assert ei.value.path == str(q) and "corrupt gzip data" in ei.value.msg


def test_pipe_is_capped(tmp_path, tbackend):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    text = _text(10000)

    def feed():
        try:
            with open(fifo, "wb") as f:
                f.write(text)
        except BrokenPipeError:
            pass
    th = threading.Thread(target=feed)
    th.start()
    try:
        with pytest.raises(TraceError, match="input is larger than the 64 KiB"):
            load_trace(fifo, backend=tbackend, max_bytes=64 << 10)
    finally:
        th.join(30)
    th = threading.Thread(target=feed)
    th.start()
    try:
        assert len(load_trace(fifo, backend=tbackend)) == 10000
    finally:
        th.join(30)


def test_lines_without_accesses_cost_no_column_memory(monkeypatch):
    # the C parser's output columns are sized by what accepted lines must
    # contain, not by the line count: a trace of blank lines (a cheap gzip
    # bomb below the cap) must not allocate columns per line
    if "c" not in trace_mod.available_backends():
        pytest.skip("C trace parser not built")
    sizes = []
    real = trace_cparse._zeros

    def spy(tc, n):
        sizes.append(n)
        return real(tc, n)
    monkeypatch.setattr(trace_cparse, "_zeros", spy)
    blank = b"\n" * 200_000 + b"  \r\n# a comment, with, commas\n" * 1000
    cases = [(b"access,gpa\nr,0x1000\n" + blank + b"w,0x2000\n", 2),
             (b"access,gpa,size\nr,0x1000,1\n" + blank, 1),
             (b"I  04000000,3\n" + blank + b" M 04001000,4\n", 3),
             (b"x-1 [000] 1.0: kvm_page_fault: address 1000 error_code 2\n" + blank, 1)]
    for data, n in cases:
        sizes.clear()
        t = parse_trace(data, backend="c")
        assert len(t) == n
        assert max(sizes) <= 3000, max(sizes)       # commas in the comments, not 200k lines
        assert t == parse_trace(data, backend="python")


def test_split_lines_matches_split():
    import random
    rnd = random.Random(5)
    for _ in range(500):
        d = bytes(rnd.choice(b"ab\n\r") for _ in range(rnd.randint(0, 60)))
        for block in (1, 2, 7, 1 << 20):
            assert list(trace_text._split_lines(d, block)) == d.split(b"\n")


def test_cli_max_trace_bytes(tmp_path):
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = c.compress(b"access,gpa\nr,0x1000\n") + c.compress(b"\n" * (8 * MiB)) + c.flush()
    p = tmp_path / "bomb.csv.gz"
    p.write_bytes(bomb)
    plain = tmp_path / "plain.csv"
    plain.write_bytes(_text(1000))
    assert_bad_input(hv("replay", p, *SMALL, "--max-trace-bytes", "1M"),
                     "bomb.csv.gz", "1 MiB", "--max-trace-bytes")
    assert_bad_input(hv("replay", plain, *SMALL, "--max-trace-bytes", "4k", "--json"),
                     "plain.csv", "4 KiB", "--max-trace-bytes")
    for bad in ("0", "-1", "lots", "1.5G"):
        assert_bad_input(hv("replay", plain, *SMALL, "--max-trace-bytes", bad),
                         "--max-trace-bytes")
    r = hv("replay", p, *SMALL, "--max-trace-bytes", "16MiB", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accesses"] == 1


def test_cli_default_cap_is_passed(trace_file, monkeypatch, capsys):
    seen = {}
    real = trace_mod.load_trace

    def spy(path, fmt=None, backend=None, max_bytes=MAX_TRACE_BYTES, **kw):
        seen["max_bytes"] = max_bytes
        return real(path, fmt, backend, max_bytes, **kw)
    monkeypatch.setattr(trace_mod, "load_trace", spy)
    rc, _, err = run_main(capsys, "replay", trace_file, *SMALL, "--json")
    assert rc == 0, err
    assert seen["max_bytes"] == 4 << 30
    rc, _, err = run_main(capsys, "replay", trace_file, *SMALL, "--json",
                          "--max-trace-bytes", "512M")
    assert rc == 0, err
    assert seen["max_bytes"] == 512 << 20


# --------------------------------------------------------------------------
# 3. hv bench does not take the shared options

SHARED = [("--psp", "process", "psp"), ("--backend", "python", "walks"),
          ("--integrity", "full", "integrity"), ("--psp-timeout", "3", "psp"),
          ("--host-mem", "1G", "memory"), ("--host-mem-file", "x.bin", "host memory"),
          ("--host-mem-file-overwrite", None, "host memory")]


@pytest.mark.parametrize("opt,val,why", SHARED, ids=[s[0] for s in SHARED])
def test_bench_refuses_shared_options(opt, val, why, capsys, tmp_path):
    argv = ["bench", "--tiny", "--only", "sha256", opt] + ([val] if val else [])
    rc, out, err = run_main(capsys, *argv)
    assert rc == 2 and out == ""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("hv: bench: "), err
    assert f"{opt} is not an option of hv bench" in lines[0] and why in lines[0], err
    # --opt=value spelling too
    if val:
        rc, _, err = run_main(capsys, "bench", "--tiny", f"{opt}={val}")
        assert rc == 2 and opt in err
    assert not (tmp_path / "x.bin").exists() and not os.path.exists(os.path.join(ROOT, "x.bin"))


def test_bench_help_does_not_list_them():
    r = hv("bench", "--help")
    assert r.returncode == 0
    for opt, _, _ in SHARED:
        assert opt not in r.stdout, opt
    assert "--json" in r.stdout and "--only" in r.stdout


def test_bench_refusal_is_one_line_in_a_subprocess():
    assert_bad_input(hv("bench", "--psp", "process"), "--psp", "in-process", "PSP process")


def test_bench_still_takes_its_own_options(capsys):
    rc, out, err = run_main(capsys, "bench", "--tiny", "--only", "sha256", "--json", "-v")
    assert rc == 0, err
    assert "sha256" in json.loads(out)


# --------------------------------------------------------------------------
# 4. hv boot --max-insns: cut short is exit 1 unless --insn-limit-ok

def _loop_image(path):
    """A raw Multiboot v1 image (a.out kludge) whose code is `jmp $`."""
    flags = 0x00010003
    hdr = struct.pack("<III5I", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                      0x100000, 0x100000, 0, 0, 0x100020)
    path.write_bytes((hdr.ljust(0x20, b"\0") + b"\xeb\xfe").ljust(0x1000, b"\xf4"))
    return path


BOOT = ["--mem", "2M", *SMALL]


def test_boot_insn_limit_exit_codes(tmp_path, capsys):
    img = _loop_image(tmp_path / "loop.bin")
    rc, out, err = run_main(capsys, "boot", img, *BOOT, "--max-insns", "1000", "--json")
    d = json.loads(out)
    assert (rc, d["exit_reason"], d["exit_code"], d["instructions"]) == (1, "insn_limit", 1, 1000)
    rc, out, err = run_main(capsys, "boot", img, *BOOT, "--max-insns", "1000", "--json",
                            "--insn-limit-ok")
    d = json.loads(out)
    assert (rc, d["exit_reason"], d["exit_code"]) == (0, "insn_limit", 0)
    # text mode: the report on stderr says the same
    rc, out, err = run_main(capsys, "boot", img, *BOOT, "--max-insns", "1000")
    assert rc == 1 and "insn_limit, exit code 1" in err


def test_boot_insn_limit_ok_needs_max_insns(tmp_path):
    img = _loop_image(tmp_path / "loop.bin")
    assert_bad_input(hv("boot", img, *BOOT, "--insn-limit-ok"), "--insn-limit-ok", "--max-insns")


def test_boot_clean_exit_unaffected_by_insn_limit_ok(tmp_path, capsys):
    # hlt before the budget: exit 0 with or without the flag
    flags = 0x00010003
    hdr = struct.pack("<III5I", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                      0x100000, 0x100000, 0, 0, 0x100020)
    img = tmp_path / "hlt.bin"
    img.write_bytes(hdr.ljust(0x1000, b"\xf4"))
    for extra in ([], ["--insn-limit-ok"]):
        rc, out, err = run_main(capsys, "boot", img, *BOOT, "--max-insns", "1000", "--json", *extra)
        d = json.loads(out)
        assert (rc, d["exit_reason"], d["exit_code"]) == (0, "hlt", 0), err


def test_package_load_trace_passes_the_cap(tmp_path):
    import hv
    from hv.trace import TraceError
    p = tmp_path / "t.csv"
    p.write_text("access,gpa,size\n" + "r,0x1000,8\n" * 200)
    assert len(hv.load_trace(str(p)).gpa) == 200
    with pytest.raises(TraceError, match="t.csv"):
        hv.load_trace(str(p), max_bytes=100)
