"""`hv bench --quick --json` prints every required figure (the test runs the
hidden --tiny profile: same code paths, small sizes). Never asserts times."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ["walk_c_vs_python", "walk_c_vs_floor", "merkle_update_growth",
            "full_update_growth", "npf_replay_us_4k", "npf_first_touch_us",
            "npf_first_touch_us_fa16", "npf_first_touch_us_2m", "kvm_fault_us",
            "npf_first_touch_vs_kvm", "replay_accesses_per_s", "guest_speed_vs_unicorn",
            "guest_speed_vs_unicorn_flat", "psp_roundtrip_us_process_p50",
            "psp_roundtrip_us_process_p99", "psp_roundtrip_us_inprocess_p50",
            "psp_ring_us_per_cmd", "cpus_idle", "kvm_psp_npf_us", "kvm_psp_npf_vs_kvm"]
NEEDS_KVM = ("kvm_fault_us", "npf_first_touch_vs_kvm", "kvm_psp_npf_us", "kvm_psp_npf_vs_kvm")


def _kvm_usable():
    from hv.machine import kvm
    return kvm.available() and kvm.probe() is None


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    plots = tmp_path_factory.mktemp("plots")
    env = dict(os.environ, HV_BENCH_TINY="1", PYTHONPATH=ROOT)
    # -v: progress lines on stderr, and nothing else (the NPF log stays off)
    p = subprocess.run([sys.executable, "-m", "hv", "bench", "--quick", "--json", "-v",
                        "--plot", str(plots)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), plots, p.stderr


def test_required_keys_are_numbers(bench_json):
    res = bench_json[0]
    assert res["errors"] == []
    for k in REQUIRED:
        assert k in res, k
        v = res[k]
        if k in NEEDS_KVM and not _kvm_usable():
            assert v is None
            continue
        assert isinstance(v, (int, float)) and not isinstance(v, bool), (k, v)
        assert v > 0 or (k == "cpus_idle" and v == 0), (k, v)


def test_ratios_are_their_two_sides(bench_json):
    """Each headline ratio is the quotient of the two figures the run
    recorded for its sides (computed here from the definition)."""
    res = bench_json[0]
    g = res["guest"]
    for name in ("compute", "memtouch", "firsttouch"):
        s = g[f"speed_{name}"]
        assert s["vs_unicorn"] == pytest.approx(s["unicorn_s"] / s["hv_s"])
        assert s["vs_unicorn_flat"] == pytest.approx(s["unicorn_flat_s"] / s["hv_s"])
    # the definition: the worse of compute and memtouch
    assert res["guest_speed_vs_unicorn"] == pytest.approx(
        min(g["speed_compute"]["vs_unicorn"], g["speed_memtouch"]["vs_unicorn"]))
    assert res["guest_speed_vs_unicorn_firsttouch"] == pytest.approx(
        g["speed_firsttouch"]["vs_unicorn"])
    assert res["guest_speed_vs_unicorn_none"] == pytest.approx(
        min(g["speed_compute"]["unicorn_s"] / g["speed_compute"]["hv_none_s"],
            g["speed_memtouch"]["unicorn_s"] / g["speed_memtouch"]["hv_none_s"]))
    for name in ("memtouch", "firsttouch"):       # per NPF, the fault-bound guests
        s = g[f"speed_{name}"]
        assert s["extra_us_per_npf"] == pytest.approx((s["hv_s"] - s["unicorn_s"]) * 1e6 / s["npf"])
        assert s["psp_us_per_npf"] == pytest.approx((s["hv_s"] - s["hv_none_s"]) * 1e6 / s["npf"])
    assert "psp_us_per_npf" not in g["speed_compute"]
    # the baseline's fill is in C where hv boot's is
    from hv.machine.unicorn_hooks import available_hooks
    assert g["unicorn_fill"] == available_hooks()[0]
    ft = g["first_touch_4k"]
    assert res["npf_first_touch_us"] == pytest.approx(ft["elapsed_s"] * 1e6 / ft["pages"])
    if _kvm_usable():
        assert res["npf_first_touch_vs_kvm"] == pytest.approx(
            res["npf_first_touch_us"] / res["kvm_fault_us"])
    rows = res["integrity"]["rows"]["merkle"]
    assert res["merkle_update_growth"] == pytest.approx(rows[-1]["update_us"] / rows[0]["update_us"])
    m = res["machine"]
    assert res["cpus_idle"] == max(0, round(m["cpus_allowed"] - m["loadavg_at_start"][0]))


def test_first_touch_takes_one_npf_per_page(bench_json):
    """firsttouch at 4 KiB: an NPF for every page it writes (and its stack);
    fault-around 16 and 2 MiB pages: far fewer for the same pages."""
    g = bench_json[0]["guest"]
    a, b, c = g["first_touch_4k"], g["first_touch_fa16"], g["first_touch_2m"]
    assert a["pages"] == b["pages"] == c["pages"]
    assert a["pages"] <= a["npf"] <= a["pages"] + 4
    assert b["npf"] <= a["npf"] // 8 and c["npf"] < b["npf"] * 4


def test_verbose_logs_progress_only(bench_json):
    """-v shows the benchmark's progress, never the NPF log inside a timed section."""
    err = bench_json[2]
    assert "first touch" in err and "integrity" in err
    assert "hv.npf" not in err and "npf gpa=" not in err


