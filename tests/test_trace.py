"""Tests of hv.trace: CSV / lackey / ftrace loading (C and Python parsers) and CSV writing."""
import array
import gzip
import os
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.errors import BadInput, TraceError
from hv.trace import (ACC_R, ACC_W, ACC_X, GPA_LIMIT, Access, CsvTraceWriter, Trace,
                      available_backends, detect_format, load_trace, parse_trace,
                      write_csv)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
TRACES = os.path.join(os.path.dirname(HERE), "traces")

BACKENDS = ["c", "python"]
HAVE_C = "c" in available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "c" and not HAVE_C:
        pytest.skip("hv._trace_c not built (python csrc/build_trace.py)")
    return request.param


def both_backends():
    return [b for b in BACKENDS if b in available_backends()]


def cols(t):
    return (list(t.access), list(t.gpa), list(t.size),
            None if t.rip is None else list(t.rip),
            None if t.vcpu is None else list(t.vcpu), t.insn)


def parse(text, fmt=None, backend=None, path="t"):
    return parse_trace(text.encode() if isinstance(text, str) else text, fmt, path, backend)


def err(text, fmt=None, backend=None):
    with pytest.raises(TraceError) as ei:
        parse(text, fmt, backend)
    return ei.value


# --------------------------------------------------------------------------- errors


def test_trace_error_type():
    e = TraceError("a.csv", 7, "bad thing")
    assert isinstance(e, BadInput) and isinstance(e, Exception)
    assert (e.path, e.line, e.msg) == ("a.csv", 7, "bad thing")
    assert str(e) == "a.csv:7: bad thing"
    assert str(TraceError("a.csv", None, "gone")) == "a.csv: gone"
    assert "\n" not in str(TraceError("p", 1, "two\nlines"))
    assert "\n" not in str(BadInput("two\nlines"))


# --------------------------------------------------------------------------- CSV


def test_csv_sample(backend):
    t = load_trace(os.path.join(DATA, "sample.csv"), backend=backend)
    assert t.format == "csv" and t.path.endswith("sample.csv") and len(t) == 4
    assert list(t.access) == [ACC_R, ACC_W, ACC_X, ACC_R]
    assert list(t.gpa) == [0x1000, 4096, 0x2FFE, 0x3000]
    assert list(t.size) == [4, 1, 4, 4096]
    assert list(t.rip) == [0x400000, 0, 0x400004, 0xFFFFFFFF81000000]
    assert list(t.vcpu) == [0, 0, 3, 65535]
    assert t.insn == [b"\x8b\x07", b"", b"\x0f\x01\xd9", b""]
    assert t.access.typecode == "B" and t.gpa.typecode == "Q" and t.size.typecode == "I"
    assert t.rip.typecode == "Q" and t.vcpu.typecode == "H"
    # 0x2ffe+4 straddles pages 2 and 3; 0x3000+4096 is page 3 only
    assert list(t.pages()) == [1, 2, 3]
    assert t[2] == Access(ACC_X, 0x2FFE, 4, 0x400004, 3, b"\x0f\x01\xd9")


def test_csv_minimal_and_crlf(backend):
    t = load_trace(os.path.join(DATA, "crlf.csv"), backend=backend)
    assert cols(t) == ([0, 1], [0x10, 0x20], [1, 1], None, None, None)
    assert t.columns() == ("access", "gpa", "size")


def test_csv_explicit_format(backend):
    t = parse("gpa,access\n10,x\n", "csv", backend)
    assert cols(t)[:3] == ([2], [10], [1])


def test_bundled_csv(backend):
    t = load_trace(os.path.join(TRACES, "sample.csv"), backend=backend)
    assert t.format == "csv" and len(t) == 12
    assert t.columns() == ("access", "gpa", "size", "rip", "vcpu", "insn")
    assert 0x200 in t.pages() and 0x201 in t.pages()  # the straddling write


# --------------------------------------------------------------------------- lackey


