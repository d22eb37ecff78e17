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
PREVENTED = "prevented"     # the design made the tamper impossible (isolated: the store faults)
UNDETECTED, FALSE_POSITIVE, SKIPPED, ERROR = "undetected", "false_positive", "skipped", "error"
OUTCOMES = (REFUSED, PREVENTED, DETECTED, NOT_FLAGGED, UNDETECTED, FALSE_POSITIVE, SKIPPED, ERROR)
# outcomes that are a failure whatever was expected (undetected is expected
# of some designs: under none nearly every tamper is)
FAILURES = (FALSE_POSITIVE, ERROR)
DESIGNS = ("digest", "isolated", "rmp", "none")


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
    design: str = "digest"           # the protection design it ran under

    @property
    def ok(self):
        """The outcome is the one the scenario states for this design (a
        skipped scenario is not a difference)."""
        if self.outcome in FAILURES:
            return False
        return self.outcome == SKIPPED or not self.expected or self.outcome == self.expected

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
    protect: str = "digest"          # the protection design (docs/designs.md)
    psp: str = None                  # None: process for isolated (it needs it), else inprocess
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
                   shared_mem=self.accel == "kvm", protect=self.protect)

    @property
    def design(self):
        """The design's name as hv compare shows it (digest-full, rmp, ...)."""
        if self.protect == "digest":
            return f"digest-{self.integrity or 'merkle'}"
        return self.protect


@dataclass
class Scenario:
    name: str
    func: object
    category: str
    expect: dict                     # design -> the outcome it expects (hv/attacks/expect.py)
    doc: str
    driver: str = "trace"

    @property
    def expected(self):
        """The expectation under the default design (digest)."""
        return self.expect["digest"]

    def expected_for(self, protect):
        return self.expect[protect]


SCENARIOS = {}

# the attack classes of the threat model (docs/designs.md); every one is covered
CATEGORIES = (
    "severed_remap", "alias", "replay", "permission_escalation", "table_swap", "root_swap",
    "bad_hpa", "range", "race", "reclaim", "benign", "periodic",
)


def scenario(name, category, expect, driver="trace"):
    """Register a scenario; `expect` maps every design to the outcome it
    expects there (hv/attacks/expect.py says how each is derived)."""
    if set(expect) != set(DESIGNS) or not set(expect.values()) <= set(OUTCOMES):
        raise ValueError(f"scenario {name}: expect must give an outcome for each of {DESIGNS}")

    def deco(fn):
        SCENARIOS[name] = Scenario(name, fn, category, dict(expect),
                                   (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
                                   driver)
        return fn
    return deco


class Undetected(Exception):
    """Raised inside a scenario when the attack got away with it."""


class Prevented(Exception):
    """Raised inside a scenario when the design made the tamper impossible
    (isolated: the VMM's store to a table or control page faulted)."""


def run_scenario(name, cfg=None):
    cfg = cfg or AttackConfig()
    sc = SCENARIOS[name]
    t0 = time.perf_counter()
    expected = sc.expected_for(cfg.protect)
    try:
        res = sc.func(cfg)
    except Undetected as e:
        res = AttackResult(name, UNDETECTED, detail=str(e))
    except Prevented as e:
        res = AttackResult(name, PREVENTED, exposure_insns=0, detail=str(e))
    except VmStopped as e:
        if expected == NOT_FLAGGED and e.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED,
                                                    Status.RMP_FAULT):
            res = AttackResult(name, FALSE_POSITIVE, detail=f"flagged with no tamper: {e}")
        else:
            res = AttackResult(name, ERROR, detail=f"VmStopped: {e}")
    except Exception as e:      # a crash is a finding, not a traceback on the terminal
        res = AttackResult(name, ERROR, detail=f"{e.__class__.__name__}: {e}")
        if os.environ.get("HV_DEBUG"):
            traceback.print_exc(file=sys.stderr)
    res.name = name
    res.category = sc.category
    res.expected = expected
    res.design = cfg.design
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