def test_a_failing_section_is_an_error(monkeypatch, capsys):
    import hv.bench as bench
    from hv.cli.main import main

    def broken(p):
        raise RuntimeError("simulated")
    monkeypatch.setattr(bench, "bench_sha256", broken)
    monkeypatch.setenv("HV_BENCH_TINY", "1")
    rc = main(["bench", "--only", "sha256", "--json"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "section sha256: RuntimeError: simulated" in err
    res = json.loads(out)
    assert res["sha256"]["error"] == "RuntimeError: simulated"
    assert res["errors"] == ["sha256: RuntimeError: simulated"]


def test_text_report_is_tables_with_units(monkeypatch, capsys):
    from hv.cli.main import main
    monkeypatch.setenv("HV_BENCH_TINY", "1")
    assert main(["bench", "--only", "sha256,walks"]) == 0
    out = capsys.readouterr().out
    import re
    assert "{'" not in out and not re.search(r"[a-z_]=\S", out)     # no raw dicts, no k=v dumps
    walk_rows = [ln for ln in out.splitlines() if ln.strip().startswith(("16 MiB", "64 MiB"))]
    assert len(walk_rows) == 2
    for ln in walk_rows:
        assert ln.count(" ns") == 4 and ln.count(" x") == 2
    # aligned: the header and the rows of the walk table have the same width
    i = out.splitlines().index(next(ln for ln in out.splitlines() if ln.startswith("NPT walk")))
    block = out.splitlines()[i + 1:i + 5]
    assert len({len(ln) for ln in block}) == 1, block


def test_sections_and_targets(bench_json):
    res = bench_json[0]
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
    res, plots = bench_json[:2]
    names = sorted(os.listdir(plots))
    assert {"integrity_vs_mapped.png", "walk_ratios.png", "first_touch.png"} <= set(names)
    assert sorted(res["plots"]) == sorted(os.path.join(str(plots), n) for n in names)
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


def test_benchmarks_page_is_rendered_from_the_run(bench_json):
    """scripts/bench_report.py writes docs/benchmarks.md from a run's JSON:
    every target row and the guest-speed figures come out of that JSON."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_report
    finally:
        sys.path.pop(0)
    res = bench_json[0]
    page = bench_report.render(res)
    for k, t in res["targets"].items():
        want = "n/a" if t["met"] is None else ("met" if t["met"] else "**not met**")
        v = t["value"]
        shown = bench_report._f(v, 3 if v is not None and v < 100 else 2)
        assert f"| `{k}` | {shown} | {t['target']} | {want} |" in page
    g = res["guest"]
    for name in ("compute", "memtouch", "firsttouch"):
        s = g[f"speed_{name}"]
        assert f"| {name} | {bench_report._f(s['instructions'])} | {bench_report._f(s['npf'])} |" \
            in page
    # the share of the baseline's first touch the five line hashes take, from its definition
    ft = g["speed_firsttouch"]
    if g.get("line_hash_ns") is None:        # no C core: the paragraph is left out
        assert "line hashes" not in page
        return
    share = 5 * g["line_hash_ns"] / 1e3 / (ft["unicorn_s"] * 1e6 / ft["npf"]) * 100
    assert f"{bench_report._f(share, 0)}% of the baseline" in page
