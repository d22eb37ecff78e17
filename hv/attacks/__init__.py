"""The malicious-hypervisor attack suite (`hv attack`).

Each scenario is one function that builds a fresh VMM, runs a victim guest
(and usually a second, innocent guest), and then acts as a malicious VMM
would, using nothing but the public API an outsider has: `vmm.mem` (write
any byte of host memory, NPT pages included), `vmm.psp` (send any PSP
command with any arguments: typed methods or `raw`), `vmm.engine` (walk the
tables as the CPU does) and threads. It reports one outcome:

  refused       the PSP rejected every malicious command, nothing changed
  detected      the tamper was caught: by the next UPDATE_NPT (an NPF) or by
                the periodic check; the guest is then stopped for good
                (every later command GUEST_STOPPED) and the other guest
                carries on
  not_flagged   the benign scenario (hardware Accessed/Dirty bit updates):
                correctly *not* reported as tampering
  undetected    the attack got away with it (a bug)
  false_positive  the benign scenario was reported as tampering (a bug)
  skipped       not applicable in this configuration (e.g. no guest images)
  error         the scenario itself crashed (a bug in it or in the VMM)

`undetected`, `false_positive` and `error` are failures (`hv attack` exits 1).

exposure_insns: how much guest work ran while the tampered mapping was
live: from the tamper to the detection. With the guest driver (a real toy
guest on the emulated CPU, hv.boot) it counts guest instructions; with the
trace driver (a synthetic access loop through the NPT walker, one access
per instruction, as a fault trace replays them) it counts guest memory
accesses. `exposure_unit` says which. `tampered_hits` counts the accesses
that actually went through the tampered entry. Refused attacks have 0;
the benign scenario has null.

Not in the suite, by design: a VMM that tampers and restores the entry
before the next check is not seen by any digest; what it gets is bounded by
the check interval (the exposure the detected scenarios measure), which is
why the interval is counted in guest instructions (--check-insns).

    from hv.attacks import run_scenarios, SCENARIOS, AttackConfig
    results = run_scenarios(["severed_remap"], AttackConfig(check_every=256))

Modules: registry.py (outcomes, results, config, `@scenario`, running),
lab.py (the lab and the trace driver), by_write.py (tampers by writing the
table: detected), by_command.py (crafted commands: refused), timing.py
(races, the wall-clock periodic check, the benign A/D updates), guest.py (the
same attacks driven by a real toy guest). Imports hv.vmm, hv.machine,
hv.trace, nptcore and psp_firmware's public API; never hv.cli.
"""
# the scenario modules register themselves with the registry on import
from hv.attacks import by_command, by_write, timing  # noqa: F401
from hv.attacks.guest import load_guest_scenarios
from hv.attacks.lab import Lab, entry_addr, frame_of
from hv.attacks.registry import (CATEGORIES, DETECTED, ERROR, FAILURES, FALSE_POSITIVE,
                                 NOT_FLAGGED, OUTCOMES, PREVENTED, REFUSED, SCENARIOS, SKIPPED, UNDETECTED,
                                 AttackConfig, AttackResult, Scenario, run_scenario,
                                 run_scenarios, scenario_names, summarize)

__all__ = ["CATEGORIES", "DETECTED", "ERROR", "FAILURES", "FALSE_POSITIVE", "NOT_FLAGGED",
           "OUTCOMES", "PREVENTED", "REFUSED", "SCENARIOS", "SKIPPED", "UNDETECTED", "AttackConfig",
           "AttackResult", "Lab", "Scenario", "entry_addr", "frame_of", "load_guest_scenarios",
           "run_scenario", "run_scenarios", "scenario_names", "summarize"]
