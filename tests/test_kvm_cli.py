"""--accel on the command line (hv boot, hv attack) and the KVM benchmarks.

The tests of what happens without KVM run everywhere (KVM's absence is
simulated); the others skip, with the reason, where /dev/kvm is unusable."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hv.cli.main import main
from hv.machine import kvm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENV.pop("HV_DEBUG", None)
WHY = kvm.probe()
needs_kvm = pytest.mark.skipif(WHY is not None, reason=f"KVM is not available: {WHY}")
SMALL = ["--host-mem", "128M", "--mem", "16M"]
HOST = ["--host-mem", "128M"]


def run_main(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def no_kvm(monkeypatch):
    """/dev/kvm as on a machine without it."""
    monkeypatch.setattr(kvm, "_probe_result", ["/dev/kvm: No such file or directory"])


@pytest.mark.parametrize("cmd", [["boot", "hello", "--mem", "16M"], ["attack", "guest_severed_remap"]])
def test_kvm_unavailable_exits_2_with_one_line(capsys, no_kvm, cmd):
    rc, out, err = run_main(capsys, *cmd, "--accel", "kvm", *HOST)
    assert rc == 2 and out == ""
    assert err == "hv: KVM is not available: /dev/kvm: No such file or directory\n"


def test_kvm_unavailable_json_is_still_one_line(capsys, no_kvm):
    rc, out, err = run_main(capsys, "boot", "hello", "--accel", "kvm", "--json", *SMALL)
    assert rc == 2 and err.count("\n") == 1 and "KVM is not available" in err


def test_auto_falls_back_to_the_emulator(capsys, no_kvm):
    rc, out, _ = run_main(capsys, "boot", "hello", "--accel", "auto", "--json", *SMALL)
    d = json.loads(out)
    assert rc == 0 and d["accel"] == "unicorn" and d["instructions"] > 0


def test_probe_says_why(monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(kvm.os, "open", refuse)
    assert kvm.probe(refresh=True) == "/dev/kvm: Permission denied"
    assert kvm.available() is False
    monkeypatch.undo()
    kvm.probe(refresh=True)


# --------------------------------------------------------------------------
@needs_kvm
@pytest.mark.parametrize("name,mem", [("hello", "16M"), ("mb_hello", "32M"), ("paging", "16M")])
def test_boot_json_same_on_both(capsys, name, mem):
    got = {}
    for accel in ("unicorn", "kvm"):
        rc, out, _ = run_main(capsys, "boot", name, "--accel", accel, "--json", "--vga",
                              "--mem", mem, *HOST)
        got[accel] = (rc, json.loads(out))
    (ru, u), (rk, k) = got["unicorn"], got["kvm"]
    assert rk == ru == 0
    for key in ("serial", "vga", "exit_code", "exit_reason", "npf", "launch_pages",
                "measurement"):
        assert k[key] == u[key], key
    assert k["accel"] == "kvm" and k["instructions"] is None and k["exits"] > 0


@needs_kvm
@pytest.mark.parametrize("opt", ["--max-insns", "--check-insns"])
def test_instruction_counts_refused_on_kvm(capsys, opt):
    rc, out, err = run_main(capsys, "boot", "hello", "--accel", "kvm", opt, "1000", *SMALL)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "KVM does not" in err and opt.replace("insns", "ms") in err


def _spin_image(tmp_path):
    from test_kvm_boot import _elf64
    p = tmp_path / "spin"
    p.write_bytes(_elf64([(0x100000, b"\xeb\xfe", 2)], 0x100000))       # jmp $
    return p


@needs_kvm
def test_max_ms_on_kvm(capsys, tmp_path):
    p = _spin_image(tmp_path)
    rc, out, _ = run_main(capsys, "boot", p, "--accel", "kvm", "--max-ms", "100", "--json",
                          "--mem", "4M", *HOST)
    d = json.loads(out)
    assert rc == 1 and d["exit_reason"] == "time_limit" and d["exit_code"] == 1
    rc, out, _ = run_main(capsys, "boot", p, "--accel", "kvm", "--max-ms", "50", "--json",
                          "--insn-limit-ok", "--mem", "4M", *HOST)
    assert rc == 0 and json.loads(out)["exit_code"] == 0


@needs_kvm
def test_ctrl_c_on_a_spinning_kvm_guest(tmp_path):
    p = _spin_image(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "hv", "boot", str(p), "--accel", "kvm",
                             "--mem", "4M", *HOST], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)          # well inside KVM_RUN by then
    t = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.perf_counter() - t < 5
    assert "Traceback" not in err and err.strip() == "hv: interrupted"


@needs_kvm
def test_record_on_kvm_via_cli(capsys, tmp_path):
    f = tmp_path / "npf.csv"
    rc, out, _ = run_main(capsys, "boot", "memtouch", "--accel", "kvm", "--mem", "4M",
                          "--record", f, "--json", *HOST)
    d = json.loads(out)
    rc2, out2, _ = run_main(capsys, "replay", f, "--json", *HOST)
    assert rc == 0 and rc2 == 0 and json.loads(out2)["npf"] == d["npf"]


# --------------------------------------------------------------------------
@needs_kvm
def test_attack_guest_scenarios_on_kvm(capsys):
    rc, out, _ = run_main(capsys, "attack", "--driver", "guest", "--accel", "kvm", "--json",
                          *HOST)
    d = json.loads(out)
    assert rc == 0 and d["accel"] == "kvm" and d["summary"]["undetected"] == 0
    guest = [s for s in d["scenarios"] if s["driver"] == "guest"]
    assert len(guest) >= 7 and all(s["outcome"] in ("detected", "not_flagged") for s in guest)
    for s in guest:
        if s["outcome"] == "detected":
            assert s["exposure_unit"] == "ms" and s["exposure_ms"] >= 0
            assert s["exposure_exits"] >= 0 and s["exposure_insns"] is None
    remap = next(s for s in guest if s["name"] == "guest_severed_remap")
    assert "landed in the other guest's page" in remap["detail"]


@needs_kvm
def test_kvm_benchmarks_give_numbers():
    from hv.bench.common import PROFILES
    from hv.bench.kvm import bench_kvm_guest, bench_kvm_npf
    p = PROFILES["tiny"]
    r = bench_kvm_npf(p, lambda m: None)
    for k in ("kvm_psp_npf_us", "kvm_fault_us_same_guest", "kvm_psp_npf_vs_kvm",
              "kvm_psp_npf_fa16_us_per_page", "kvm_psp_npf_2m_us_per_page"):
        assert isinstance(r[k], float) and r[k] > 0, k
    # 4 KiB: one NPF per page mapped in the run; fault-around: far fewer
    assert r["kvm_4k"]["npf"] == r["kvm_4k"]["pages"]
    assert r["kvm_fa16"]["npf"] * 4 < r["kvm_4k"]["npf"]
    assert r["kvm_psp_npf_vs_kvm"] == r["kvm_psp_npf_us"] / r["kvm_fault_us_same_guest"]
    assert bench_kvm_guest(p, lambda m: None)["skipped"] == "not in this profile"
    g = bench_kvm_guest(dict(p, kvm_guest=True), lambda m: None)
    assert g["kvm_guest_speedup"] == g["emulator_s"] / g["kvm_s"] and g["kvm_exits"] > 0


def test_kvm_benchmarks_skip_without_kvm(no_kvm):
    from hv.bench.common import PROFILES
    from hv.bench.kvm import bench_kvm_guest, bench_kvm_npf
    assert bench_kvm_npf(PROFILES["tiny"], print)["skipped"].startswith("KVM is not available")
    assert bench_kvm_guest(PROFILES["tiny"], print)["kvm_guest_speedup"] is None