def test_lackey_small(backend):
    t = load_trace(os.path.join(DATA, "small.lackey"), backend=backend)
    assert t.format == "lackey"
    # M becomes a read then a write of the same bytes
    assert list(t.access) == [ACC_X, ACC_W, ACC_X, ACC_R, ACC_R, ACC_W, ACC_X]
    assert list(t.gpa) == [0x0401AB70, 0x1FFF000778, 0x0401B771, 0x04030E70,
                           0x0402AE80, 0x0402AE80, 0xFFE]
    assert list(t.size) == [3, 8, 7, 8, 4, 4, 4]
    assert list(t.rip) == [0x0401AB70, 0x0401AB70] + [0x0401B771] * 4 + [0xFFE]
    assert t.vcpu is None and t.insn is None
    pages = list(t.pages())
    assert pages == sorted(set(pages))
    assert 0 in pages and 1 in pages  # 0xffe..0x1001 straddles


def test_bundled_lackey_gz(backend):
    t = load_trace(os.path.join(TRACES, "true.lackey.gz"), backend=backend)
    assert t.format == "lackey" and len(t) > 100000
    assert set(t.access) == {ACC_R, ACC_W, ACC_X}
    assert len(t.pages()) > 50


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_real_valgrind_trace(tmp_path):
    log = tmp_path / "true.lackey"
    subprocess.run(["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={log}",
                    "/bin/true"], check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = [load_trace(log, backend=b) for b in both_backends()]
    t = results[0]
    assert t.format == "lackey" and len(t) > 1000
    assert set(t.access) == {ACC_R, ACC_W, ACC_X}
    assert all(cols(r) == cols(t) for r in results)
    n_lines = sum(1 for ln in log.read_bytes().split(b"\n") if ln[:1] in (b"I", b" "))
    n_m = sum(1 for ln in log.read_bytes().split(b"\n") if ln[:2] == b" M")
    assert len(t) == n_lines + n_m


# --------------------------------------------------------------------------- ftrace


def test_ftrace_forms(backend):
    t = load_trace(os.path.join(DATA, "forms.ftrace"), backend=backend)
    assert t.format == "ftrace"
    assert list(t.gpa) == [0xFEE00000, 0x7FFC1000, 0x1000, 0x2000, 0xFF000, 0x3FFE]
    assert list(t.access) == [ACC_W, ACC_R, ACC_X, ACC_R, ACC_X, ACC_W]
    assert list(t.size) == [1] * 6
    assert list(t.vcpu) == [0, 0, 0, 1, 0, 1]
    assert list(t.rip) == [0, 0, 0, 0xFFFFFFFF81234567, 0xFFF0, 0x401000]
    assert t.insn is None


def test_ftrace_old_forms_only(backend):
    text = ("# tracer: nop\n"
            "  qemu-1  [000] .... 1.000000: kvm_page_fault: address 1000 error_code 2\n"
            "kvm_page_fault: address 2000 error_code 0\n"
            "qemu-1 [000] 1.5: kvm:kvm_page_fault:   address 0x3000 error_code 0x10\n")
    t = parse(text, None, backend)
    assert cols(t) == ([1, 0, 2], [0x1000, 0x2000, 0x3000], [1, 1, 1], None, None, None)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("text,fmt", [
    ("access,gpa\nr,1\n", "csv"),
    ("# c\n\ngpa , ACCESS\n1,r\n", "csv"),
    ("==1== Lackey\nI  0401ab70,3\n", "lackey"),
    ("I  0401ab70,3\n S 1000,8\n", "lackey"),
    ("# tracer: nop\n", "ftrace"),
    ("  <idle>-0  [001] d... 123.456: sched_switch: x\n", "ftrace"),
    ("kvm_page_fault: address 1 error_code 2\n", "ftrace"),
])
def test_detect(text, fmt):
    assert detect_format(text.encode())[0] == fmt


# --------------------------------------------------------------------------- bad input

BAD = [
    # (text, fmt, line, words in message)
    ("", None, None, "empty"),
    ("# only\n\n# comments\n", None, None, "empty"),
    ("access,gpa\n", None, None, "no accesses"),
    ("access,gpa\n# nothing\n\n", "csv", None, "no accesses"),
    ("==1== Lackey\n==1== done\n", None, None, "no accesses"),
    ("# tracer: nop\nqemu-1 [000] 1.0: kvm_exit: x\n", None, None, "no accesses"),
    ("hello world\n", None, 1, "unknown trace format"),
    ("\n\nfoo;bar\nr,1\n", None, 3, "unknown trace format"),
    ("r,0x1000\n", "csv", 1, "header"),
    ("gpa,size\n1,1\n", None, 1, "missing required column 'access'"),
    ("access,size\nr,1\n", None, 1, "missing required column 'gpa'"),
    ("access,gpa,colour\nr,1,red\n", None, 1, "unknown column 'colour'"),
    ("access,gpa,gpa\nr,1,1\n", None, 1, "duplicate column 'gpa'"),
    ("access,,gpa\nr,,1\n", None, 1, "empty column name"),
    ("access,gpa\nr,1\nr,1,2\n", None, 3, "expected 2 comma-separated fields"),
    ("access,gpa\nr\n", None, 2, "found 1"),
    ("access,gpa\nq,1\n", None, 2, "unknown access kind 'q'"),
    ("access,gpa\nread,1\n", None, 2, "unknown access kind"),
    ("access,gpa\n,1\n", None, 2, "empty value in required column 'access'"),
    ("access,gpa\nr, \n", None, 2, "empty value in required column 'gpa'"),
    ("access,gpa\nr,0x\n", None, 2, "bad number '0x' in column 'gpa'"),
    ("access,gpa\nr,12z\n", None, 2, "bad number"),
    ("access,gpa\nr,-1\n", None, 2, "bad number"),
    ("access,gpa\nr,0x1_000\n", None, 2, "bad number"),
    ("access,gpa,size\nr,1,abc\n", None, 2, "column 'size'"),
    ("access,gpa\nr,0x1000000000000\n", None, 2, "48-bit"),
    ("access,gpa\nr,0x10000000000000\n", None, 2, "48-bit"),  # 2**52
    ("access,gpa\nr,0xffffffffffffffff\n", None, 2, "48-bit"),
    ("access,gpa\nr,0x10000000000000000\n", None, 2, "64 bits"),
    ("access,gpa\nr,99999999999999999999999\n", None, 2, "64 bits"),
    ("access,gpa,size\nr,0xffffffffffff,2\n", None, 2, "runs past"),
    ("access,gpa,size\nr,1,0\n", None, 2, "size 0"),
    ("access,gpa,size\nr,1,4097\n", None, 2, "size 4097 too large"),
    ("access,gpa,vcpu\nr,1,65536\n", None, 2, "vcpu 65536"),
    ("access,gpa,insn\nr,1,0f0\n", None, 2, "bad instruction bytes"),
    ("access,gpa,insn\nr,1,zz\n", None, 2, "bad instruction bytes"),
    ("access,gpa,insn\nr,1," + "90" * 16 + "\n", None, 2, "16 bytes is too long"),
    ("access,gpa\nr,1\n\x00\x01\x02\n", None, 3, "binary"),
    (b"access,gpa\nr,1\nr,\xff\xfe\n", None, 3, "binary"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", None, 1, "binary"),
    ("I  0401ab70,3\n L 1000\n", None, 2, "not a valgrind lackey record"),
    ("I  0401ab70,3\nhello\n", None, 2, "not a valgrind lackey record"),
    ("I  0401ab70,3\n X 1000,4\n", "lackey", 2, "lackey"),
    ("I  0x0401ab70,3\n", "lackey", 1, "lackey"),
    ("I  0401ab70,3\n L 1000000000000,4\n", None, 2, "48-bit"),
    ("I  0401ab70,3\n L 10000000000000,4\n", None, 2, "48-bit"),
    ("I  0401ab70,3\n L 11112222333344445,4\n", None, 2, "64 bits"),
    ("I  0401ab70,3\n L 1000,0\n", None, 2, "size 0"),
    ("I  0401ab70,3\n L 1000,5000\n", None, 2, "size 5000"),
    ("I  0401ab70,3\n L ffffffffffff,2\n", None, 2, "runs past"),
    ("# tracer: nop\nq-1 [0] 1.0: kvm_page_fault: address zz error_code 2\n", None, 2,
     "malformed kvm_page_fault"),
    ("# tracer: nop\nq-1 [0] 1.0: kvm_page_fault: vcpu 0 address 0x1 error_code 2\n", None,
     2, "malformed"),
    ("# tracer: nop\nq-1 [0] 1.0: kvm_page_fault: address 1 error_code 2 extra\n", None, 2,
     "malformed"),
    ("# tracer: nop\nq-1 [0] 1.0: kvm_page_fault: address 10000000000000 error_code 2\n",
     None, 2, "48-bit"),
    ("# tracer: nop\nq-1 [0] 1.0: kvm_page_fault: vcpu 70000 rip 0x1 address 0x1 "
     "error_code 2\n", None, 2, "vcpu 70000"),
]


@pytest.mark.parametrize("text,fmt,line,words", BAD)
def test_bad_input(text, fmt, line, words, backend):
    e = err(text, fmt, backend)
    assert e.path == "t" and e.line == line
    assert words in str(e), str(e)
    assert str(e).startswith("t:" if line is None else f"t:{line}: ")
    assert "\n" not in str(e)


def test_bad_input_same_message_both_backends():
    if not HAVE_C:
        pytest.skip("C backend not built")
    for text, fmt, _, _ in BAD:
        assert str(err(text, fmt, "c")) == str(err(text, fmt, "python"))


def test_address_limits(backend):
    ok = parse(f"access,gpa,size\nr,{GPA_LIMIT - 1},1\nw,{GPA_LIMIT - 8:#x},8\n", None, backend)
    assert list(ok.gpa) == [GPA_LIMIT - 1, GPA_LIMIT - 8]
    for a in (GPA_LIMIT, 1 << 52, (1 << 52) + 5, (1 << 64) - 1):
        e = err(f"access,gpa\nr,{a:#x}\n", None, backend)
        assert "0x1000000000000" in e.msg and e.line == 2


def test_file_errors(tmp_path, backend):
    with pytest.raises(TraceError) as ei:
        load_trace(tmp_path / "nope.csv", backend=backend)
    assert "nope.csv" in str(ei.value) and "no such file" in str(ei.value)
    with pytest.raises(TraceError, match="directory"):
        load_trace(tmp_path, backend=backend)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(TraceError, match="empty"):
        load_trace(empty, backend=backend)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TraceError, match="binary"):
        load_trace(junk, backend=backend)
    badgz = tmp_path / "bad.gz"
    badgz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(TraceError, match="gzip"):
        load_trace(badgz, backend=backend)
    with pytest.raises(BadInput, match="unknown trace format 'json'"):
        load_trace(os.path.join(DATA, "sample.csv"), fmt="json", backend=backend)


def test_gzip_input(tmp_path, backend):
    p = tmp_path / "t.csv.gz"
    p.write_bytes(gzip.compress(b"access,gpa\nw,0x5000\n"))
    assert cols(load_trace(p, backend=backend))[:2] == ([1], [0x5000])


def test_wrong_explicit_format(backend):
    e = err("I  0401ab70,3\n", "csv", backend)
    assert e.line == 1
    e = err("access,gpa\nr,1\n", "lackey", backend)
    assert e.line == 1 and "lackey" in e.msg


# --------------------------------------------------------------------------- writing


def test_write_csv_roundtrip(tmp_path, backend):
    rows = [(0, 0x1000), ("w", 0x2FFF, 2, 0x401000, 1, b"\x89\x07"),
            Access(ACC_X, 0x5000, 15, 0xFFFFFFFF81000000, 65535, bytes(range(15))),
            {"access": "r", "gpa": 7, "insn": b""}]
    p = tmp_path / "out.csv"
    assert write_csv(p, rows, comment="recorded by a test") == 4
    text = p.read_text()
    assert text.startswith("# recorded by a test\naccess,gpa,size,rip,vcpu,insn\n")
    assert "w,0x2fff,2,0x401000,1,8907" in text
    t = load_trace(p, backend=backend)
    assert cols(t) == ([0, 1, 2, 0], [0x1000, 0x2FFF, 0x5000, 7], [1, 2, 15, 1],
                       [0, 0x401000, 0xFFFFFFFF81000000, 0], [0, 1, 65535, 0],
                       [b"", b"\x89\x07", bytes(range(15)), b""])
    # a Trace writes back to an equal Trace, keeping only its own columns
    p2 = tmp_path / "again.csv.gz"
    write_csv(p2, t)
    assert load_trace(p2, backend=backend) == t
    small = load_trace(os.path.join(DATA, "small.lackey"), backend=backend)
    p3 = tmp_path / "small.csv"
    write_csv(p3, small)
    assert p3.read_text().splitlines()[0] == "access,gpa,size,rip"
    assert load_trace(p3, backend=backend) == small


def test_writer_streaming_and_refusals(tmp_path):
    p = tmp_path / "rec.csv"
    with CsvTraceWriter(p, columns=("gpa", "access", "rip")) as w:
        w.write("x", 0x100000, rip=0x100000)
        w.write(ACC_W, 0x7FFF8, 8)
        for bad in [("q", 1), (3, 1), ("r", GPA_LIMIT), ("r", -1), ("r", 1, 0), ("r", 1, 4097),
                    ("r", GPA_LIMIT - 1, 2)]:
            with pytest.raises(ValueError):
                w.write(*bad)
        assert w.count == 2
    assert p.read_text() == "access,gpa,rip\nx,0x100000,0x100000\nw,0x7fff8,\n"
    with pytest.raises(ValueError):
        CsvTraceWriter(tmp_path / "x.csv", columns=("access", "size"))
    with CsvTraceWriter(tmp_path / "y.csv") as w:
        with pytest.raises(ValueError):
            w.write("r", 1, insn=bytes(16))
        with pytest.raises(ValueError):
            w.write("r", 1, vcpu=1 << 16)


def test_trace_object():
    t = Trace([0, 1, 2], [0xFFF, 0x1000, 0x5000], [2, 1, 1])
    assert len(t) == 3 and t.rip is None
    assert list(t.pages()) == [0, 1, 5]
    assert list(t) == [Access(0, 0xFFF, 2), Access(1, 0x1000, 1), Access(2, 0x5000, 1)]
    assert len(t[1:]) == 2 and t[1:].gpa == array.array("Q", [0x1000, 0x5000])
    assert list(Trace([0], [0x1000]).size) == [1]
    with pytest.raises(ValueError):
        Trace([0, 1], [1])


# --------------------------------------------------------------------------- property tests

addr = st.integers(0, GPA_LIMIT - 4096)
sizes = st.integers(1, 4096)


@st.composite
def csv_rows(draw):
    n = draw(st.integers(1, 30))
    return [Access(draw(st.integers(0, 2)), draw(addr), draw(sizes),
                   draw(st.integers(0, (1 << 64) - 1)), draw(st.integers(0, 65535)),
                   draw(st.binary(max_size=15))) for _ in range(n)]


def _num(draw, v, hexonly=False):
    if hexonly or draw(st.booleans()):
        return draw(st.sampled_from(["0x", "0X"])) + format(v, draw(st.sampled_from(["x", "X"])))
    return str(v)


@st.composite
def csv_text(draw):
    rows = draw(csv_rows())
    order = draw(st.permutations(["access", "gpa", "size", "rip", "vcpu", "insn"]))
    keep = [c for c in order if c in ("access", "gpa") or draw(st.booleans())]
    ws = st.sampled_from(["", " ", "\t", "  "])
    lines = []
    if draw(st.booleans()):
        lines.append("# a comment")
    lines.append(",".join(draw(ws) + c.upper() if draw(st.booleans()) else c for c in keep))
    exp = []
    for r in rows:
        fields = []
        e = dict(access=r.access, gpa=r.gpa, size=1, rip=0, vcpu=0, insn=b"")
        for c in keep:
            if c == "access":
                s = "rwx"[r.access]
                fields.append(s.upper() if draw(st.booleans()) else s)
            elif c == "insn":
                fields.append(r.insn.hex())
                e["insn"] = r.insn
            elif c in ("size", "rip", "vcpu") and draw(st.integers(0, 4)) == 0:
                fields.append("")  # default
            else:
                v = getattr(r, c)
                fields.append(_num(draw, v))
                e[c] = v
        exp.append(e)
        lines.append(",".join(draw(ws) + f + draw(ws) for f in fields))
        if draw(st.integers(0, 5)) == 0:
            lines.append(draw(st.sampled_from(["", "   ", "# x,y", "  #"])))
    text = "\n".join(lines) + draw(st.sampled_from(["", "\n"]))
    return text, exp, keep


@st.composite
def lackey_text(draw):
    n = draw(st.integers(1, 40))
    lines, exp, cur = [], [], 0
    if draw(st.booleans()):
        lines.append("==123== Lackey, an example Valgrind tool")
    for _ in range(n):
        k = draw(st.sampled_from("ILSM"))
        a, s = draw(addr), draw(st.integers(1, 64))
        hexa = format(a, "08" + draw(st.sampled_from(["x", "X"])))
        lines.append(("I  " if k == "I" else f" {k} ") + f"{hexa},{s}")
        if k == "I":
            cur = a
            exp.append((2, a, s, cur))
        elif k == "M":
            exp += [(0, a, s, cur), (1, a, s, cur)]
        else:
            exp.append(({"L": 0, "S": 1}[k], a, s, cur))
        if draw(st.integers(0, 6)) == 0:
            lines.append(draw(st.sampled_from(["==123== ", "--123-- x", "", "# note"])))
    return "\n".join(lines) + "\n", exp


@st.composite
def ftrace_text(draw):
    n = draw(st.integers(1, 30))
    lines, exp = ["# tracer: nop", "#"], []
    for _ in range(n):
        a = draw(st.integers(0, GPA_LIMIT - 1))
        ec = draw(st.integers(0, (1 << 64) - 1))
        v = draw(st.integers(0, 65535))
        rip = draw(st.integers(0, (1 << 64) - 1))
        form = draw(st.integers(0, 3))
        if form == 0:
            body = f"address {a:x} error_code {ec & 0xffffffff:x}"
            ec &= 0xFFFFFFFF
        elif form == 1:
            body = f"address {a:x} error_code {ec:x}"
        elif form == 2:
            body = f"vcpu {v} rip 0x{rip:x} address 0x{a:x} error_code {ec & 0xffffffff:x}"
            ec &= 0xFFFFFFFF
        else:
            body = f"vcpu {v} rip 0x{rip:x} address 0x{a:016x} error_code 0x{ec:x}"
        if form < 2:
            v = rip = 0
        flags = draw(st.sampled_from(["", " ....", " d..1", " d..2."]))
        lines.append(f" qemu-system-x86-{draw(st.integers(1, 99999))} [{draw(st.integers(0, 63)):03d}]"
                     f"{flags} {draw(st.integers(0, 99999))}.{draw(st.integers(0, 999999)):06d}:"
                     f" kvm_page_fault: {body}")
        acc = 2 if ec & 16 else 1 if ec & 2 else 0
        exp.append((acc, a, v, rip, form >= 2))
        if draw(st.integers(0, 5)) == 0:
            lines.append(" qemu-1 [000] .... 1.0: kvm_exit: reason EPT_VIOLATION rip 0x1")
    return "\n".join(lines) + "\n", exp


PROP = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROP
@given(csv_rows())
def test_prop_write_then_read(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("w") / "t.csv"
    write_csv(p, rows)
    for b in both_backends():
        t = load_trace(p, backend=b)
        assert list(t) == [r._replace(insn=bytes(r.insn)) for r in rows]


@PROP
@given(csv_text())
def test_prop_csv(case):
    text, exp, keep = case
    results = [parse(text, None, b) for b in both_backends()]
    t = results[0]
    assert all(cols(r) == cols(t) for r in results)
    assert t.format == "csv"
    for c in ("access", "gpa", "size", "rip", "vcpu", "insn"):
        col = getattr(t, c)
        if c in keep or c == "size":
            assert list(col) == [e[c] for e in exp], c
        else:
            assert col is None


@PROP
@given(lackey_text())
def test_prop_lackey(case):
    text, exp = case
    for b in both_backends():
        t = parse(text, None, b)
        assert t.format == "lackey"
        assert list(zip(t.access, t.gpa, t.size, t.rip)) == exp


@PROP
@given(ftrace_text())
def test_prop_ftrace(case):
    text, exp = case
    for b in both_backends():
        t = parse(text, None, b)
        assert t.format == "ftrace"
        assert list(zip(t.access, t.gpa)) == [(e[0], e[1]) for e in exp]
        if any(e[4] for e in exp):
            assert list(zip(t.vcpu, t.rip)) == [(e[2], e[3]) for e in exp]
        else:
            assert t.rip is None and t.vcpu is None


GARBAGE = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="rwxRWX0123456789abcdefxX, \t#-=*ILSM:", max_size=40),
    st.sampled_from(["r,0x", "r,,", "q,1", "r,1,2,3", "I  12", " L 1,", " M 1,1,1", "I 0x10,1",
                     " S 10000000000000,1", " L 1,0", " L 1,99999", "kvm_page_fault: address",
                     "kvm_page_fault: address 1 error_code", "x kvm_page_fault: address 1 error_code 0x",
                     "a:kvm_page_fault: vcpu 1 rip 1 address 1 error_code 1 2",
                     "kvm_page_fault: vcpu 99999 rip 0x1 address 0x1 error_code 0"]),
)


