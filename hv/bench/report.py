"""Machine facts, headline figures and targets, plots and the text report."""
import os
import platform
from hv.bench.common import GiB, MiB, _fmt_size


def machine_info():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    hyp = None
    try:
        with open("/proc/cpuinfo") as f:
            hyp = " hypervisor " in f.read(20000).replace("\n", " ")
    except OSError:
        pass
    from nptcore import available_backends
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(mem / GiB, 1) if mem else None,
            "kernel": platform.release(), "python": platform.python_version(),
            "running_under_hypervisor": hyp, "kvm": os.path.exists("/dev/kvm"),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "backends": available_backends()}



def _get(res, section, key):
    v = res.get(section, {}).get(key)
    return v if isinstance(v, (int, float)) else None


def _headline(res):
    npf = res.get("npf", {})
    kvm = res.get("kvm", {})
    g = res.get("guest", {})
    h = {
        "walk_c_vs_python": _get(res, "walks", "walk_c_vs_python"),
        "walk_c_vs_floor": _get(res, "walks", "walk_c_vs_floor"),
        "merkle_update_growth": _get(res, "integrity", "merkle_update_growth"),
        "full_update_growth": _get(res, "integrity", "full_update_growth"),
        "npf_us_4k": npf.get("4k", {}).get("us_per_fault"),
        "npf_us_per_page_fa16": npf.get("fa16", {}).get("us_per_page"),
        "npf_us_per_page_2m": npf.get("2m", {}).get("us_per_page"),
        "kvm_fault_us": kvm.get("kvm_fault_us"),
        "kvm_exit_us": kvm.get("kvm_exit_us"),
        "replay_accesses_per_s": _get(res, "replay", "replay_accesses_per_s"),
        "guest_speed_vs_unicorn": g.get("guest_speed_vs_unicorn"),
        "memtouch_npf_us_4k": g.get("memtouch_npf_us_4k"),
        "sha256_mb_s": _get(res, "sha256", "sha256_mb_s"),
        "replay_rss_growth_16g_vs_1g": _get(res, "memory", "replay_rss_growth_16g_vs_1g"),
        "boot_rss_growth_16g_vs_1g": _get(res, "memory", "boot_rss_growth_16g_vs_1g"),
        "psp_roundtrip_us_process": _get(res, "psp", "psp_roundtrip_us_process"),
        "psp_roundtrip_us_inprocess": _get(res, "psp", "psp_roundtrip_us_inprocess"),
        "psp_ring_us_per_cmd": _get(res, "psp", "psp_ring_us_per_cmd"),
        "psp_ring_us_per_cmd_resident": _get(res, "psp", "psp_ring_us_per_cmd_resident"),
    }
    res.update(h)
    kf = h["kvm_fault_us"]

    def tgt(value, ok, what):
        return {"value": value, "met": None if value is None else bool(ok(value)), "target": what}
    res["targets"] = {
        "walk_c_vs_python": tgt(h["walk_c_vs_python"], lambda v: v >= 100, ">= 100x"),
        "walk_c_vs_floor": tgt(h["walk_c_vs_floor"], lambda v: v <= 3, "<= 3x"),
        "merkle_update_growth": tgt(h["merkle_update_growth"], lambda v: v <= 1.5,
                                    "<= 1.5x from 16 MiB to the largest size"),
        "npf_4k_vs_kvm": tgt(None if kf is None or h["npf_us_4k"] is None else h["npf_us_4k"] / kf,
                             lambda v: v <= 2, "<= 2x KVM demand fault"),
        "npf_fa16_vs_kvm": tgt(None if kf is None or h["npf_us_per_page_fa16"] is None
                               else h["npf_us_per_page_fa16"] / kf, lambda v: v <= 0.5,
                               "<= 0.5x KVM per page"),
        "npf_2m_vs_kvm": tgt(None if kf is None or h["npf_us_per_page_2m"] is None
                             else h["npf_us_per_page_2m"] / kf, lambda v: v <= 0.5,
                             "<= 0.5x KVM per page"),
        "replay_accesses_per_s": tgt(h["replay_accesses_per_s"], lambda v: v >= 1e6, ">= 1M/s"),
        "guest_speed_vs_unicorn": tgt(h["guest_speed_vs_unicorn"], lambda v: v >= 0.5, ">= 0.5x"),
        "psp_roundtrip_us_process": tgt(h["psp_roundtrip_us_process"], lambda v: v <= 10,
                                        "<= 10 us median"),
        "psp_ring_us_per_cmd": tgt(h["psp_ring_us_per_cmd"], lambda v: v < 2, "< 2 us per command"),
        "psp_ring_us_per_cmd_resident": tgt(h["psp_ring_us_per_cmd_resident"], lambda v: v < 2,
                                            "< 2 us per command (frames the VMM had touched)"),
    }


