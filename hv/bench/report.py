"""Machine facts, headline figures and targets, plots and the text report.

Every headline figure is a ratio of two sides doing the same work, measured
in the same run; `SIDES` says, for each, what each side includes, and the text
report prints it beside the figure."""
import datetime
import os
import platform

from hv.bench.common import GiB, MiB


def _cpus_idle(affinity, load1):
    """CPUs this process may run on that the 1-minute load average leaves free."""
    return max(0, int(round(affinity - load1)))


def machine_info():
    cpu = platform.processor() or ""
    hyp = None
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(200000)
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        hyp = " hypervisor " in text.replace("\n", " ")
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    load = os.getloadavg()
    from nptcore import available_backends
    return {"cpu": cpu, "cpus": os.cpu_count(), "cpus_allowed": affinity,
            "mem_gib": round(mem / GiB, 1) if mem else None,
            "kernel": platform.release(), "python": platform.python_version(),
            "running_under_hypervisor": hyp, "kvm": os.path.exists("/dev/kvm"),
            "loadavg_at_start": [round(x, 2) for x in load],
            "cpus_idle": _cpus_idle(affinity, load[0]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "backends": available_backends()}


def _get(res, section, key):
    v = res.get(section, {}).get(key)
    return v if isinstance(v, (int, float)) else None


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


# what each side of each headline figure includes
SIDES = {
    "guest_speed_vs_unicorn": (
        "plain Unicorn / hv boot, the worse of compute and memtouch (firsttouch beside it)",
        "hv: TLB fill walks the guest's tables and the PSP's NPT (C hook), each NPT miss an "
        "NPF through the PSP (UPDATE_NPT: line-hash checks, scrub, commit), C block hook "
        "counting instructions; same RAM size",
        "Unicorn: same image, same RAM size, UC_TLB_VIRTUAL, identity fill granting the same "
        "per-access permissions (C hook, as hv's), the same C block hook; no guest walk, no "
        "NPT, no PSP; the host kernel allocates the same pages at the guest's writes"),
    "guest_speed_vs_unicorn_none": (
        "plain Unicorn / hv boot --protect none, the worse of compute and memtouch",
        "hv --protect none: the same VMM and vCPU, the same C NPF path, but no PSP: the VMM "
        "writes the leaf itself (what is left is the NPT: the 2D walk and the NPF exit)",
        "Unicorn: as above"),
    "guest_speed_vs_unicorn_flat": (
        "flat Unicorn / hv boot on compute",
        "hv: as above",
        "Unicorn: all RAM one RWX mapping, no hooks, no counting (every store through the "
        "self-modifying-code check)"),
    "npf_first_touch_vs_kvm": (
        "hv first touch / KVM in-kernel demand fault, per page",
        "hv: firsttouch guest writes each page once: NPF exit, VMM frame allocation, PSP "
        "UPDATE_NPT (in-process, merkle; digest check and update), host page allocated and "
        "zeroed by the kernel at the guest's write, the write",
        "KVM: a guest writes one byte per page of a fresh memslot: EPT/NPT violation, "
        "get_user_pages, zeroing, map, resume (all in the kernel)"),
    "npf_replay_us_4k": (
        "µs per NPF of a trace replay (4 KiB)",
        "walk miss, VMM allocation, PSP UPDATE_NPT (in-process, merkle); the frames are never "
        "written: no host page allocation or zeroing", ""),
    "merkle_update_growth": (
        "merkle UPDATE_NPT at the largest mapped size / at 16 MiB",
        "the C update (psp_mailbox_update; no VMM, client or transport), random GPAs over the "
        "mapped range, a fresh page in an existing table, and the deferred tree work (the flush "
        "GUEST_STATUS/VERIFY start with) after every update; merkle_update_growth_batched: the "
        "flush once per round, shared by updates with common ancestors; "
        "merkle_c_update_growth: the C update without the flush (the flush runs in the Python "
        "model and is most of the figure: its constant dilutes the growth, see the integrity "
        "table); Python's cyclic GC off in the timing, as timeit does", ""),
    "full_update_growth": (
        "full UPDATE_NPT at the largest mapped size / at 16 MiB",
        "the firmware's mailbox entry; every update re-hashes the whole table", ""),
    "kvm_psp_npf_vs_kvm": (
        "firsttouch on KVM through hv / the same guest on a plain memslot, per page",
        "hv: every first touch exits to the VMM (MMIO or emulation exit), PSP UPDATE_NPT, the "
        "frame the table names mmap'd into the memslot, resume",
        "KVM: all RAM one anonymous memslot, each first touch KVM's in-kernel demand fault"),
    "kvm_guest_speedup": (
        "compute under hv boot: emulator time / KVM time", "", ""),
    "psp_roundtrip_us_process_p50": (
        "µs per empty command (NOP) to the PSP process, median (p99 beside it)",
        "pack, doorbell, the PSP process's wake-up or spin, answer, VMM's wake-up; needs two "
        "free CPUs (cpus_idle)", ""),
}


def _headline(res):
    npf = res.get("npf", {})
    kvm = res.get("kvm", {})
    g = res.get("guest", {})
    m = res.get("machine", {})
    kf = kvm.get("kvm_fault_us")
    ft = {k: (g.get(f"first_touch_{k}") or {}).get("us_per_page") for k in ("4k", "fa16", "2m")}
    h = {
        "cpus_idle": m.get("cpus_idle"),
        "walk_c_vs_python": _get(res, "walks", "walk_c_vs_python"),
        "walk_c_vs_floor": _get(res, "walks", "walk_c_vs_floor"),
        "merkle_update_growth": _get(res, "integrity", "merkle_update_growth"),
        "merkle_update_growth_batched": _get(res, "integrity", "merkle_update_growth_batched"),
        "merkle_c_update_growth": _get(res, "integrity", "merkle_c_update_growth"),
        "full_update_growth": _get(res, "integrity", "full_update_growth"),
        "npf_replay_us_4k": npf.get("4k", {}).get("us_per_fault"),
        "npf_replay_us_per_page_fa16": npf.get("fa16", {}).get("us_per_page"),
        "npf_replay_us_per_page_2m": npf.get("2m", {}).get("us_per_page"),
        "npf_first_touch_us": ft["4k"],
        "npf_first_touch_us_fa16": ft["fa16"],
        "npf_first_touch_us_2m": ft["2m"],
        "npf_first_touch_vs_kvm": _ratio(ft["4k"], kf),
        "npf_first_touch_fa16_vs_kvm": _ratio(ft["fa16"], kf),
        "npf_first_touch_2m_vs_kvm": _ratio(ft["2m"], kf),
        "kvm_fault_us": kf,
        "kvm_exit_us": kvm.get("kvm_exit_us"),
        "kvm_psp_npf_us": _get(res, "kvm_accel", "kvm_psp_npf_us"),
        "kvm_fault_us_same_guest": _get(res, "kvm_accel", "kvm_fault_us_same_guest"),
        "kvm_psp_npf_vs_kvm": _get(res, "kvm_accel", "kvm_psp_npf_vs_kvm"),
        "kvm_psp_npf_fa16_vs_kvm": _get(res, "kvm_accel", "kvm_fa16_vs_kvm"),
        "kvm_psp_npf_2m_vs_kvm": _get(res, "kvm_accel", "kvm_2m_vs_kvm"),
        "kvm_guest_speedup": _get(res, "kvm_accel", "kvm_guest_speedup"),
        "replay_accesses_per_s": _get(res, "replay", "replay_accesses_per_s"),
        "guest_speed_vs_unicorn": g.get("guest_speed_vs_unicorn"),
        "guest_speed_vs_unicorn_compute": (g.get("speed_compute") or {}).get("vs_unicorn"),
        "guest_speed_vs_unicorn_memtouch": (g.get("speed_memtouch") or {}).get("vs_unicorn"),
        "guest_speed_vs_unicorn_firsttouch": (g.get("speed_firsttouch") or {}).get("vs_unicorn"),
        "guest_speed_vs_unicorn_nocount": (g.get("speed_compute") or {}).get("vs_unicorn_nocount"),
        "guest_speed_vs_unicorn_flat": g.get("guest_speed_vs_unicorn_flat"),
        "guest_speed_vs_unicorn_none": g.get("guest_speed_vs_unicorn_none"),
        "sha256_mb_s": _get(res, "sha256", "sha256_mb_s"),
        "replay_rss_growth_16g_vs_1g": _get(res, "memory", "replay_rss_growth_16g_vs_1g"),
        "boot_rss_growth_16g_vs_1g": _get(res, "memory", "boot_rss_growth_16g_vs_1g"),
        "psp_roundtrip_us_process_p50": _get(res, "psp", "psp_roundtrip_us_process"),
        "psp_roundtrip_us_process_p99": _get(res, "psp", "psp_roundtrip_us_process_p99"),
        "psp_roundtrip_us_inprocess_p50": _get(res, "psp", "psp_roundtrip_us_inprocess"),
        "psp_roundtrip_us_inprocess_p99": _get(res, "psp", "psp_roundtrip_us_inprocess_p99"),
        "psp_ring_us_per_cmd": _get(res, "psp", "psp_ring_us_per_cmd"),
        "psp_ring_us_per_cmd_resident": _get(res, "psp", "psp_ring_us_per_cmd_resident"),
    }
    res.update(h)

    def tgt(value, ok, what):
        return {"value": value, "met": None if value is None else bool(ok(value)), "target": what}
    res["targets"] = {
        "walk_c_vs_python": tgt(h["walk_c_vs_python"], lambda v: v >= 100, ">= 100x"),
        "walk_c_vs_floor": tgt(h["walk_c_vs_floor"], lambda v: v <= 3, "<= 3x"),
        "merkle_update_growth": tgt(h["merkle_update_growth"], lambda v: v <= 1.3,
                                    "<= 1.3x, 16 MiB -> largest"),
        "npf_first_touch_vs_kvm": tgt(h["npf_first_touch_vs_kvm"], lambda v: v <= 1.5,
                                      "<= 1.5x KVM per page"),
        "kvm_psp_npf_vs_kvm": tgt(h["kvm_psp_npf_vs_kvm"], lambda v: v <= 3,
                                  "<= 3x KVM's in-kernel fault (guest on KVM)"),
        "kvm_psp_npf_fa16_vs_kvm": tgt(h["kvm_psp_npf_fa16_vs_kvm"], lambda v: v <= 0.7,
                                       "<= 0.7x per page"),
        "kvm_guest_speedup": tgt(h["kvm_guest_speedup"], lambda v: v >= 20,
                                 ">= 20x the emulator (compute)"),
        "replay_accesses_per_s": tgt(h["replay_accesses_per_s"], lambda v: v >= 1e6, ">= 1M/s"),
        "guest_speed_vs_unicorn": tgt(h["guest_speed_vs_unicorn"], lambda v: v >= 0.9,
                                      ">= 0.9x plain Unicorn"),
        "psp_roundtrip_us_process_p50": tgt(h["psp_roundtrip_us_process_p50"], lambda v: v <= 10,
                                            "<= 10 µs median"),
        "psp_ring_us_per_cmd": tgt(h["psp_ring_us_per_cmd"], lambda v: v < 2, "< 2 µs per command"),
    }


# ---------------------------------------------------------------------------
# plots
def _mib_axis(a, xs):
    """log2 x axis over mapped sizes, ticks labelled in MiB / GiB."""
    a.set_xscale("log", base=2)
    a.set_xticks(xs)
    a.set_xticklabels([f"{int(x // 1024)} GiB" if x >= 1024 else f"{int(x)} MiB" for x in xs])
    a.set_xlabel("mapped guest memory")


def _stamp(fig, res):
    m = res.get("machine", {})
    fig.text(0.01, 0.005, f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs ({m.get('cpus_idle', '?')} "
             f"idle at start), Linux {m.get('kernel', '?')}; profile {res.get('profile')}; "
             f"{m.get('date', '')}", fontsize=7, color="0.35")


NO_MATPLOTLIB = {"skipped": "matplotlib not installed (pip install matplotlib)"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or None without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(res, out_dir):
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    os.makedirs(out_dir, exist_ok=True)
    files = []

    def save(fig, name):
        _stamp(fig, res)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        f = os.path.join(out_dir, name)
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)

    integ = res.get("integrity", {}).get("rows")
    if integ:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
        for mode, style in (("full", "o-"), ("merkle", "s-")):
            rows = integ[mode]
            x = [r["mapped"] / MiB for r in rows]
            a1.plot(x, [r["update_us"] for r in rows], style, label=mode)
            a2.plot(x, [r["check_us"] / 1e3 for r in rows], style, label=mode)
        for a, t, yl in ((a1, "UPDATE_NPT (firmware; merkle incl. deferred work)",
                          "µs per update"),
                         (a2, "full check (VERIFY)", "ms per check")):
            _mib_axis(a, [r["mapped"] / MiB for r in integ["merkle"]])
            a.set_yscale("log")
            a.set_ylabel(yl)
            a.set_title(t)
            a.grid(True, which="both", alpha=0.3)
            a.legend()
        save(fig, "integrity_vs_mapped.png")
    walks = res.get("walks", {}).get("rows")
    if walks:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
        x = [r["mapped"] / MiB for r in walks]
        for key, label in (("c_batch_ns", "C batch"), ("c_single_ns", "C single call"),
                           ("python_ns", "pure Python"), ("floor_ns", "C floor (4 loads)")):
            a1.plot(x, [r[key] for r in walks], "o-", label=label)
        a1.set_yscale("log")
        a1.set_ylabel("ns per walk")
        a1.set_title("NPT walk cost")
        a2.plot(x, [r["c_vs_python"] for r in walks], "o-", label="Python / C batch (x)")
        a2.plot(x, [r["c_vs_floor"] for r in walks], "s-", label="C batch / floor (x)")
        a2.set_yscale("log")
        a2.set_ylabel("ratio (x)")
        a2.set_title("walk ratios")
        for a in (a1, a2):
            _mib_axis(a, x)
            a.grid(True, which="both", alpha=0.3)
            a.legend()
        save(fig, "walk_ratios.png")
    g = res.get("guest", {})
    kf = res.get("kvm_fault_us")
    if g.get("first_touch_4k"):
        fig, a = plt.subplots(figsize=(7, 4.2))
        names = ["4 KiB", "fault-around 16", "2 MiB"]
        vals = [g[f"first_touch_{k}"]["us_per_page"] for k in ("4k", "fa16", "2m")]
        a.bar(names, vals, color="tab:blue", label="hv first touch (NPF through the PSP)")
        if kf:
            a.axhline(kf, color="tab:red", linestyle="--", label=f"KVM in-kernel fault ({kf:.2f} µs)")
        a.set_ylabel("µs per page")
        a.set_title("first touch of a page, per page")
        a.legend()
        save(fig, "first_touch.png")
    return files


# ---------------------------------------------------------------------------
# text
def _fmt(v, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 1e5 else f"{v:,.0f}"
    else:
        s = f"{v:,}" if isinstance(v, int) else str(v)
    return f"{s} {unit}".rstrip()


def _table(title, header, rows):
    """An aligned text table (first column left, the others right)."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = [title]
    for k, r in enumerate(cells):
        out.append("  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                                    for i, c in enumerate(r)))
        if k == 0:
            out.append("  " + "  ".join("-" * x for x in w))
    return out


def _size(n):
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB"


def format_report(res):
    """Human-readable report: tables with units, what each side includes."""
    m = res["machine"]
    lines = [f"hv bench ({res['profile']}), {m.get('date', '')}: {m['cpu']}, {m['cpus']} CPUs "
             f"({m.get('cpus_idle')} idle at start, load {m['loadavg_at_start'][0]}), "
             f"{m['mem_gib']} GiB, Linux {m['kernel']}, Python {m['python']}"]
    if m.get("cpus_idle") is not None and m["cpus_idle"] < 2:
        lines.append("  NOTE: fewer than two CPUs were idle at the start: the PSP-process round "
                     "trip needs both (VMM and PSP) and reads high on a busy machine")
    for err in res.get("errors", []):
        lines.append(f"  ERROR in section {err}")
    w = res.get("walks", {}).get("rows", [])
    if w:
        lines += [""] + _table("NPT walk, ns per walk (random GPAs over the mapped range)",
                               ["mapped", "C batch", "C single", "Python", "C floor", "Py/C",
                                "C/floor"],
                               [[_size(r["mapped"]), _fmt(r["c_batch_ns"], "ns"),
                                 _fmt(r["c_single_ns"], "ns"), _fmt(r["python_ns"], "ns"),
                                 _fmt(r["floor_ns"], "ns"), _fmt(r["c_vs_python"], "x"),
                                 _fmt(r["c_vs_floor"], "x")] for r in w])
    ig = res.get("integrity", {}).get("rows", {})
    if ig:
        rows = []
        for a, b in zip(ig.get("merkle", []), ig.get("full", [])):
            rows.append([_size(a["mapped"]), a["table_pages"], _fmt(a["update_us"], "µs"),
                         _fmt(a.get("update_batched_us"), "µs"),
                         _fmt(a.get("update_c_only_us"), "µs"),
                         _fmt(b["update_us"], "µs"), _fmt(a["check_us"] / 1e3, "ms"),
                         _fmt(b["check_us"] / 1e3, "ms")])
        lines += [""] + _table("integrity: UPDATE_NPT (firmware only; merkle: the C update + "
                               "deferred tree work, flushed per update / per round; and the C "
                               "update alone) and full check (VERIFY)",
                               ["mapped", "tables", "merkle upd", "merkle batched", "merkle C only",
                                "full upd", "merkle check", "full check"], rows)
    g = res.get("guest", {})
    npf = res.get("npf", {})
    kf = res.get("kvm_fault_us")
    rows = []
    for k, label in (("4k", "4 KiB"), ("fa16", "fault-around 16"), ("2m", "2 MiB")):
        ft = g.get(f"first_touch_{k}") or {}
        rp = npf.get(k) or {}
        rows.append([label, _fmt(ft.get("us_per_page"), "µs"), _fmt(ft.get("npf")),
                     _fmt(_ratio(ft.get("us_per_page"), kf), "x"), _fmt(rp.get("us_per_page"), "µs")])
    if g or npf:
        lines += [""] + _table(f"NPF path, µs per page (KVM in-kernel demand fault: {_fmt(kf, 'µs')})",
                               ["page size", "first touch", "NPFs", "vs KVM", "replay (no alloc)"],
                               rows)
    sp = [(n, g.get(f"speed_{n}")) for n in ("compute", "memtouch", "firsttouch")]
    if any(s for _, s in sp):
        lines += [""] + _table("guest speed: plain Unicorn time / hv boot time (1.0 = no cost)",
                               ["guest", "insns", "hv boot", "per-access+count", "none",
                                "uncounted", "flat RWX", "diff/NPF", "PSP/NPF"],
                               [[n, _fmt(s["instructions"]), _fmt(s["hv_s"] * 1e3, "ms"),
                                 _fmt(s["vs_unicorn"], "x"), _fmt(s.get("none_vs_unicorn"), "x"),
                                 _fmt(s["vs_unicorn_nocount"], "x"),
                                 _fmt(s["vs_unicorn_flat"], "x"),
                                 _fmt(s.get("extra_us_per_npf"), "µs"),
                                 _fmt(s.get("psp_us_per_npf"), "µs")] for n, s in sp if s])
    ps = res.get("psp", {})
    if ps and "error" not in ps:
        lines += [""] + _table("PSP mailbox round trip (empty command) and ring",
                               ["transport", "p50", "p99", "ring UPDATE_NPT"],
                               [["in-process", _fmt(ps.get("psp_roundtrip_us_inprocess"), "µs"),
                                 _fmt(ps.get("psp_roundtrip_us_inprocess_p99"), "µs"), "-"],
                                ["process", _fmt(ps.get("psp_roundtrip_us_process"), "µs"),
                                 _fmt(ps.get("psp_roundtrip_us_process_p99"), "µs"),
                                 _fmt(ps.get("psp_ring_us_per_cmd"), "µs/cmd")]])
    other = [["SHA-256", _fmt(res.get("sha256_mb_s"), "MB/s")],
             ["replay throughput", _fmt(res.get("replay_accesses_per_s"), "accesses/s")],
             ["KVM exit round trip", _fmt(res.get("kvm_exit_us"), "µs")],
             ["replay peak RSS 16G/1G host mem", _fmt(res.get("replay_rss_growth_16g_vs_1g"), "x")],
             ["boot peak RSS 16G/1G host mem", _fmt(res.get("boot_rss_growth_16g_vs_1g"), "x")]]
    lines += [""] + _table("other", ["figure", "value"], other)
    tg = res.get("targets", {})
    lines += [""] + _table("targets", ["figure", "value", "target", "met"],
                           [[k, _fmt(t["value"]), t["target"],
                             "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")]
                            for k, t in tg.items()])
    lines += ["", "what each side of a ratio includes:"]
    for k, (what, a, b) in SIDES.items():
        lines.append(f"  {k}: {what}")
        for s in (a, b):
            if s:
                lines.append(f"      {s}")
    if res.get("plots") and not isinstance(res["plots"], dict):
        lines += [""] + [f"plot written: {f}" for f in res["plots"]]
    return "\n".join(lines)