NUMISH = st.one_of(
    st.sampled_from(["", "0", "0x", "0X1f", "12", "-1", "+1", "1_0", "0x1000000000000",
                     "ffffffffffff", "4096", "4097", "65535", "65536", "0f0", "zz", "90" * 15,
                     "90" * 16, "18446744073709551615", "18446744073709551616",
                     "0x10000000000000000", "0" * 30 + "1", " 7 ", "r", "W", "x", "q", "\t"]),
    st.text(alphabet="0123456789abcdefxXrw \t", max_size=20))


HEX = st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=18).map(
    lambda h: h if len(h) % 3 else "0x" + h)


@st.composite
def near_miss(draw, fmt, ncols):
    """Lines that look almost right for the format."""
    if fmt == "csv":
        n = ncols if draw(st.integers(0, 5)) else draw(st.integers(1, ncols + 1))
        return ",".join(draw(NUMISH) for _ in range(n))
    if fmt == "lackey":
        return (draw(st.sampled_from(["", " ", "  ", "\t", "=", "-"])) +
                draw(st.sampled_from(list("ILSMXi") + [""])) +
                draw(st.sampled_from([" ", "  ", "", "\t", ","])) + draw(st.one_of(NUMISH, HEX)) +
                draw(st.sampled_from([",", "", ";"])) +
                draw(st.one_of(NUMISH, st.integers(0, 5000).map(str))))
    parts = [draw(st.sampled_from(["", " ", "  "]))]
    if draw(st.booleans()):
        parts += ["vcpu ", draw(st.one_of(NUMISH, st.integers(0, 70000).map(str))), " rip ",
                  draw(st.one_of(NUMISH, HEX)), " "]
    parts += [draw(st.sampled_from(["address "] * 6 + ["address", "addr "])), draw(st.one_of(NUMISH, HEX)),
              draw(st.sampled_from([" error_code "] * 6 + [" error_code", "error_code "])),
              draw(st.one_of(NUMISH, HEX))]
    pre = draw(st.sampled_from(["", " q-1 [000] .... 1.0: ", "x:", "x", "\t"]))
    return pre + "kvm_page_fault:" + "".join(parts)


