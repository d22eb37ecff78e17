"""`hv compare --plot DIR`: the outcome heatmap and the cost bars (matplotlib)."""
import os

# outcome -> (color, short label); what a design achieved, best first
_OUTCOME_STYLE = {
    "prevented": ("#1a9850", "prev"), "refused": ("#66bd63", "ref"),
    "detected": ("#a6d96a", "det"), "not_flagged": ("#d9ef8b", "ok"),
    "undetected": ("#d73027", "UNDET"), "false_positive": ("#f46d43", "FP"),
    "skipped": ("#bdbdbd", "skip"), "error": ("#000000", "ERR"),
}
_COSTS = (("npf_first_touch_us", "µs per page", "first-touch NPF (firsttouch guest, PSP process)"),
          ("walk_ns", "ns per walk", "nested walk, C batch, 1 GiB"),
          ("check_ms_1g", "ms per check", "periodic check, 1 GiB mapped"),
          ("check_ms_16g", "ms per check", "periodic check, 16 GiB mapped"),
          ("psp_bytes_per_gib", "MiB per GiB mapped", "PSP private memory"),
          ("guest_mips", "M guest insns/s", "compute guest speed"))


def _label(res):
    m = res.get("machine", {})
    return (f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, Linux {m.get('kernel', '?')} "
            f"- {res.get('date', '')}{' (quick)' if res.get('quick') else ''}")


def plot(res, out_dir):
    from hv.bench.report import NO_MATPLOTLIB, pyplot
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    from matplotlib.colors import ListedColormap
    os.makedirs(out_dir, exist_ok=True)
    files = []
    designs = res["designs"]
    matrix = res.get("matrix")
    if matrix:
        names = list(matrix)
        kinds = list(_OUTCOME_STYLE)
        grid = [[kinds.index(matrix[n].get(d, {}).get("outcome", "skipped")) for d in designs]
                for n in names]
        fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(designs), 1.2 + 0.28 * len(names)))
        ax.imshow(grid, cmap=ListedColormap([_OUTCOME_STYLE[k][0] for k in kinds]),
                  vmin=-0.5, vmax=len(kinds) - 0.5, aspect="auto")
        for i, n in enumerate(names):
            for j, d in enumerate(designs):
                cell = matrix[n].get(d)
                if not cell:
                    continue
                text = _OUTCOME_STYLE[cell["outcome"]][1]
                if cell["outcome"] == "detected" and cell.get("exposure") is not None:
                    text += f" {cell['exposure']}"
                if not cell.get("matches", True):
                    text += " !"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if cell["outcome"] in ("undetected", "error", "prevented")
                        else "black")
        ax.set_xticks(range(len(designs)))
        ax.set_xticklabels(designs)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.xaxis.tick_top()
        ax.set_title("attack outcome per design (det N: detected after N accesses/insns of "
                     "exposure; ! differs from the expectation)\n" + _label(res), fontsize=8)
        fig.tight_layout()
        f = os.path.join(out_dir, "compare_outcomes.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    costs = res.get("costs")
    if costs:
        fig, axes = plt.subplots(2, 3, figsize=(13, 7))
        for ax, (key, unit, title) in zip(axes.flat, _COSTS):
            vals = []
            for d in designs:
                v = costs.get(d, {}).get(key)
                if v is not None and key == "psp_bytes_per_gib":
                    v = v / (1 << 20)
                vals.append(v)
            xs = [i for i, v in enumerate(vals) if v is not None]
            bars = ax.bar(xs, [vals[i] for i in xs], color="#4575b4")
            for b, i in zip(bars, xs):
                ax.annotate(f"{vals[i]:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(designs)))
            ax.set_xticklabels(designs, rotation=20, fontsize=8)
            ax.set_ylabel(unit)
            ax.set_title(title, fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle("cost per protection design - " + _label(res), fontsize=9)
        fig.tight_layout()
        f = os.path.join(out_dir, "compare_costs.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files
