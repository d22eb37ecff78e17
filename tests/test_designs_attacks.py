"""The attack suite under every protection design: each scenario's outcome is
the one it states for the design (hv/attacks/expect.py); what each outcome
carries (exposure 0 for an RMP detection, the fault for a prevented store);
the suite can fail (a design whose enforcement is switched off makes the
scenarios come out differently, and hv attack exit 1); and the properties
the comparison rests on, read off the expectations."""
import json
import logging

import pytest

from hv import attacks
from hv.attacks import (DETECTED, NOT_FLAGGED, PREVENTED, REFUSED, SCENARIOS, UNDETECTED,
                        AttackConfig, run_scenario)
from hv.cli.main import main

attacks.load_guest_scenarios("auto")
TRACE = [n for n, s in SCENARIOS.items() if s.driver == "trace"]
GUEST = [n for n, s in SCENARIOS.items() if s.driver == "guest"]


@pytest.fixture(autouse=True)
def _quiet_psp():
    lg = logging.getLogger("psp")
    old = lg.level
    lg.setLevel(logging.ERROR)
    yield
    lg.setLevel(old)


def _check(r, design):
    sc = SCENARIOS[r.name]
    assert r.outcome == sc.expect[design], r.detail
    assert r.design == design and r.expected == sc.expect[design] and r.ok
    if r.outcome == PREVENTED:
        assert r.exposure_insns == 0 and "SIGSEGV" in r.detail
    elif r.outcome == DETECTED and design == "rmp":
        assert r.exposure_insns == 0 and r.detected_by == "rmp", r
        if r.driver == "trace" and r.where:
            assert "rmp_entry" in r.where or "gpa" in r.where
    elif r.outcome == REFUSED:
        assert r.exposure_insns == 0
    elif r.outcome == NOT_FLAGGED:
        assert r.exposure_insns is None


@pytest.mark.parametrize("design", ["isolated", "rmp", "none"])
@pytest.mark.parametrize("name", TRACE)
def test_trace_scenario_outcome_per_design(name, design):
    r = run_scenario(name, AttackConfig(protect=design, host_mem=128 << 20))
    _check(r, design)


@pytest.mark.parametrize("name", ["severed_remap", "swap_root_pointer", "map_huge_by_write",
                                  "escalate_writable", "race_check_write", "pool_prefill"])
def test_rmp_outcomes_on_the_python_engine(name):
    """The RMP check's pure-Python twin carries the suite the same way."""
    r = run_scenario(name, AttackConfig(protect="rmp", backend="python", host_mem=128 << 20))
    _check(r, "rmp")


@pytest.mark.parametrize("name", ["severed_remap", "map_psp_memory", "benign_accessed_dirty"])
def test_rmp_with_the_psp_process(name):
    r = run_scenario(name, AttackConfig(protect="rmp", psp="process", host_mem=128 << 20))
    _check(r, "rmp")


@pytest.mark.parametrize("design", ["isolated", "rmp", "none"])
@pytest.mark.parametrize("name", GUEST or ["(none)"])
def test_guest_scenario_outcome_per_design(name, design):
    if name == "(none)":
        pytest.skip("no guest images")
    r = run_scenario(name, AttackConfig(protect=design, host_mem=128 << 20))
    if r.outcome == "skipped":
        pytest.skip(r.detail)
    _check(r, design)


def test_expectations_say_what_the_comparison_claims():
    """Under none at least ten tampers go undetected; under isolated every
    tamper by write is prevented; under rmp a remap by write is detected
    (and a permission change is not); commands are refused wherever the PSP
    validates them."""
    by_write = [n for n, s in SCENARIOS.items()
                if s.expect["digest"] == DETECTED]
    assert len(by_write) >= 15
    assert all(SCENARIOS[n].expect["isolated"] == PREVENTED for n in by_write)
    assert sum(s.expect["none"] == UNDETECTED for s in SCENARIOS.values()) >= 10
    assert SCENARIOS["severed_remap"].expect["rmp"] == DETECTED
    assert SCENARIOS["escalate_writable"].expect["rmp"] == UNDETECTED
    for n, s in SCENARIOS.items():
        if s.expect["digest"] == REFUSED and n != "pool_prefill":
            assert s.expect["isolated"] == REFUSED, n
        assert s.expect["none"] in (UNDETECTED, NOT_FLAGGED), n


def test_prevented_rests_on_the_fault(monkeypatch):
    """`prevented` is reported only because the child's store faulted: a
    probe that says the store went through turns it into a finding (the
    tamper then has to be caught some other way, and under isolated
    nothing else looks)."""
    import hv.attacks.lab as lab_mod
    calls = []

    def store_went_through(mem, hpa, data):
        calls.append(hpa)
        return True
    monkeypatch.setattr(lab_mod, "store_in_child", store_went_through)
    r = run_scenario("severed_remap", AttackConfig(protect="isolated", host_mem=128 << 20))
    assert calls and r.outcome == UNDETECTED and not r.ok


def test_rmp_check_switched_off_is_seen(monkeypatch):
    """If the walker skipped the RMP check, remaps would go undetected."""
    from hv.vmm import vmm as vmm_mod
    real = vmm_mod.Vmm.create_vm

    def no_rmp(self, *a, **kw):
        vm = real(self, *a, **kw)
        vm.rmp = None
        return vm
    monkeypatch.setattr(vmm_mod.Vmm, "create_vm", no_rmp)
    for name in ("severed_remap", "alias_by_write"):
        r = run_scenario(name, AttackConfig(protect="rmp", host_mem=128 << 20))
        assert r.outcome == UNDETECTED and not r.ok, name


def test_cli_exit_codes_follow_the_expectation(capsys, monkeypatch):
    # under none, undetected is what is expected: exit 0
    assert main(["attack", "severed_remap", "map_psp_memory", "--protect", "none",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protect"] == "none" and out["differs"] == []
    assert [s["outcome"] for s in out["scenarios"]] == [UNDETECTED, UNDETECTED]
    # the same scenarios under digest: detected / refused, exit 0
    assert main(["attack", "severed_remap", "map_psp_memory", "--json"]) == 0
    capsys.readouterr()
    # an outcome that differs: exit 1, and the JSON names it
    from hv.vmm import vmm as vmm_mod
    real = vmm_mod.Vmm.create_vm

    def no_rmp(self, *a, **kw):
        vm = real(self, *a, **kw)
        vm.rmp = None
        return vm
    monkeypatch.setattr(vmm_mod.Vmm, "create_vm", no_rmp)
    assert main(["attack", "severed_remap", "escalate_writable", "--protect", "rmp",
                 "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["differs"] == ["severed_remap"]


def test_cli_bad_design_combinations(capsys):
    assert main(["attack", "severed_remap", "--protect", "rmp", "--integrity", "full"]) == 2
    assert "sub-option of --protect digest" in capsys.readouterr().err
    assert main(["attack", "severed_remap", "--protect", "isolated", "--psp", "inprocess"]) == 2
    assert "needs the PSP in its own process" in capsys.readouterr().err
    assert main(["attack", "--protect", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--protect" in err