# ---------------------------------------------------------------------------
# plots
def plot(res, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib not installed (pip install matplotlib)"}
    os.makedirs(out_dir, exist_ok=True)
    files = []
    integ = res.get("integrity", {}).get("rows")
    if integ:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for mode, style in (("full", "o-"), ("merkle", "s-")):
            rows = integ[mode]
            x = [r["mapped"] / MiB for r in rows]
            a1.plot(x, [r["update_us"] for r in rows], style, label=mode)
            a2.plot(x, [r["check_us"] / 1e3 for r in rows], style, label=mode)
        for a, t, yl in ((a1, "UPDATE_NPT", "µs per update"),
                         (a2, "full check (VERIFY)", "ms per check")):
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xlabel("mapped guest memory (MiB)")
            a.set_ylabel(yl)
            a.set_title(t)
            a.grid(True, which="both", alpha=0.3)
            a.legend()
        fig.tight_layout()
        f = os.path.join(out_dir, "integrity_vs_mapped.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    walks = res.get("walks", {}).get("rows")
    if walks:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        x = [r["mapped"] / MiB for r in walks]
        for key, label in (("c_batch_ns", "C batch"), ("c_single_ns", "C single call"),
                           ("python_ns", "pure Python"), ("floor_ns", "C floor (4 loads)")):
            a1.plot(x, [r[key] for r in walks], "o-", label=label)
        a1.set_yscale("log")
        a1.set_ylabel("ns per walk")
        a1.set_title("NPT walk cost")
        a2.plot(x, [r["c_vs_python"] for r in walks], "o-", label="Python / C batch")
        a2.plot(x, [r["c_vs_floor"] * 100 for r in walks], "s-", label="C batch / floor (x100)")
        a2.set_yscale("log")
        a2.set_title("walk ratios")
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xlabel("mapped guest memory (MiB)")
            a.grid(True, which="both", alpha=0.3)
            a.legend()
        fig.tight_layout()
        f = os.path.join(out_dir, "walk_ratios.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files


def format_report(res):
    """Human-readable summary."""
    lines = []
    m = res["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem_gib']} GiB, Linux {m['kernel']}, "
                 f"Python {m['python']}")
    w = res.get("walks", {})
    for r in w.get("rows", []):
        lines.append(f"walk {_fmt_size(r['mapped']):>7}: C batch {r['c_batch_ns']:7.1f} ns  single "
                     f"{r['c_single_ns']:7.1f} ns  Python {r['python_ns']:8.0f} ns  floor "
                     f"{r['floor_ns']:6.1f} ns  C/Python {r['c_vs_python']:6.0f}x  C/floor "
                     f"{r['c_vs_floor']:.2f}x")
    ig = res.get("integrity", {})
    for mode in ("full", "merkle"):
        for r in ig.get("rows", {}).get(mode, []):
            lines.append(f"integrity {mode:>6} {_fmt_size(r['mapped']):>7}: UPDATE_NPT "
                         f"{r['update_us']:9.1f} us  check {r['check_us'] / 1e3:9.2f} ms")
    for name, r in res.get("npf", {}).items():
        if isinstance(r, dict):
            lines.append(f"npf {name:>4}: {r['us_per_fault']:8.1f} us/fault {r['us_per_page']:7.2f} us/page")
    for sec in ("replay", "kvm", "guest", "memory", "sha256"):
        r = res.get(sec)
        if r:
            lines.append(f"{sec}: " + ", ".join(f"{k}={_short(v)}" for k, v in r.items()
                                                 if k not in ("rows",)))
    lines.append("targets:")
    for k, t in res.get("targets", {}).items():
        st = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"  {k:<24} {_short(t['value']):>10}  {t['target']:<40} {st}")
    return "\n".join(lines)


def _short(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)
