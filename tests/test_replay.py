"""Replay of fault traces through the PSP-managed NPT, and the replay CLI."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hv import Vmm, load_trace
from hv.trace.replay import replay
from hv.trace import Trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "traces", "true.lackey.gz")


def run_hv(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "hv", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def replay_json(path, *extra):
    r = run_hv("replay", path, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def lackey_trace(tmp_path_factory):
    """A lackey trace of a real system binary, made now."""
    if not shutil.which("valgrind"):
        pytest.skip("valgrind not installed")
    out = tmp_path_factory.mktemp("lackey") / "ls.lackey"
    with open(out, "w") as f:
        r = subprocess.run(["valgrind", "--tool=lackey", "--trace-mem=yes", "ls", "/"],
                           stdout=subprocess.DEVNULL, stderr=f, timeout=120)
    assert r.returncode == 0
    return str(out)


def test_lackey_trace_of_real_program(lackey_trace, backend):
    trace = load_trace(lackey_trace)
    assert len(trace) > 10000
    res = replay_json(lackey_trace, "--backend", backend)
    pages = len(trace.pages())
    assert res["accesses"] == len(trace)
    assert res["npf"] == pages
    assert res["pages_mapped"] == pages
    assert res["refused"] == 0 and res["tamper_detected"] is False
    assert res["backend"] == backend
    assert len(res["digest"]) == 64


def test_backends_agree_on_digest(lackey_trace):
    from nptcore import available_backends
    if "c" not in available_backends():
        pytest.skip("C backend not built")
    a = replay_json(lackey_trace, "--backend", "c")
    b = replay_json(lackey_trace, "--backend", "python")
    for key in ("npf", "pages_mapped", "psp_commands", "digest"):
        assert a[key] == b[key], key


def test_bundled_trace(backend):
    res = replay_json(BUNDLED, "--backend", backend)
    assert res["npf"] == len(load_trace(BUNDLED).pages())
    assert res["format"] == "lackey"


def _vmm_replay(backend, trace, **vmopts):
    vmm = Vmm(host_mem=256 << 20, backend=backend)
    vm = vmm.create_vm(**vmopts)
    res = replay(vmm, vm, trace)
    return vmm, vm, res


def test_straddling_access_touches_both_pages(backend):
    t = Trace([0, 1], [0x1FFE, 0x5000], [4, 8])
    vmm, vm, res = _vmm_replay(backend, t)
    assert res["npf"] == 3
    root = vmm.npt_root(vm)
    for g in (0x1000, 0x2000, 0x5000):
        assert vmm.engine.walk(root, g, 0).ok


def test_fault_around_maps_aligned_block(backend):
    t = Trace([0, 0, 0], [0x13000, 0x1F000, 0x20000])
    vmm, vm, res = _vmm_replay(backend, t, fault_around=16)
    assert res["npf"] == 2                 # 0x10000..0x1FFFF in one, then 0x20000..
    assert res["pages_mapped"] == 32
    t2 = Trace([0, 0], [0x13000, 0x14000])
    vmm, vm, res = _vmm_replay(backend, t2, fault_around=16)
    assert res["npf"] == 1


def test_fault_around_fills_holes_only(backend):
    vmm = Vmm(host_mem=128 << 20, backend=backend)
    vm = vmm.create_vm(fault_around=8)
    vm.fault_around = 1
    vmm.touch(vm, 0x3000)
    vm.fault_around = 8
    vmm.touch(vm, 0x5000)                  # block 0..7: 0x4000..0x7000 (3 is mapped)
    assert vm.pages_mapped == 1 + 4
    assert vmm.psp.verify(vm.handle).ok


def test_huge_pages(backend):
    t = Trace([0] * 3, [0x200123, 0x3FFFFF, 0x400000])
    vmm, vm, res = _vmm_replay(backend, t, huge=True)
    assert res["npf"] == 2 and res["pages_mapped"] == 1024
    r = vmm.engine.walk(vmm.npt_root(vm), 0x3FF000, 0)
    assert r.ok and r.level == 2


def test_huge_falls_back_when_block_has_small_pages(backend):
    vmm = Vmm(host_mem=128 << 20, backend=backend)
    vm = vmm.create_vm()
    vmm.touch(vm, 0x201000)
    vm.huge = True
    vmm.touch(vm, 0x202000)
    assert vm.pages_mapped == 2
    vmm.touch(vm, 0x600000)
    assert vm.pages_mapped == 2 + 512


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2]),
                          st.integers(0, (1 << 30) - 1),
                          st.integers(1, 64)), min_size=1, max_size=200))
def test_random_traces_npf_equals_distinct_pages(backend, rows):
    t = Trace([a for a, _, _ in rows], [g for _, g, _ in rows], [s for _, _, s in rows])
    vmm, vm, res = _vmm_replay(backend, t)
    assert res["npf"] == len(t.pages()) == res["pages_mapped"]
    assert vmm.psp.verify(vm.handle).ok
    mapped = {g >> 12 for g, _h, _s, _e in vmm.engine.mappings(vmm.npt_root(vm))}
    assert mapped == set(t.pages())
    vmm.close()


def test_save_and_inspect(tmp_path, backend):
    snap = tmp_path / "npt.json"
    csv = tmp_path / "t.csv"
    csv.write_text("access,gpa\nr,0x1000\nw,0x2000\nx,0x3000\nr,0x10000\n")
    res = replay_json(str(csv), "--backend", backend, "--save", str(snap))
    r = run_hv("inspect", str(snap), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["mappings"] == 4 and rep["digest"] == res["digest"]
    assert [(x["gpa"], x["bytes"]) for x in rep["ranges"]][-1] == (0x10000, 0x1000)
    assert sum(x["bytes"] for x in rep["ranges"]) == 4 * 4096
    assert rep["table_pages"] == {"4": 1, "3": 1, "2": 1, "1": 1}
    assert rep["frames"]["mapped"] == 4
    r = run_hv("inspect", str(snap))
    assert "0x0000000000001000-0x0000000000003fff" in r.stdout
    r = run_hv("replay", str(csv), "--inspect")
    assert r.returncode == 0 and "table pages per level: L4=1, L3=1, L2=1, L1=1" in r.stdout


BAD_INPUTS = {
    "malformed_line": "access,gpa\nr,0x1000\nr,0x1000,7,8,9,10,11\n",
    "unknown_access": "access,gpa\nq,0x1000\n",
    "addr_2_52": "access,gpa\nr,0x10000000000000\n",
    "addr_2_64": "access,gpa\nr,0x10000000000000000\n",
    "empty": "",
    "only_header": "access,gpa\n",
    "unknown_format": "hello world\nthis is not a trace\n",
    "bad_number": "access,gpa\nr,0xZZ\n",
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS) + ["binary", "missing"])
def test_bad_trace_exits_2_with_one_line(tmp_path, name):
    p = tmp_path / f"{name}.csv"
    if name == "binary":
        p.write_bytes(os.urandom(256) + b"\0\xff\xfe")
    elif name != "missing":
        p.write_text(BAD_INPUTS[name])
    r = run_hv("replay", str(p), "--json")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and str(p.name) in lines[0]
    # --json: the same error as the one JSON object on stdout
    assert json.loads(r.stdout) == {"exit_reason": "bad_input", "exit_code": 2,
                                    "error": lines[0][len("hv: "):]}


@pytest.mark.parametrize("args", [["replay"], ["replay", BUNDLED, "--backend", "java"],
                                  ["replay", BUNDLED, "--host-mem", "lots"],
                                  ["replay", BUNDLED, "--fault-around", "0"],
                                  ["nosuchcommand"], ["inspect", "/nonexistent.json"], []])
def test_bad_usage_exits_2(args):
    r = run_hv(*args)
    assert r.returncode == 2, (args, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_inspect_rejects_garbage(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"version": 1, "host_size": 4096, "root": 0, "tables": [[1, 4, "AAAA"]]}')
    r = run_hv("inspect", str(p))
    assert r.returncode == 2 and "malformed snapshot" in r.stderr


def test_gzip_lackey_matches_plain(tmp_path):
    plain = tmp_path / "t.lackey"
    plain.write_bytes(gzip.decompress(open(BUNDLED, "rb").read()))
    a, b = replay_json(str(plain)), replay_json(BUNDLED)
    assert a["digest"] == b["digest"] and a["npf"] == b["npf"]
