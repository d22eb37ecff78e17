"""Guests and traces under every protection design (--protect): the same
serial output, exit code and NPF count as under digest, on both vCPU hooks;
and under rmp a remapped page stops a real guest at the access (exit 3),
through the C fill, the Python fill and the replay's batch walk (C and Python
engines)."""
import json

import pytest

from nptcore import available_backends
from nptcore.bits import ACC_W, ADDR_MASK, PF_RMP
from nptcore.rmp import decode_entry

gbuild = pytest.importorskip("guests.build")
pytest.importorskip("unicorn")

from hv.attacks.lab import entry_addr  # noqa: E402
from hv.cli.main import main  # noqa: E402
from hv.machine.boot import Boot  # noqa: E402
from hv.machine.unicorn_vcpu import available_hooks  # noqa: E402
from hv.trace.replay import replay  # noqa: E402
from hv.vmm.vmm import Vmm  # noqa: E402
from test_boot import GUESTS  # noqa: E402

MiB = 1 << 20
DESIGNS = ["digest", "isolated", "rmp", "none"]
HOOKS = [pytest.param(h, marks=[] if h in available_hooks() else
                      [pytest.mark.skip(reason=f"{h} hook not built")], id=h)
         for h in ("c", "python")]
ENGINES = [pytest.param(b, marks=[] if b in available_backends() else
                        [pytest.mark.skip(reason=f"{b} engine not built")], id="eng-" + b)
           for b in ("c", "python")]




def _boot(path, mem, design, hook="c", engine=None, on_slice=None, slice_insns=None):
    vmm = Vmm(host_mem=128 * MiB, protect=design, backend=engine)
    try:
        b = Boot(vmm, path, mem=mem, hook=hook, on_slice=on_slice, slice_insns=slice_insns)
        try:
            return b.run()
        finally:
            b.close()
    finally:
        vmm.close()


_DIGEST = {}


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("design", DESIGNS[1:])
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_guest_runs_the_same_under_every_design(guests, name, design, hook):
    mem, reason, code, serial = GUESTS[name]
    key = (name, hook)
    if key not in _DIGEST:
        _DIGEST[key] = _boot(guests[name], mem, "digest", hook)
    ref = _DIGEST[key]
    r = _boot(guests[name], mem, design, hook)
    assert (r.exit_reason, r.exit_code) == (reason, code), r.reason
    assert serial in r.serial and r.protect == design
    for f in ("serial", "npf", "instructions", "pages_mapped", "launch_pages", "exit_code"):
        assert getattr(r, f) == getattr(ref, f), f
    # the launch measurement is over the same pages under every design
    assert r.measurement == ref.measurement


@pytest.mark.parametrize("hook", HOOKS)
def test_rmp_remap_stops_a_real_guest_at_the_access(guests, hook):
    """compute under rmp; from on_slice the VMM points one of its bss pages
    at another guest's frame: the next fill of that page fails the RMP check."""
    state = {}

    def on_slice(boot, insns):
        if "done" in state or insns < 2_000_000:
            return
        vmm, vm = boot.vmm, boot.vm
        other = vmm.create_vm()
        state["other_page"] = vmm.touch(other, 0x100000, ACC_W) & ~0xFFF
        gpa = max(g for g in (p << 12 for p in vm.mapped) if g >= 0x200000)
        slot = entry_addr(vmm, vm, gpa)
        vmm.mem.write_u64(slot, (vmm.mem.read_u64(slot) & ~ADDR_MASK) | state["other_page"])
        state.update(done=insns, gpa=gpa, other=other.handle)
    r = _boot(guests["compute"], 16 * MiB, "rmp", hook, on_slice=on_slice, slice_insns=200_000)
    assert "done" in state
    assert (r.exit_reason, r.exit_code) == ("psp_stopped", 3), r.reason
    t = r.tamper
    assert t["status"] == "RMP_FAULT" and t["detected_by"].startswith("RMP check")
    assert t["gpa"] & ~0xFFF == state["gpa"] and t["hpa"] == state["other_page"]
    e = decode_entry(t["rmp_entry"])
    assert e["assigned"] and e["asid"] == state["other"] and e["gpa"] == 0x100000
    assert "compute: OK" not in r.serial


@pytest.mark.parametrize("engine", ENGINES)
def test_replay_walks_are_rmp_checked(engine):
    from array import array
    from hv.trace.model import Trace
    vmm = Vmm(host_mem=128 * MiB, protect="rmp", backend=engine)
    try:
        vm, other = vmm.create_vm(), vmm.create_vm()
        other_page = vmm.touch(other, 0x100000, ACC_W) & ~0xFFF
        gpas = array("Q", [0x400000 + 0x1000 * (i % 64) for i in range(4096)])
        trace = Trace(array("B", bytes(4096)), gpas, array("I", [8]) * 4096, format="csv")
        res = replay(vmm, vm, trace)
        assert res["stopped"] is None and res["npf"] == 64
        slot = entry_addr(vmm, vm, 0x400000 + 0x1000 * 40)
        vmm.mem.write_u64(slot, (vmm.mem.read_u64(slot) & ~ADDR_MASK) | other_page)
        res = replay(vmm, vm, trace)
        st = res["stopped"]
        assert st is not None and st.status.name == "RMP_FAULT"
        assert res["walks"] == 40            # every access before the remapped page went through
        assert st.fields["gpa"] == 0x400000 + 0x1000 * 40 and st.fields["errcode"] & PF_RMP
    finally:
        vmm.close()


@pytest.mark.parametrize("design", DESIGNS)
def test_cli_replay_under_every_design(design, capsys):
    rc = main(["replay", "traces/true.lackey.gz", "--protect", design, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["protect"] == design and out["tamper_detected"] is False
    assert out["npf"] == out["pages_mapped"] > 100
    assert (out["psp"] == "process") == (design == "isolated")
    # only digest keeps a digest
    assert (out["digest"] == "00" * 32) == (design != "digest")


# ---------------------------------------------------------------------------
# the same on KVM (--accel kvm): its memslot follows the table through the
# design's walk (under rmp, RMP-checked)

def _kvm_why():
    from hv.machine import kvm
    return kvm.probe()


needs_kvm = pytest.mark.skipif(_kvm_why() is not None, reason="KVM is not available")


@needs_kvm
@pytest.mark.parametrize("design", DESIGNS)
def test_memtouch_on_kvm_under_every_design(guests, design):
    vmm = Vmm(host_mem=128 * MiB, protect=design, shared_mem=True)
    try:
        b = Boot(vmm, guests["memtouch"], mem=4 * MiB, accel="kvm")
        try:
            r = b.run()
        finally:
            b.close()
    finally:
        vmm.close()
    assert (r.exit_reason, r.exit_code) == ("exit_port", 0) and "memtouch: OK" in r.serial
    assert r.protect == design and r.npf > 700


@needs_kvm
@pytest.mark.parametrize("design", ["isolated", "rmp", "none"])
def test_guest_attacks_on_kvm_per_design(design):
    from hv.attacks import SCENARIOS, AttackConfig, load_guest_scenarios, run_scenario
    load_guest_scenarios("auto")
    for name in ("guest_severed_remap", "guest_tamper_on_slice"):
        r = run_scenario(name, AttackConfig(protect=design, accel="kvm", host_mem=128 << 20))
        assert r.outcome == SCENARIOS[name].expect[design], (name, r.detail)
        if design == "rmp" and r.outcome == "detected":
            assert r.detected_by == "rmp" and r.exposure_ms == 0
