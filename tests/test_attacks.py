"""The malicious-hypervisor suite (issue 4): every scenario's expected outcome,
over every integrity mode and both engine backends; the periodic checkers;
`hv attack`; and a sanity check that the suite can fail (a PSP whose check
is broken must make scenarios come out `undetected`)."""
import json
import logging
import threading
import time

import pytest

from hv import Status, Vmm
from hv import attacks
from hv.attacks import (DETECTED, NOT_FLAGGED, REFUSED, SCENARIOS, UNDETECTED, AttackConfig,
                        entry_addr, run_scenario)
from hv.cli.main import main
from nptcore.bits import ACC_W, ADDR_MASK
from psp_firmware import INTEGRITY_MODES

PAGE = 4096
MODES = sorted(INTEGRITY_MODES)

attacks.load_guest_scenarios("auto")
TRACE_SCENARIOS = [n for n, s in SCENARIOS.items() if s.driver == "trace"]
GUEST_SCENARIOS = [n for n, s in SCENARIOS.items() if s.driver == "guest"]


@pytest.fixture(autouse=True)
def _quiet_psp():
    lg = logging.getLogger("psp")
    old = lg.level
    lg.setLevel(logging.ERROR)      # every detection logs a warning: expected here
    yield
    lg.setLevel(old)


def _cfg(backend, mode, **kw):
    return AttackConfig(backend=backend, integrity=mode, host_mem=128 << 20, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TRACE_SCENARIOS)
def test_scenario_outcome(name, mode, backend):
    r = run_scenario(name, _cfg(backend, mode))
    sc = SCENARIOS[name]
    assert r.outcome == sc.expected, r.detail
    if r.outcome == DETECTED:
        assert isinstance(r.exposure_insns, int) and r.exposure_insns >= 0
        assert r.detected_by in ("update", "periodic", "periodic_wall", "verify")
        assert "GUEST_STOPPED" in r.detail
        if r.detected_by != "periodic_wall":
            assert r.where and "entry_index" in r.where, r
    elif r.outcome == REFUSED:
        assert r.exposure_insns == 0 and r.statuses
    elif r.outcome == NOT_FLAGGED:
        assert r.exposure_insns is None


def test_every_attack_class_is_covered():
    cats = {s.category for s in SCENARIOS.values()}
    assert set(attacks.CATEGORIES) <= cats
    # the list, by name
    for needle in ("severed", "alias_by_command", "alias_by_write", "replay", "escalate_writable",
                   "escalate_clear_nx", "swap_table", "swap_root", "map_table_page",
                   "map_psp_memory", "map_other_guest", "map_out_of_range", "map_misaligned",
                   "range_overlap", "range_overflow", "race_check_write", "reclaim_unscrubbed",
                   "benign_accessed_dirty"):
        assert any(needle in n for n in SCENARIOS), needle
    assert SCENARIOS["benign_accessed_dirty"].expected == NOT_FLAGGED


def test_refusals_name_the_cause(backend):
    """Refused subcases carry the SEV-style status of the cause, not just 'no'."""
    r = run_scenario("map_table_page", _cfg(backend, None))
    assert "own_root:TABLE_PAGE" in r.statuses and "vmsa_page:BAD_PAGE_STATE" in r.statuses
    r = run_scenario("map_psp_memory", _cfg(backend, None))
    assert all(s.endswith("FIRMWARE_PAGE") for s in r.statuses)
    r = run_scenario("map_misaligned", _cfg(backend, None))
    assert all(s.endswith("MISALIGNED") for s in r.statuses)
    r = run_scenario("range_overflow", _cfg(backend, None))
    assert "hpa_wraps_2^64:RANGE_OVERFLOW" in r.statuses
    assert "gpa_end_past_2^48:RANGE_OVERFLOW" in r.statuses


