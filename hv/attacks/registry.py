"""Outcomes, results, the run configuration and the scenario registry
(`@scenario`), and running scenarios by name."""
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

from psp_firmware import Status

from hv.errors import VmStopped
from hv.vmm.vmm import Vmm


PAGE = 4096
MB2 = 2 << 20

REFUSED, DETECTED, NOT_FLAGGED = "refused", "detected", "not_flagged"
UNDETECTED, FALSE_POSITIVE, SKIPPED, ERROR = "undetected", "false_positive", "skipped", "error"
OUTCOMES = (REFUSED, DETECTED, NOT_FLAGGED, UNDETECTED, FALSE_POSITIVE, SKIPPED, ERROR)
FAILURES = (UNDETECTED, FALSE_POSITIVE, ERROR)


# ---------------------------------------------------------------------------
# results, config, registry

@dataclass
class AttackResult:
    name: str
    outcome: str
    exposure_insns: int = None
    detail: str = ""
    category: str = ""
    expected: str = ""
    driver: str = "trace"
    exposure_unit: str = "accesses"
    detected_by: str = None          # "update" | "periodic" | "periodic_wall" | "verify"
    tampered_hits: int = None
    statuses: list = field(default_factory=list)   # PSP status names of the malicious commands
    where: dict = None               # what the PSP reported: page, entry index, expected, found
    elapsed_s: float = 0.0
    exposure_ms: float = None        # guest driver on KVM (no instruction count): wall time
    exposure_exits: int = None       # and KVM exits from the tamper to the detection

    @property
    def ok(self):
        return self.outcome not in FAILURES

    def to_json(self):
        d = asdict(self)
        d["elapsed_s"] = round(self.elapsed_s, 4)
        return d


@dataclass
class AttackConfig:
    backend: str = None
    host_mem: int = 256 << 20
    host_mem_path: str = None
    integrity: str = None
    psp: str = "inprocess"
    psp_timeout: float = 5.0
    check_every: int = 256           # periodic check interval (guest accesses/instructions)
    guest_check_insns: int = 20000   # same, for the guest driver
    wall_ms: float = 10.0            # interval of the wall-time checker scenarios
    max_slices: int = 64             # give up (undetected) after this many slices
    driver: str = "auto"             # scenarios with two drivers: "trace", "guest", "auto"
    accel: str = "unicorn"           # where the guest driver runs its guests: "unicorn" or "kvm"

    def new_vmm(self):
        return Vmm(host_mem=self.host_mem, host_mem_path=self.host_mem_path, backend=self.backend,
                   integrity=self.integrity, psp=self.psp, psp_timeout=self.psp_timeout,
                   shared_mem=self.accel == "kvm")


@dataclass
class Scenario:
    name: str
    func: object
    category: str
    expected: str
    doc: str
    driver: str = "trace"


SCENARIOS = {}

# the attack classes of issue 4 / DESIGN.md "Threat model"; every one is covered
CATEGORIES = (
    "severed_remap", "alias", "replay", "permission_escalation", "table_swap", "root_swap",
    "bad_hpa", "range", "race", "reclaim", "benign", "periodic",
)


def scenario(name, category, expected, driver="trace"):
    def deco(fn):
        SCENARIOS[name] = Scenario(name, fn, category, expected,
                                   (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
                                   driver)
        return fn
    return deco


class Undetected(Exception):
    """Raised inside a scenario when the attack got away with it."""


def run_scenario(name, cfg=None):
    cfg = cfg or AttackConfig()
    sc = SCENARIOS[name]
    t0 = time.perf_counter()
    try:
        res = sc.func(cfg)
    except Undetected as e:
        res = AttackResult(name, UNDETECTED, detail=str(e))
    except VmStopped as e:
        if sc.expected == NOT_FLAGGED and e.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED):
            res = AttackResult(name, FALSE_POSITIVE, detail=f"flagged with no tamper: {e}")
        else:
            res = AttackResult(name, ERROR, detail=f"VmStopped: {e}")
    except Exception as e:      # a crash is a finding, not a traceback on the terminal
        res = AttackResult(name, ERROR, detail=f"{e.__class__.__name__}: {e}")
        if os.environ.get("HV_DEBUG"):
            traceback.print_exc(file=sys.stderr)
    res.name = name
    res.category = sc.category
    res.expected = sc.expected
    res.elapsed_s = time.perf_counter() - t0
    return res


def run_scenarios(names=None, cfg=None, on_result=None):
    names = list(SCENARIOS) if not names else names
    out = []
    for n in names:
        r = run_scenario(n, cfg)
        out.append(r)
        if on_result:
            on_result(r)
    return out




def scenario_names(category=None):
    return [n for n, s in SCENARIOS.items() if category is None or s.category == category]


def summarize(results):
    out = {k: 0 for k in OUTCOMES}
    for r in results:
        out[r.outcome] = out.get(r.outcome, 0) + 1
    out["total"] = len(results)
    out["failed"] = sum(1 for r in results if not r.ok)
    return {k: v for k, v in out.items() if v or k in ("total", "failed", UNDETECTED)}