@PROP
@given(st.sampled_from(["csv", "lackey", "ftrace"]), st.data())
def test_prop_garbage_line(fmt, data):
    """A random line inserted into a valid trace: both parsers agree exactly."""
    if fmt == "csv":
        text = data.draw(csv_text())[0]
    elif fmt == "lackey":
        text = data.draw(lackey_text())[0]
    else:
        text = data.draw(ftrace_text())[0]
    lines = text.split("\n")
    first = 1 if lines[0].startswith("#") and fmt == "csv" else 0  # the CSV header
    pos = data.draw(st.integers(first + 1, len(lines)))  # after the header / first line
    ncols = len(lines[first].split(","))
    g = data.draw(st.one_of(GARBAGE, near_miss(fmt, ncols)))
    lines.insert(pos, g.replace("\n", " ").replace("\r", " "))
    blob = "\n".join(lines).encode("utf-8", "surrogatepass")
    outcomes = []
    for b in both_backends():
        try:
            t = parse_trace(blob, fmt, "g", b)
            outcomes.append(("ok", cols(t)))
        except TraceError as e:
            outcomes.append(("err", str(e), e.line))
    assert all(o == outcomes[0] for o in outcomes), outcomes
    if outcomes[0][0] == "err":
        # the first error is the inserted line (or, for surrogates, binary data there)
        assert outcomes[0][2] == pos + 1


