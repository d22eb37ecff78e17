"""`hv compare`: every protection design on the same attacks and costs, side by side.

One run: the attack matrix (every scenario of `hv attack` under each design,
its outcome and exposure against the expectation the scenario states for
that design) and the costs of each design (hv/bench/designs.py), with
`--plot DIR` an outcome heatmap and cost bars. docs/designs.md explains the
designs and keeps a recorded run.

    from hv.compare import run
    res = run(quick=True)            # res["designs"], res["matrix"], res["costs"]

Imports hv.attacks (the matrix), hv.bench (the costs and machine facts) and
matplotlib for the plots; never hv.cli.
"""
import datetime
import time

from hv.bench.designs import DESIGN_RUNS, NPF_PATH, design_costs, walk_ns
from hv.compare.matrix import run_matrix

DESIGNS = tuple(name for name, _p, _i in DESIGN_RUNS)

__all__ = ["DESIGNS", "run", "run_matrix"]


def _select(designs):
    if designs is None:
        return list(DESIGN_RUNS)
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise ValueError(f"unknown design(s) {', '.join(unknown)} (have {', '.join(DESIGNS)})")
    return [r for r in DESIGN_RUNS if r[0] in designs]


def run(quick=False, designs=None, scenarios=None, costs=True, matrix=True, log=None,
        plot_dir=None, tiny=False):
    """The whole comparison as one dict (what `hv compare --json` prints)."""
    from hv.bench.report import machine_info
    log = log or (lambda m: None)
    runs = _select(designs)
    t0 = time.perf_counter()
    res = {"designs": [r[0] for r in runs], "quick": bool(quick),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": machine_info()}
    if matrix:
        res.update(run_matrix(runs, quick=quick, names=scenarios, log=log))
    if costs:
        res["costs"] = run_costs(runs, quick=quick, tiny=tiny, log=log)
    res["seconds"] = time.perf_counter() - t0
    if plot_dir:
        from hv.compare.plots import plot
        res["plots"] = plot(res, plot_dir)
    return res


def run_costs(runs, quick=True, tiny=False, log=None):
    log = log or (lambda m: None)
    walks = walk_ns(n=20_000 if tiny else (300_000 if quick else 1_000_000),
                    size=(64 << 20) if tiny else (1 << 30))
    out = {}
    for name, protect, integrity in runs:
        c = design_costs(protect, integrity, quick=quick or tiny, tiny=tiny, log=log)
        c["npf_path"] = NPF_PATH[name]
        if walks is not None:
            c["walk_ns"] = walks["rmp"] if protect == "rmp" else walks["plain"]
        else:
            c["walk_ns"] = None
        out[name] = c
    return out


def format_report(res):
    """The comparison as text: the matrix (one column per design) and the costs."""
    designs = res["designs"]
    lines = [f"hv compare ({res['date']}{', quick' if res.get('quick') else ''}): "
             f"{res['machine'].get('cpu')}, {res['machine'].get('cpus')} CPUs"]
    matrix = res.get("matrix")
    if matrix:
        w = max(len(n) for n in matrix)
        lines.append(f"{'scenario':<{w}}  " + "  ".join(f"{d:>13}" for d in designs))
        for name, row in matrix.items():
            cells = []
            for d in designs:
                c = row.get(d)
                if c is None:
                    cells.append(f"{'-':>13}")
                    continue
                t = c["outcome"]
                if c["outcome"] == "detected" and c.get("exposure") is not None:
                    t += f" {c['exposure']}"
                cells.append(f"{t + ('' if c['matches'] else '!'):>13}")
            lines.append(f"{name:<{w}}  " + "  ".join(cells))
        lines.append("(detected N: N accesses/instructions of exposure; ! differs from the "
                     "scenario's expectation for the design)")
        for d in designs:
            s = res["summary"].get(d, {})
            lines.append(f"  {d}: " + ", ".join(f"{k} {v}" for k, v in sorted(s.items())))
    costs = res.get("costs")
    if costs:
        keys = (("npf_first_touch_us", "us/page"), ("npf_first_touch_us_inprocess", "us/page"),
                ("walk_ns", "ns"), ("check_ms_1g", "ms"), ("check_ms_16g", "ms"),
                ("psp_bytes_per_gib", "MiB/GiB"), ("guest_mips", "M/s"))
        lines.append(f"{'cost':<30}" + "".join(f"{d:>15}" for d in designs))
        for k, unit in keys:
            row = []
            for d in designs:
                v = costs.get(d, {}).get(k)
                if v is not None and k == "psp_bytes_per_gib":
                    v = v / (1 << 20)
                row.append(f"{'-' if v is None else f'{v:.3g}':>15}")
            lines.append(f"{k + ' (' + unit + ')':<30}" + "".join(row))
    for m in res.get("mismatches", []):
        lines.append(f"DIFFERS: {m['scenario']} under {m['design']}: {m['outcome']} "
                     f"(expected {m['expected']}): {m['detail']}")
    return "\n".join(lines)