@pytest.mark.parametrize("every", [64, 100, 1000])
def test_exposure_is_the_check_interval(every):
    """A tamper at a slice boundary, caught by the next periodic check: exposure = N."""
    r = run_scenario("severed_remap", _cfg(None, None, check_every=every))
    assert r.outcome == DETECTED and r.detected_by == "periodic"
    assert r.exposure_insns == every
    assert 0 < r.tampered_hits <= every


def test_detection_at_next_update_beats_the_periodic_check():
    r = run_scenario("severed_remap_npf", _cfg(None, None, check_every=10_000))
    assert r.outcome == DETECTED and r.detected_by == "update"
    assert r.exposure_insns < 10_000


# ---------------------------------------------------------------------------
# the suite can fail: with a PSP that does not really check, attacks succeed

def test_broken_psp_makes_scenarios_undetected(monkeypatch):
    from psp_firmware.integrity import FullIntegrity
    monkeypatch.setattr(FullIntegrity, "verify_all", lambda self: None)
    monkeypatch.setattr(FullIntegrity, "check_before_update", lambda self, *a, **k: None)
    for name in ("severed_remap", "swap_root_pointer", "escalate_writable"):
        r = run_scenario(name, _cfg(None, "full", max_slices=4))
        assert r.outcome == UNDETECTED, (name, r)


def test_psp_folding_host_memory_into_digest_is_caught(monkeypatch):
    """A PSP that re-digests from host memory after its write (instead of its
    shadow) lets a racing write in; the race scenario must notice."""
    from psp_firmware.integrity import FullIntegrity
    monkeypatch.setattr(FullIntegrity, "after_update",
                        lambda self, mod: setattr(self, "digest", self._digest_from_memory()))
    r = run_scenario("race_between_check_and_write", _cfg(None, "full", max_slices=4))
    assert r.outcome == UNDETECTED


def test_broken_scrub_is_caught(monkeypatch):
    from psp_firmware.psp import Psp
    real = Psp.cmd_reclaim

    def reclaim_no_scrub(self, handle, hpa, npages):
        saved = self._scrub
        self._scrub = lambda *a: None
        try:
            return real(self, handle, hpa, npages)
        finally:
            self._scrub = saved
    monkeypatch.setattr(Psp, "cmd_reclaim", reclaim_no_scrub)
    r = run_scenario("reclaim_unscrubbed", _cfg(None, None))
    assert r.outcome == UNDETECTED and "scrub" in r.detail


def test_false_positive_is_reported(monkeypatch):
    """If A/D bits counted in the digest, the benign scenario must say so."""
    import nptcore.pyengine as pe
    monkeypatch.setattr(pe.PyEngine, "canon_page", lambda self, hpa: bytes(self._mv[hpa:hpa + PAGE]))
    r = run_scenario("benign_accessed_dirty", _cfg("python", "full"))
    assert r.outcome == "false_positive", r


# ---------------------------------------------------------------------------
# CHECK_ALL report and the periodic checkers

def _tampered_pair(mode=None):
    vmm = Vmm(host_mem=128 << 20, integrity=mode)
    a, b = vmm.create_vm(), vmm.create_vm()
    for vm in (a, b):
        vmm.touch(vm, 0x3000, ACC_W)
        vmm.touch(vm, 0x4000, ACC_W)
    slot = entry_addr(vmm, a, 0x3000)
    val = vmm.mem.read_u64(slot)
    other = vmm.touch(b, 0x3000) & ~0xFFF
    return vmm, a, b, slot, val, other


@pytest.mark.parametrize("mode", MODES)
def test_check_all_reports_what_differed(mode):
    vmm, a, b, slot, val, other = _tampered_pair(mode)
    vmm.mem.write_u64(slot, (val & ~ADDR_MASK) | other)
    r = vmm.psp.check_all()
    assert r.status == Status.INTEGRITY_FAILURE
    assert r.stopped_handle == a.handle
    assert r.page_hpa == slot & ~0xFFF
    assert r.entry_index == (slot & 0xFFF) // 8 == 3     # regression: was always 0
    assert r.expected == val & ~0x60 and r.found == ((val & ~ADDR_MASK) | other) & ~0x60
    assert vmm.psp.update_npt(a.handle, 0x9000, vmm.alloc.alloc(1)).status == Status.GUEST_STOPPED
    assert vmm.psp.verify(b.handle).ok
    assert vmm.psp.check_all().ok          # the stopped guest is not checked again
    vmm.close()