@pytest.mark.parametrize("fmt,line", [
    ("csv", "r,zz"), ("csv", "r,1,2"), ("lackey", "hello"), ("lackey", " L 1"),
    ("ftrace", "x-1 [000] 1.0: kvm_page_fault: address 1"),
])
def test_garbage_line_is_error(fmt, line, backend):
    text = {"csv": "access,gpa\nr,1\nw,2\n", "lackey": "I  1000,2\n L 2000,4\n",
            "ftrace": "kvm_page_fault: address 1 error_code 2\n" * 2}[fmt]
    lines = text.split("\n")
    lines.insert(2, line)
    e = err("\n".join(lines), fmt, backend)
    assert e.line == 3


@pytest.mark.parametrize("text,n", [
    ("I  1,1", 1), (" M 1,1", 2), (" M 1,1\n M 2,1", 4), ("\n\n M 1,1\n", 2),
    ("access,gpa\nr,1", 1), ("kvm_page_fault: address 1 error_code 2", 1),
])
def test_no_trailing_newline_and_capacity(text, n, backend):
    assert len(parse(text, None, backend)) == n


def test_detect_ftrace_after_other_lines(backend):
    text = ("cpus=2\nCPU:1 [LOST 3 EVENTS]\n"
            "  qemu-1 [000] 1.0: kvm_page_fault: address 5000 error_code 2\n")
    t = parse(text, None, backend)
    assert t.format == "ftrace" and list(t.gpa) == [0x5000]
    assert detect_format(b"cpus=2\nfoo\n") == (None, 1)


def test_bom_is_ignored(backend):
    t = parse(b"\xef\xbb\xbfaccess,gpa\nr,1\n", None, backend)
    assert list(t.gpa) == [1]


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=6).map(lambda b: b.replace(b"\n", b"x")),
                      min_size=1, max_size=40),
       trailing=st.booleans(), block=st.sampled_from([1, 2, 3, 5, 16, 1 << 20]))
def test_line_of_names_the_right_line_whatever_the_block(lines, trailing, block):
    """The error path's line lookup skips whole blocks by counting newlines;
    it must land on the same line as walking them one by one."""
    from hv.trace.text import _line_of
    data = b"\n".join(lines) + (b"\n" if trailing else b"")
    for no, want in enumerate(lines, 1):
        assert _line_of(data, no, block) == want
