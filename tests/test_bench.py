"""`hv bench --quick --json` prints every required figure (the test runs the
hidden --tiny profile: same code paths, small sizes). Never asserts times."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ["walk_c_vs_python", "walk_c_vs_floor", "merkle_update_growth",
            "full_update_growth", "npf_us_4k", "kvm_fault_us", "replay_accesses_per_s",
            "guest_speed_vs_unicorn", "psp_roundtrip_us_process", "psp_roundtrip_us_inprocess",
            "psp_ring_us_per_cmd"]


def _kvm_usable():
    from hv.machine import kvm
    return kvm.available()


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    plots = tmp_path_factory.mktemp("plots")
    env = dict(os.environ, HV_BENCH_TINY="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "hv", "bench", "--quick", "--json",
                        "--plot", str(plots)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), plots


def test_required_keys_are_numbers(bench_json):
    res, _ = bench_json
    for k in REQUIRED:
        assert k in res, k
        v = res[k]
        if k == "kvm_fault_us" and not _kvm_usable():
            assert v is None
            continue
        if k == "guest_speed_vs_unicorn" and v is None:
            pytest.skip(f"hv boot unavailable: {res['guest'].get('skipped')}")
        assert isinstance(v, (int, float)) and not isinstance(v, bool), (k, v)
        assert v > 0, (k, v)


def test_sections_and_targets(bench_json):
    res, _ = bench_json
    for sec in ("machine", "sha256", "walks", "integrity", "npf", "replay", "kvm", "targets"):
        assert sec in res, sec
    for mode in ("full", "merkle"):
        rows = res["integrity"]["rows"][mode]
        assert len(rows) >= 2 and all(r["update_us"] > 0 and r["check_us"] > 0 for r in rows)
    for row in res["walks"]["rows"]:
        for k in ("c_batch_ns", "c_single_ns", "python_ns", "floor_ns"):
            assert row[k] > 0
    for name in ("4k", "fa16", "2m"):
        assert res["npf"][name]["npf"] >= 1
    # fault-around and 2 MiB pages take fewer faults for the same pages
    assert res["npf"]["fa16"]["npf"] < res["npf"]["4k"]["npf"]
    assert res["npf"]["2m"]["npf"] < res["npf"]["fa16"]["npf"]
    for t in res["targets"].values():
        assert set(t) == {"value", "met", "target"}


def test_plots_written(bench_json):
    pytest.importorskip("matplotlib")
    res, plots = bench_json
    names = sorted(os.listdir(plots))
    assert "integrity_vs_mapped.png" in names and "walk_ratios.png" in names
    for n in names:
        with open(os.path.join(plots, n), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_section_is_usage_error():
    p = subprocess.run([sys.executable, "-m", "hv", "bench", "--only", "nope"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("hv:")


def test_rss_child_reads_its_own_high_water_mark():
    from hv.bench.memory import _child_rss
    rc, rss = _child_rss(["inspect", "--help"])
    assert rc == 0 and 1 < rss < 500
