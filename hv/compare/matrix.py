"""The attack matrix of `hv compare`: every scenario under every design."""
from hv.attacks import SCENARIOS, AttackConfig, load_guest_scenarios, run_scenarios
from hv.attacks.registry import SKIPPED


def design_config(protect, integrity, quick=False):
    """The AttackConfig a design's column runs with: isolated needs the PSP
    process; the others run it in process (a scenario that opens the PSP's
    check-to-write window needs the firmware object)."""
    cfg = AttackConfig(protect=protect, integrity=integrity, host_mem=128 << 20,
                       psp="process" if protect == "isolated" else "inprocess")
    if quick:
        cfg.max_slices = 16             # an undetected tamper: 16 intervals, not 64
    return cfg


def run_matrix(runs, quick=False, names=None, log=None):
    """{"matrix": {scenario: {design: cell}}, "mismatches": [...], "summary": {...}}.

    A cell: outcome, expected (the scenario's stated expectation for the
    design), matches, exposure (with its unit), detected_by."""
    log = log or (lambda m: None)
    load_guest_scenarios("auto")
    names = list(SCENARIOS) if not names else list(names)
    matrix = {n: {} for n in names}
    mismatches = []
    summary = {}
    for design, protect, integrity in runs:
        cfg = design_config(protect, integrity, quick)

        def one(r, design=design):
            cell = {"outcome": r.outcome, "expected": r.expected, "matches": r.ok,
                    "exposure": r.exposure_insns, "unit": r.exposure_unit,
                    "detected_by": r.detected_by, "driver": r.driver}
            if not r.ok or r.outcome == SKIPPED:
                cell["detail"] = r.detail
            matrix[r.name][design] = cell
            if not r.ok:
                mismatches.append({"scenario": r.name, "design": design, "outcome": r.outcome,
                                   "expected": r.expected, "detail": r.detail})
            log(f"{design:>13} {r.name:<30} {r.outcome:<12} (expected {r.expected})")
        results = run_scenarios(names, cfg, on_result=one)
        counts = {}
        for r in results:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        summary[design] = counts
    return {"matrix": matrix, "mismatches": mismatches, "summary": summary,
            "scenarios": {n: {"category": SCENARIOS[n].category, "doc": SCENARIOS[n].doc,
                              "expect": dict(SCENARIOS[n].expect)} for n in names}}
