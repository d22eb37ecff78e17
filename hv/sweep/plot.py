"""--plot: each swept axis against NPFs and time (matplotlib, optional).

One column of panels per axis that has more than one value; one row per
metric (``npf``, and the time one: ``psp_s`` where the reports have it,
else ``elapsed_s``, the command's own measured run time).  In a panel,
each thin line joins the points that differ only in that axis (same input,
same other axis values); the thick line is the median over them.
"""
import statistics

from ..errors import BadInput

__all__ = ["plot_rows", "METRICS"]

METRICS = ("npf", ("psp_s", "elapsed_s"))
_LABELS = {"npf": "NPFs", "psp_s": "PSP time (s)", "elapsed_s": "elapsed_s: run time (s)"}


def _metric_names(rows):
    out = []
    for m in METRICS:
        for name in (m,) if isinstance(m, str) else m:
            if any(isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)
                   for r in rows):
                out.append(name)
                break
    return out


def _order(values):
    def key(v):
        return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) \
            else (1, 0, str(v))
    return sorted(values, key=key)


def plot_rows(rows, axes, path):
    """Draw ``rows`` (results rows) against ``axes`` (the SPEC's axis names)
    into ``path`` (PNG, SVG or PDF, by its suffix).  Returns the path, or
    None when there is nothing to draw (no axis with two values, or no row
    with the metrics)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("--plot needs matplotlib: pip install 'hv[plot]'") from None
    good = [r for r in rows if not r.get("error")]
    swept = [a for a in axes if len({str(r.get(a)) for r in good if a in r}) > 1]
    metrics = _metric_names(good)
    if not swept or not metrics:
        return None
    fig, grid = plt.subplots(len(metrics), len(swept), squeeze=False,
                             figsize=(4.2 * len(swept), 3.2 * len(metrics)))
    for c, axis in enumerate(swept):
        values = _order({r[axis] for r in good if _has(r, axis)})
        xs = {v: i for i, v in enumerate(values)}
        for m_i, metric in enumerate(metrics):
            ax = grid[m_i][c]
            groups = {}
            for r in good:
                if not _has(r, axis) or not isinstance(r.get(metric), (int, float)):
                    continue
                others = tuple((a, str(r.get(a))) for a in axes if a != axis)
                groups.setdefault((r["input"], others), []).append((xs[r[axis]], r[metric]))
            thin = 0.6 if len(groups) <= 20 else 0.25
            for pts in groups.values():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue",
                        alpha=thin, linewidth=0.8, marker="o", markersize=2.5)
            med = []
            for v, x in xs.items():
                ys = [r[metric] for r in good if _has(r, axis) and r[axis] == v
                      and isinstance(r.get(metric), (int, float))]
                if ys:
                    med.append((x, statistics.median(ys)))
            if med:
                ax.plot([p[0] for p in med], [p[1] for p in med], color="tab:red",
                        linewidth=2.2, label="median")
            ys = [p[1] for g in groups.values() for p in g]
            if ys and min(ys) > 0 and max(ys) / min(ys) > 50:
                ax.set_yscale("log")
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels([str(v) for v in values])
            ax.set_xlabel(f"--{axis}")
            ax.set_ylabel(_LABELS.get(metric, metric))
            ax.grid(alpha=0.3)
            if m_i == 0 and c == 0 and med:
                ax.legend(fontsize="small")
    fig.suptitle(f"hv sweep: {len(good)} points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _has(row, axis):
    return axis in row and row[axis] is not None
