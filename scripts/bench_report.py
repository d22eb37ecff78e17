#!/usr/bin/env python3
"""docs/benchmarks.md from a `hv bench --json` / `scripts/bench_full.py` result.

    .venv/bin/python scripts/bench_full.py --out /tmp/bench.json
    .venv/bin/python scripts/bench_report.py /tmp/bench.json > docs/benchmarks.md

Every number on the page is taken from the JSON, so that the recorded
document and the run cannot disagree; each table says what each side of its
ratios includes (hv.bench.report.SIDES).
"""
import json
import sys

MiB, GiB = 1 << 20, 1 << 30


def _size(n):
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB"


def _f(v, nd=2, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        s = f"{v:,}"
    elif abs(v) >= 1e5:
        s = f"{v:,.0f}"
    else:
        s = f"{v:.{nd}f}"
    return f"{s} {unit}".rstrip()


def _table(header, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


INTRO = """# Benchmarks: what PSP-managed nested paging costs

`hv bench [--quick] [--json] [--plot DIR] [--only SECTIONS]` measures everything
below in one run (hv/bench/); `scripts/bench_full.py` runs the long profile and
writes every figure as JSON, and `scripts/bench_report.py RESULTS.json` writes
this page from that JSON. `--plot DIR` writes `integrity_vs_mapped.png`,
`walk_ratios.png` and `first_touch.png` (each stamped with the machine, profile
and date); they are not committed.

Every ratio compares like with like: both sides do the same work in the same
run, and each table says what each side includes. Timings are wall clock,
best of `repeat` runs; nothing logs inside a timed section, and Python's
cyclic garbage collector is off inside each timed run of the guest and
integrity sections (collected just before), on both sides of a ratio, as
`timeit` does. The machine is
shared: the load at the start and the number of idle CPUs are recorded
below, and the test suite never asserts a time.
"""


def render(r):
    m = r["machine"]
    out = [INTRO, "## Machine of the recorded run", ""]
    out += _table(["", ""], [
        ["date", m.get("date", "?")],
        ["profile", r["profile"]],
        ["CPU", f"{m['cpu']}, {m['cpus']} CPUs ({m.get('cpus_allowed')} allowed), "
                f"{'under a hypervisor' if m.get('running_under_hypervisor') else 'bare metal'}"],
        ["memory", f"{m['mem_gib']} GiB"],
        ["OS", f"Linux {m['kernel']}, Python {m['python']}; NPT engines: "
               f"{', '.join(m.get('backends', []))}"],
        ["KVM", "/dev/kvm present" if m.get("kvm") else "no /dev/kvm"],
        ["load at start", f"{' / '.join(str(x) for x in m['loadavg_at_start'])} (1/5/15 min); "
                          f"{m.get('cpus_idle')} CPUs idle"],
        ["whole run", f"{r.get('total_seconds', 0):.1f} s"],
    ], ["---", "---"])
    if r.get("errors"):
        out += ["", "**Sections that failed:** " + "; ".join(r["errors"])]
    out += ["", "## Targets", ""]
    out += _table(["figure", "value", "target", "met"],
                  [[f"`{k}`", _f(t["value"], 3 if t["value"] is not None and t["value"] < 100 else 2),
                    t["target"],
                    "n/a" if t["met"] is None else ("met" if t["met"] else "**not met**")]
                   for k, t in r.get("targets", {}).items()], ["---", "---:", "---", "---"])
    from hv.bench.report import SIDES
    out += ["", "## What each side of a ratio includes", ""]
    for k, (what, a, b) in SIDES.items():
        out.append(f"- `{k}` = {what} = {_f(r.get(k))}.")
        out += [f"  - {s}" for s in (a, b) if s]
    g = r.get("guest", {})
    kf = r.get("kvm_fault_us")
    if g:
        out += ["", "## NPF path: first touch of a page, and trace replay", "",
                f"KVM's in-kernel demand fault on the same machine, same run: {_f(kf, unit='µs')} "
                "per page (a guest writing one byte to each page of a fresh memslot)."
                " hv: the `firsttouch` guest writing each page of its RAM once under `hv boot`"
                " (NPF exit, VMM frame allocation, PSP UPDATE_NPT with the digest check and"
                " update, the host page allocated and zeroed by the kernel at the guest's"
                " write, the write). Replay: the same NPF path from a trace; its frames are"
                " never written, so no host page is allocated (not comparable with KVM).", ""]
        rows = []
        for k, label in (("4k", "4 KiB"), ("fa16", "fault-around 16"), ("2m", "2 MiB")):
            ft = g.get(f"first_touch_{k}") or {}
            rp = r.get("npf", {}).get(k) or {}
            v = ft.get("us_per_page")
            rows.append([label, _f(ft.get("pages")), _f(ft.get("npf")), _f(v, unit="µs"),
                         _f(v / kf if v and kf else None, unit="x"),
                         _f(rp.get("us_per_fault"), unit="µs"), _f(rp.get("us_per_page"), unit="µs")])
        out += _table(["pages", "pages touched", "NPFs", "first touch per page", "vs KVM",
                       "replay per NPF", "replay per page"], rows)
        lh = g.get("line_hash_ns")
        out += ["", "## Guest speed: plain Unicorn time / hv boot time", "",
                "1.0 means managing the NPT through the PSP costs nothing. *per-access+count*:"
                " the like-for-like baseline (same image, same RAM size, `UC_TLB_VIRTUAL`, an"
                f" identity fill in {'C' if g.get('unicorn_fill') == 'c' else 'Python'}"
                " granting each access kind's permissions only, as hv's fill is, the same C"
                " instruction counter; no guest walk, no NPT, no PSP). *uncounted*: that"
                " baseline without counting instructions (hv boot always counts). *flat RWX*:"
                " all RAM one read/write/execute mapping, no hooks. *difference per NPF* (the"
                " fault-bound guests only; compute's few NPFs are lost in its noise): (hv"
                " boot - per-access baseline) / NPFs, what each NPF costs beyond the"
                " baseline's TLB miss. *--protect none*: the same guest under"
                " `hv boot --protect none` (the same VMM, vCPU and C NPF path, but no PSP:"
                " the VMM writes the leaf itself) against the same baseline: what the NPT"
                " alone costs. *of which the PSP*: (hv boot - hv boot --protect none) / NPFs,"
                " what the PSP's UPDATE_NPT costs an NPF. The headline `guest_speed_vs_unicorn` is the"
                " worse of compute and memtouch; firsttouch is nothing but first touches.", ""]
        rows = []
        for n in ("compute", "memtouch", "firsttouch"):
            s = g.get(f"speed_{n}")
            if s:
                rows.append([n, _f(s["instructions"]), _f(s["npf"]), _f(s["hv_s"] * 1e3, unit="ms"),
                             _f(s["unicorn_s"] * 1e3, unit="ms"), _f(s["vs_unicorn"], unit="x"),
                             _f(s.get("none_vs_unicorn"), unit="x"),
                             _f(s["vs_unicorn_nocount"], unit="x"), _f(s["vs_unicorn_flat"], unit="x"),
                             _f(s.get("extra_us_per_npf"), unit="µs"),
                             _f(s.get("psp_us_per_npf"), unit="µs")])
        out += _table(["guest", "instructions", "NPFs", "hv boot", "plain Unicorn",
                       "per-access+count", "--protect none", "uncounted", "flat RWX",
                       "difference per NPF", "of which the PSP"], rows)
        ft = g.get("speed_firsttouch") or {}
        if lh and ft.get("npf"):
            base = ft["unicorn_s"] * 1e6 / ft["npf"]       # the baseline's µs per first touch
            out += ["", "Where a fault-bound guest's time goes: each first touch is, on both sides,"
                    " a TLB miss and the host kernel allocating and zeroing the page at the"
                    " guest's write; under hv it is also a 2D walk that misses, the PSP's"
                    f" UPDATE_NPT (five SHA-256 line hashes at {_f(lh, 0, 'ns')} each: the four"
                    " lines its walk reads are checked against their stored hashes, the leaf"
                    " line it wrote is re-hashed; the frame-state checks; the entry), and the"
                    " walk again."
                    + (f" Of the {_f(ft['extra_us_per_npf'], unit='µs')} a first touch costs"
                       f" beyond the baseline here, the PSP's UPDATE_NPT is"
                       f" {_f(ft['psp_us_per_npf'], unit='µs')} (hv boot against hv boot"
                       " --protect none, which takes the same NPF path in C but writes the"
                       " leaf itself); the rest is the NPT: the 2D walks and the NPF exit."
                       if ft.get("psp_us_per_npf") is not None else "")
                    + " The line hashes are the digest design's check before every"
                    " update, which no cache can skip without letting a tampered line go"
                    f" unnoticed for longer. They alone are {_f(5 * lh / 1e3, unit='µs')}"
                    f" per page, {_f(5 * lh / 1e3 / base * 100, 0)}% of the baseline's whole"
                    f" {_f(base, unit='µs')} per first touch, so a guest that does nothing but"
                    " first touches cannot reach 0.9 under this design. A compute-bound guest"
                    " pays them once per page it ever touches."]
    w = r.get("walks", {}).get("rows")
    if w:
        out += ["", "## NPT walk: ns per walk, random GPAs over the mapped range", ""]
        out += _table(["mapped", "table pages", "C batch", "C single call", "pure Python",
                       "C floor", "Python / C batch", "C batch / floor"],
                      [[_size(x["mapped"]), x.get("table_pages", ""), _f(x["c_batch_ns"], 1),
                        _f(x["c_single_ns"], 0), _f(x["python_ns"], 0), _f(x["floor_ns"], 1),
                        _f(x["c_vs_python"], 0, "x"), _f(x["c_vs_floor"], 2, "x")] for x in w])
    ig = r.get("integrity", {}).get("rows")
    if ig:
        out += ["", "## Integrity: UPDATE_NPT and the full check, as the mapped span grows", "",
                "UPDATE_NPT of a fresh 4 KiB page at a random GPA in an existing page table,"
                " the firmware's own work (no VMM, client or transport). merkle: the C update"
                " (psp_mailbox_update) with the deferred hash-tree work paid in the timing: the"
                " flush GUEST_STATUS and VERIFY start with, after every update, and beside it"
                " once per round of updates (updates sharing ancestors share re-hashing, which"
                " favours small tables), and the C update alone (the flush, in the Python"
                " model, done after the timing). full: the"
                " mailbox entry, which re-hashes the whole table before every update. Check:"
                " VERIFY, every table page re-hashed from host memory.", ""]
        out += _table(["mapped", "table pages", "merkle update", "merkle, flushed per round",
                       "merkle, C update alone", "full update", "merkle check", "full check"],
                      [[_size(a["mapped"]), a["table_pages"], _f(a["update_us"], unit="µs"),
                        _f(a.get("update_batched_us"), unit="µs"),
                        _f(a.get("update_c_only_us"), unit="µs"),
                        _f(b["update_us"], 1, "µs"), _f(a["check_us"] / 1e3, 2, "ms"),
                        _f(b["check_us"] / 1e3, 2, "ms")]
                       for a, b in zip(ig["merkle"], ig["full"])])
    ps = r.get("psp", {})
    if ps and "error" not in ps:
        out += ["", "## PSP mailbox", "",
                "An empty command (NOP) in-process and to the PSP process (shared-memory"
                " mailbox, eventfd doorbells), and a ring of batched UPDATE_NPTs to the PSP"
                " process on fresh frames (firmware work included). The process transport"
                " needs two idle CPUs (one for the VMM, one for the PSP).", ""]
        out += _table(["transport", "p50", "p99", "ring, per UPDATE_NPT"],
                      [["in-process", _f(ps.get("psp_roundtrip_us_inprocess"), unit="µs"),
                        _f(ps.get("psp_roundtrip_us_inprocess_p99"), unit="µs"), "-"],
                       ["process", _f(ps.get("psp_roundtrip_us_process"), unit="µs"),
                        _f(ps.get("psp_roundtrip_us_process_p99"), unit="µs"),
                        _f(ps.get("psp_ring_us_per_cmd"), unit="µs")]])
    out += ["", "## Other figures", ""]
    out += _table(["figure", "value"], [
        ["SHA-256", _f(r.get("sha256_mb_s"), 0, "MB/s")],
        ["replay throughput (lackey trace, parsing included)",
         _f(r.get("replay_accesses_per_s"), unit="accesses/s")],
        ["KVM exit round trip (user space and back)", _f(r.get("kvm_exit_us"), unit="µs")],
        ["replay peak RSS, --host-mem 16G over 1G", _f(r.get("replay_rss_growth_16g_vs_1g"), unit="x")],
        ["boot peak RSS, --host-mem 16G over 1G", _f(r.get("boot_rss_growth_16g_vs_1g"), unit="x")],
    ], ["---", "---:"])
    return "\n".join(out) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: bench_report.py RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        sys.stdout.write(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
