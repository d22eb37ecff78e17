"""hv compare: the matrix and the costs of every design in one JSON object;
the PSP-memory figures against their definition; plots; bad input. Never
asserts a time (only that each measured figure is there and positive)."""
import json
import os

import pytest

from hv.bench.designs import psp_bytes_per_gib, walk_ns
from hv.cli.main import main

MiB = 1 << 20
GiB = 1 << 30
DESIGNS = ["digest-full", "digest-merkle", "isolated", "rmp", "none"]
COSTS = ("npf_first_touch_us", "walk_ns", "check_ms_1g", "check_ms_16g", "psp_bytes_per_gib",
         "guest_mips")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    pytest.importorskip("matplotlib")
    plots = tmp_path_factory.mktemp("plots")
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["compare", "--tiny", "--json", "--plot", str(plots), "--scenarios",
                   "severed_remap,escalate_writable,map_psp_memory,benign_accessed_dirty"])
    return rc, json.loads(buf.getvalue()), plots


def test_compare_json_has_every_design_scenario_and_cost(compared):
    rc, res, _plots = compared
    assert rc == 0 and res["designs"] == DESIGNS
    assert set(res["matrix"]) == {"severed_remap", "escalate_writable", "map_psp_memory",
                                  "benign_accessed_dirty"}
    for name, row in res["matrix"].items():
        assert list(row) == DESIGNS
        for d, cell in row.items():
            assert cell["matches"] and cell["outcome"] == cell["expected"], (name, d, cell)
    m = res["matrix"]
    assert m["severed_remap"]["rmp"]["outcome"] == "detected"
    assert m["severed_remap"]["rmp"]["exposure"] == 0
    assert m["severed_remap"]["isolated"]["outcome"] == "prevented"
    assert m["severed_remap"]["none"]["outcome"] == "undetected"
    assert m["escalate_writable"]["rmp"]["outcome"] == "undetected"
    assert res["mismatches"] == []
    for d in DESIGNS:
        c = res["costs"][d]
        for k in COSTS:
            assert isinstance(c[k], (int, float)) and c[k] >= 0, (d, k)
        assert c["npf_first_touch_us"] > 0 and c["guest_mips"] > 0 and c["walk_ns"] > 0
    assert res["costs"]["none"]["psp_bytes_per_gib"] == 0
    assert res["costs"]["isolated"]["npf_first_touch_us_inprocess"] is None   # it cannot
    assert res["machine"]["cpus"] and res["date"].endswith("UTC")


def test_compare_plots(compared):
    _rc, res, plots = compared
    names = sorted(os.path.basename(f) for f in res["plots"])
    assert names == ["compare_costs.png", "compare_outcomes.png"]
    for f in res["plots"]:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_psp_bytes_follow_their_definition():
    """16 MiB mapped with 4 KiB pages, 512 a command: 4096 pages in 8 leaf
    tables under one PD, one PDPT, the root: 11 table pages."""
    scale = GiB // (16 * MiB)
    full = psp_bytes_per_gib("digest", "full", mapped=16 * MiB)
    assert full["shadow"] == 11 * 4096 * scale                  # a copy of each table page
    assert full["hashes"] == 32 * scale                          # one digest
    # listed frames: 4096 mapped + 11 table pages + 1 control page, 13 bytes each
    assert full["frame_table"] == 13 * (4096 + 11 + 1) * scale
    merkle = psp_bytes_per_gib("digest", "merkle", mapped=16 * MiB)
    assert merkle["shadow"] == full["shadow"] and merkle["hashes"] > 2048 * 8 * scale
    iso = psp_bytes_per_gib("isolated", None, mapped=16 * MiB)
    assert iso["tables"] == (11 + 1) * 4096 * scale and iso["hashes"] == 0
    rmp = psp_bytes_per_gib("rmp", None, mapped=16 * MiB)
    assert rmp["rmp"] == 8 * 4096 * scale == 2 * MiB             # 8 bytes per mapped frame
    assert rmp["shadow"] == 0 and rmp["gpa_maps"] == 16 * 4096 * scale
    assert psp_bytes_per_gib("none", None, mapped=16 * MiB)["total"] == 0


def test_walk_ns_measures_the_same_table_with_and_without_the_check():
    w = walk_ns(size=16 * MiB, n=5000, repeat=1)
    assert set(w) == {"plain", "rmp"} and w["plain"] > 0 and w["rmp"] > 0


@pytest.mark.parametrize("argv,err", [
    (["--designs", "digest,bogus"], "unknown design"),
    (["--scenarios", "nope"], "unknown scenario"),
    (["--no-costs", "--no-matrix"], "nothing to do"),
])
def test_compare_bad_input(capsys, argv, err):
    assert main(["compare", "--tiny"] + argv) == 2
    e = capsys.readouterr().err
    assert err in e and e.count("\n") == 1


def test_compare_exits_1_where_an_outcome_differs(capsys, monkeypatch):
    from hv.vmm import vmm as vmm_mod
    real = vmm_mod.Vmm.create_vm

    def no_rmp(self, *a, **kw):
        vm = real(self, *a, **kw)
        vm.rmp = None           # a walker without the RMP check
        return vm
    monkeypatch.setattr(vmm_mod.Vmm, "create_vm", no_rmp)
    assert main(["compare", "--tiny", "--json", "--no-costs", "--designs", "rmp,none",
                 "--scenarios", "severed_remap"]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["mismatches"] == [{"scenario": "severed_remap", "design": "rmp",
                                  "outcome": "undetected", "expected": "detected",
                                  "detail": res["mismatches"][0]["detail"]}]