@pytest.mark.parametrize("mode", MODES)
def test_wall_time_checker_stops_tampered_guest_only(mode):
    vmm, a, b, slot, val, other = _tampered_pair(mode)
    psp = vmm._psp_obj
    seen = []
    ev = threading.Event()

    def on_stop(h, mm):
        seen.append((h, mm))
        ev.set()
    checker = psp.start_periodic_check(5, on_stop=on_stop)
    try:
        time.sleep(0.05)
        assert checker.ticks >= 2 and not seen           # clean tables: nothing stopped
        vmm.mem.write_u64(slot, (val & ~ADDR_MASK) | other)
        assert ev.wait(5.0), "the periodic checker did not stop the tampered guest"
    finally:
        psp.stop_periodic_check()
    assert not checker.running
    (h, mm), = seen
    assert h == a.handle and mm.page_hpa == slot & ~0xFFF and mm.index == 3
    assert vmm.psp.verify(a.handle).status == Status.GUEST_STOPPED
    assert vmm.psp.update_npt(a.handle, 0x9000, vmm.alloc.alloc(1)).status == Status.GUEST_STOPPED
    vmm.touch(b, 0x5000, ACC_W)                          # the other guest carries on
    assert vmm.psp.verify(b.handle).ok
    vmm.close()


def test_wall_time_checker_lifecycle():
    vmm = Vmm(host_mem=128 << 20)
    psp = vmm._psp_obj
    with pytest.raises(ValueError):
        psp.start_periodic_check(0)
    boom = []

    def bad_callback(h, mm):
        boom.append(h)
        raise RuntimeError("callback bug")
    c1 = psp.start_periodic_check(1000)
    c2 = psp.start_periodic_check(2, on_stop=bad_callback)    # restart replaces
    assert not c1.running and c2.running
    vm = vmm.create_vm()
    vmm.touch(vm, 0x1000, ACC_W)
    vmm.mem.write_u64(vmm.npt_root(vm), 0xBAD000 | 7)
    deadline = time.monotonic() + 5
    while not boom and time.monotonic() < deadline:
        time.sleep(0.005)
    assert boom == [vm.handle]
    time.sleep(0.02)
    assert c2.running                       # a callback exception does not kill the timer
    psp.stop_periodic_check()
    ticks = c2.ticks
    time.sleep(0.02)
    assert c2.ticks == ticks and not c2.running
    psp.stop_periodic_check()               # idempotent
    vmm.close()


def test_periodic_check_before_platform_init():
    from hv.vmm.hostmem import HostMemory
    from psp_firmware import Psp
    mem = HostMemory(64 << 20)
    psp = Psp(mem.buf)
    assert psp.periodic_check() == (0, [])
    c = psp.start_periodic_check(1)
    time.sleep(0.01)
    psp.stop_periodic_check()
    assert c.ticks >= 1


def test_periodic_check_serialized_with_commands():
    """The checker holds the mailbox lock: commands racing it never see a half state."""
    vmm = Vmm(host_mem=128 << 20)
    vm = vmm.create_vm()
    psp = vmm._psp_obj
    psp.start_periodic_check(1)
    try:
        for i in range(200):
            assert vmm.psp.update_npt(vm.handle, 0x100000 + i * PAGE, vmm.alloc.alloc(1)).ok
    finally:
        psp.stop_periodic_check()
    assert vmm.psp.verify(vm.handle).ok
    psp._check_invariants()
    vmm.close()


# ---------------------------------------------------------------------------
# the command line

