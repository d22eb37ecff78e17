"""The perf trace format (perf script / tracefs text of page_fault_user and
kvm_page_fault events) and --skip-bad-lines, over both parser backends.

Expected values come from the event lines themselves, read here with a
regular expression of the kernel's print format, not from the parsers."""
import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.errors import TraceError
from hv.trace import GPA_LIMIT, available_backends, detect_format, load_trace, parse_trace
from test_trace import GARBAGE, csv_text, ftrace_text, lackey_text, near_miss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
TRUE_PERF = os.path.join(ROOT, "traces", "true.perf")
BACKENDS = [b for b in ("c", "python") if b in available_backends()]
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENV.pop("HV_DEBUG", None)

_PFU = re.compile(r"page_fault_user: address=0x([0-9a-f]+) ip=0x([0-9a-f]+) error_code=0x([0-9a-f]+)$")
_KVM = re.compile(r"kvm_page_fault: vcpu (\d+) rip 0x([0-9a-f]+) address 0x([0-9a-f]+) "
                  r"error_code 0x([0-9a-f]+)$")


def kind(ec):
    """x86 page-fault error code -> access: I/D (bit 4) fetch, W (bit 1) write."""
    return 2 if ec & 0x10 else 1 if ec & 0x2 else 0


def expected(path):
    """[(access, address, rip, vcpu)] of the events in a file, by regex."""
    out = []
    for line in open(path):
        m = _PFU.search(line.rstrip("\n"))
        if m:
            a, ip, ec = (int(x, 16) for x in m.groups())
            out.append((kind(ec), a, ip, None))
            continue
        m = _KVM.search(line.rstrip("\n"))
        if m:
            v, rip, a, ec = int(m[1]), int(m[2], 16), int(m[3], 16), int(m[4], 16)
            out.append((kind(ec), a, rip, v))
    return out