def test_cli_attack_all_json(capsys):
    rc = main(["attack", "--all", "--json", "--host-mem", "128M"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    rows = out["scenarios"]
    assert {r["name"] for r in rows} == set(SCENARIOS)
    for r in rows:
        assert set(r) >= {"name", "outcome", "exposure_insns", "detail"}
        assert r["outcome"] != UNDETECTED, r
    benign = [r for r in rows if r["name"] == "benign_accessed_dirty"][0]
    assert benign["outcome"] == NOT_FLAGGED
    assert {SCENARIOS[r["name"]].category for r in rows} >= set(attacks.CATEGORIES)
    assert out["summary"]["undetected"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_cli_attack_names_and_integrity(capsys, mode):
    rc = main(["attack", "severed_remap", "race", "--json", "--integrity", mode,
               "--check-insns", "50", "--host-mem", "128M", "--backend", "python"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    names = [r["name"] for r in out["scenarios"]]
    assert names[0] == "severed_remap" and "race_check_write" in names
    assert out["scenarios"][0]["exposure_insns"] == 50
    assert out["integrity"] == mode


def test_cli_attack_table_and_list(capsys):
    assert main(["attack", "benign_accessed_dirty", "map_misaligned", "--host-mem", "128M"]) == 0
    text = capsys.readouterr().out
    assert "not_flagged" in text and "refused" in text
    assert main(["attack", "--list"]) == 0
    assert "severed_remap" in capsys.readouterr().out


def test_cli_attack_bad_input(capsys):
    assert main(["attack", "no_such_attack"]) == 2
    assert "unknown attack scenario" in capsys.readouterr().err
    assert main(["attack", "--integrity", "nope", "severed_remap"]) == 2
    assert main(["attack", "--check-insns", "0", "severed_remap"]) == 2


def test_cli_attack_exit_1_when_undetected(capsys, monkeypatch):
    from psp_firmware.integrity import FullIntegrity
    monkeypatch.setattr(FullIntegrity, "verify_all", lambda self: None)
    monkeypatch.setattr(FullIntegrity, "check_before_update", lambda self, *a, **k: None)
    rc = main(["attack", "severed_remap", "--json", "--integrity", "full", "--host-mem", "128M"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["scenarios"][0]["outcome"] == UNDETECTED


# ---------------------------------------------------------------------------
# guest-driven variants (hv.boot)

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", GUEST_SCENARIOS or ["(none)"])
def test_guest_scenario_outcome(name, mode):
    if name == "(none)":
        pytest.skip("no guest-driven scenarios registered (hv.boot not available)")
    r = run_scenario(name, _cfg(None, mode))
    if r.outcome == "skipped":
        pytest.skip(r.detail)
    assert r.outcome == SCENARIOS[name].expected, r.detail
    assert r.driver == "guest"
    if r.outcome == DETECTED:
        assert r.exposure_unit == "insns" and isinstance(r.exposure_insns, int)
        assert r.where and r.where["entry_index"] is not None, r
        assert "GUEST_STOPPED" in r.detail


def test_guest_exposure_is_the_check_interval():
    """Tamper right after a check, no NPF afterwards: exposure = --check-insns."""
    if "guest_severed_periodic" not in SCENARIOS:
        pytest.skip("hv.boot not available")
    for every in (5_000, 40_000):
        r = run_scenario("guest_severed_periodic", _cfg(None, None, guest_check_insns=every))
        if r.outcome == "skipped":
            pytest.skip(r.detail)
        assert r.outcome == DETECTED and r.exposure_insns == every, r


def test_guest_tamper_ends_hv_boot_with_exit_3():
    if "guest_severed_remap" not in SCENARIOS:
        pytest.skip("hv.boot not available")
    r = run_scenario("guest_severed_remap", _cfg(None, None))
    if r.outcome == "skipped":
        pytest.skip(r.detail)
    assert r.outcome == DETECTED and "exit code 3" in r.detail and r.exposure_insns > 0