def rows(t):
    return [(a, g, None if t.rip is None else t.rip[i], None if t.vcpu is None else t.vcpu[i])
            for i, (a, g) in enumerate(zip(t.access, t.gpa))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_perf_script_sample(backend):
    want = expected(TRUE_PERF)
    assert len(want) == 47
    t = load_trace(TRUE_PERF, backend=backend)
    assert t.format == "perf" and t.vcpu is None and list(t.size) == [1] * 47
    assert rows(t) == want
    # the fetches (error code 0x14) are at their own ip
    assert all(g == r for a, g, r, _ in want if a == 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_tracefs_sample(backend):
    path = os.path.join(DATA, "true_pfu.ftrace")       # "# tracer: nop" header first
    t = load_trace(path, backend=backend)
    assert t.format == "perf" and rows(t) == expected(path) and len(t) == 67


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvm_page_fault_in_perf_output(backend):
    path = os.path.join(DATA, "kvm_page_fault.perf")
    want = expected(path)
    for fmt in (None, "ftrace", "perf"):
        t = load_trace(path, fmt, backend=backend)
        assert t.format == (fmt or "ftrace") and rows(t) == want
    # both events in one file: perf reads both, ftrace only the guest's
    mixed = open(path).read() + open(TRUE_PERF).read()
    t = parse_trace(mixed, backend=backend)
    assert t.format == "perf" and len(t) == 3 + 47
    assert [r[:3] for r in rows(t)] == [w[:3] for w in want + expected(TRUE_PERF)]
    assert list(t.vcpu) == [0, 1, 0] + [0] * 47
    assert len(parse_trace(mixed, "ftrace", backend=backend)) == 3


def test_detection():
    pfu = b" a 1 [000] 1.0: exceptions:page_fault_user: address=0x1000 ip=0x2000 error_code=0x4\n"
    assert detect_format(pfu) == ("perf", None)
    # other events (and tracefs' header) before the first fault event
    other = b" a-1 [000] d.... 1.0: sched_switch: prev_comm=a\n"
    assert detect_format(b"# tracer: nop\n" + other + pfu) == ("perf", None)
    assert detect_format(b"cpus=2\n" + pfu) == ("perf", None)
    assert detect_format(other) == ("ftrace", None)
    # not an event: a comm that merely contains the name
    assert detect_format(b"xpage_fault_user: address=0x1 ip=0x1 error_code=0x1\n") == (None, 1)


BAD_PFU = {
    "no ip": "address=0x1000 error_code=0x4",
    "no space": "address=0x1000ip=0x2 error_code=0x4",
    "symbol": "address=do_user_addr_fault+0x10/0x40 ip=0x1 error_code=0x4",
    "trailing": "address=0x1000 ip=0x2 error_code=0x4 extra",
    "empty hex": "address=0x ip=0x2 error_code=0x4",
}


@pytest.mark.parametrize("body", sorted(BAD_PFU))
def test_malformed_events_name_the_line(body):
    text = (" a 1 [000] 1.0: exceptions:page_fault_user: address=0x1 ip=0x1 error_code=0x6\n"
            f" a 1 [000] 1.1: exceptions:page_fault_user: {BAD_PFU[body]}\n")
    errs = set()
    for b in BACKENDS:
        with pytest.raises(TraceError) as ei:
            parse_trace(text, backend=b)
        assert ei.value.line == 2 and "malformed page_fault_user event" in str(ei.value)
        errs.add(str(ei.value))
    assert len(errs) == 1


def test_out_of_range_values():
    base = " a 1 [000] 1.0: exceptions:page_fault_user: "
    cases = {f"address=0x{GPA_LIMIT:x} ip=0x1 error_code=0x4": "outside the 48-bit",
             "address=0x1 ip=0x10000000000000000 error_code=0x4": "field 'rip'",
             "address=0x1 ip=0x1 error_code=0x10000000000000000": "field 'error_code'"}
    for body, what in cases.items():
        msgs = set()
        for b in BACKENDS:
            with pytest.raises(TraceError, match=what) as ei:
                parse_trace(base + body + "\n", backend=b)
            msgs.add(str(ei.value))
        assert len(msgs) == 1


# --------------------------------------------------------------------------
# hypothesis: generated perf text, both backends, against the definition

@st.composite
def perf_text(draw):
    lines, exp = [], []
    for _ in range(draw(st.integers(1, 25))):
        a = draw(st.integers(0, GPA_LIMIT - 1))
        ec = draw(st.integers(0, (1 << 64) - 1))
        rip = draw(st.integers(0, (1 << 64) - 1))
        pre = draw(st.sampled_from([" true  9727 [001]   468.939847: exceptions:",
                                    "  true-10432  [000] d....   529.172502: ",
                                    "page_fault_user:"[:0], "\t"]))
        if draw(st.integers(0, 3)):
            ox = draw(st.sampled_from(["0x", ""]))
            lines.append(f"{pre}page_fault_user: address={ox}{a:x} ip=0x{rip:x} "
                         f"error_code=0x{ec:x}")
            exp.append((kind(ec), a, rip, None))
        else:
            v = draw(st.integers(0, 65535))
            lines.append(f"{pre}kvm:kvm_page_fault: vcpu {v} rip 0x{rip:x} address 0x{a:016x} "
                         f"error_code 0x{ec:x}")
            exp.append((kind(ec), a, rip, v))
        if draw(st.integers(0, 4)) == 0:
            lines.append(draw(st.sampled_from(["# comment", "", " a 1 [000] 1.0: irq:irq_handler",
                                               " a 1 [000] 1.0: exceptions:page_fault_kernel: x"])))
    return "\n".join(lines) + "\n", exp


PROP = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROP
@given(perf_text())
def test_prop_perf(case):
    text, exp = case
    has_vcpu = any(e[3] is not None for e in exp)
    want = [(a, g, r, (v or 0) if has_vcpu else None) for a, g, r, v in exp]
    for b in BACKENDS:
        t = parse_trace(text, "perf", backend=b)
        assert t.format == "perf" and rows(t) == want


def _with_garbage(data, fmt):
    text = data.draw({"csv": csv_text(), "lackey": lackey_text(), "ftrace": ftrace_text(),
                      "perf": perf_text()}[fmt])[0]
    lines = text.split("\n")
    first = 0
    if fmt == "csv":
        while lines[first].startswith("#") or not lines[first].strip():
            first += 1
    ncols = len(lines[first].split(","))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(first + 1, len(lines)))
        g = data.draw(st.one_of(GARBAGE, near_miss("ftrace" if fmt == "perf" else fmt, ncols)))
        lines.insert(pos, g.replace("\n", " ").replace("\r", " "))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@PROP
@given(st.sampled_from(["csv", "lackey", "ftrace", "perf"]), st.data())
def test_prop_skip_bad_lines(fmt, data):
    """skip_bad_lines leaves out exactly the lines that are refused: both
    backends agree, each skipped line is refused on its own, and the text
    without them parses strictly to the same trace."""
    blob = _with_garbage(data, fmt)
    results = []
    for b in BACKENDS:
        try:
            t = parse_trace(blob, fmt, "g", b, skip_bad_lines=True)
            results.append(("ok", rows(t), t.skipped, t.skipped_lines))
        except TraceError as e:
            results.append(("err", str(e)))
    assert all(r == results[0] for r in results), results
    if results[0][0] != "ok":
        return
    _, got, n, first = results[0]
    assert n == len(first) or n > len(first) == 10
    lines = blob.split(b"\n")
    bad = {ln for ln, _ in first}

    def blank(keep=None):
        """The text with the bad lines (but `keep`) blanked: numbers stay."""
        return b"\n".join(b"" if i in bad and i != keep else x for i, x in enumerate(lines, 1))
    if n == len(first):
        assert rows(parse_trace(blank(), fmt, "g", BACKENDS[0])) == got
    for ln, msg in first:
        with pytest.raises(TraceError) as ei:
            parse_trace(blank(ln), fmt, "g", BACKENDS[0])
        assert ei.value.line == ln and ei.value.msg == msg


# --------------------------------------------------------------------------
# the command line: a trace cut off by a killed valgrind


def test_cli_skip_bad_lines(tmp_path):
    t = tmp_path / "cut.lackey"
    t.write_text("==1== Lackey\nI  04000000,3\n L 1ffefff000,8\n S 1ffeffe000,8\n L 1ffe")
    def hv(*a):
        return subprocess.run([sys.executable, "-m", "hv", "replay", str(t), "--host-mem", "64M",
                               *a], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    r = hv("--json")
    assert r.returncode == 2 and "cut.lackey:5:" in r.stderr
    r = hv("--json", "--skip-bad-lines")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["accesses"] == 3 and d["skipped_lines"] == 1
    assert d["skipped"][0]["line"] == 5 and "lackey record" in d["skipped"][0]["error"]
    assert r.stderr.count("\n") == 1 and "skipped 1 bad line" in r.stderr and "line 5" in r.stderr
    r = hv("--skip-bad-lines", "--format", "perf")        # nothing left of it: still refused
    assert r.returncode == 2 and "no accesses" in r.stderr
