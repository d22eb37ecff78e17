#!/usr/bin/env python3
"""Markdown tables from a `hv bench --json` / `scripts/bench_full.py` result.

    .venv/bin/python scripts/bench_report.py bench_full.json > tables.md

Prints the tables docs/benchmarks.md records (walks, integrity, NPF path,
memtouch, KVM, PSP transports, targets), every number taken from the JSON,
so that the recorded document and the run cannot disagree.
"""
import json
import sys

MiB = 1 << 20


def _size(n):
    return f"{n // (1 << 30)} GiB" if n >= 1 << 30 else f"{n // MiB} MiB"


def _f(v, nd=1):
    if v is None:
        return "n/a"
    if isinstance(v, float) and abs(v) >= 1e5:
        return f"{v:.3g}"
    return f"{v:.{nd}f}"


def walks(r):
    out = ["| mapped | table pages | C batch | C single call | pure Python | C floor | "
           "Python / C batch | C batch / floor |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in r["walks"]["rows"]:
        out.append(f"| {_size(w['mapped'])} | {w['table_pages']} | {_f(w['c_batch_ns'])} | "
                   f"{_f(w['c_single_ns'])} | {_f(w['python_ns'], 0)} | {_f(w['floor_ns'])} | "
                   f"{w['c_vs_python']:.0f}x | {w['c_vs_floor']:.2f}x |")
    return out


def integrity(r):
    rows = r["integrity"]["rows"]
    out = ["| mapped | table pages | full UPDATE_NPT | merkle UPDATE_NPT | check, full | "
           "check, merkle | merkle / full check |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for f, m in zip(rows["full"], rows["merkle"]):
        out.append(f"| {_size(f['mapped'])} | {f['table_pages']} | {_f(f['update_us'])} µs | "
                   f"{_f(m['update_us'])} µs | {f['check_us'] / 1000:.2f} ms | "
                   f"{m['check_us'] / 1000:.2f} ms | {m['check_us'] / f['check_us']:.2f}x |")
    return out


def npf(r):
    kf = r.get("kvm_fault_us")
    out = ["| | faults | µs per fault | µs per page | per page / KVM demand fault |",
           "|---|---:|---:|---:|---:|"]
    for name, label in (("4k", "4 KiB"), ("fa16", "fault-around 16"), ("2m", "2 MiB")):
        n = r["npf"][name]
        ratio = f"{n['us_per_page'] / kf:.3g}x" if kf else "n/a"
        out.append(f"| {label} | {n['npf']} | {_f(n['us_per_fault'])} | {_f(n['us_per_page'], 2)} "
                   f"| {ratio} |")
    return out


def memtouch(r):
    g = r.get("guest", {})
    out = ["| | faults | pages touched | µs per fault | µs per page |",
           "|---|---:|---:|---:|---:|"]
    for name, label in (("4k", "4 KiB"), ("fa16", "fault-around 16"), ("2m", "2 MiB")):
        m = g.get(f"memtouch_{name}")
        if m:
            out.append(f"| {label} | {m['npf']} | {m['pages']} | {_f(m['us_per_fault'])} | "
                       f"{_f(m['us_per_page'], 2)} |")
    return out


def psp(r):
    d = r["psp"]["psp_transport_detail"]
    ip, pr = d["inprocess"], d["process"]
    rows = [("NOP round trip, median", "roundtrip_us_median", "roundtrip_transport_us_median"),
            ("NOP round trip, p99", "roundtrip_us_p99", "roundtrip_transport_us_p99"),
            (f"ring of {pr['ring_batch']} NOPs, per command", "ring_nop_us_per_cmd",
             "ring_nop_transport_us_per_cmd"),
            ("ring of NOPs, PSP still awake, per command", "ring_nop_awake_us_per_cmd", None),
            (f"ring of {pr['ring_batch']} UPDATE_NPT (fresh frames), per command",
             "ring_us_per_cmd", "ring_transport_us_per_cmd"),
            ("the same on frames the VMM had touched", "ring_resident_us_per_cmd",
             "ring_resident_transport_us_per_cmd"),
            ("UPDATE_NPT one call at a time, per command", "update_us_per_cmd", None)]
    out = ["| µs | in-process | PSP process | of which transport (process) |",
           "|---|---:|---:|---:|"]
    for label, k, kt in rows:
        out.append(f"| {label} | {_f(ip.get(k), 2)} | {_f(pr.get(k), 2)} | "
                   f"{_f(pr.get(kt), 2) if kt else ''} |")
    return out


def targets(r):
    out = ["| target | goal | this run | met? |", "|---|---|---|---|"]
    for k, t in r["targets"].items():
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "**NOT met**")
        out.append(f"| {k} | {t['target']} | {_f(t['value'], 3) if t['value'] is not None else 'n/a'}"
                   f" | {met} |")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: bench_report.py RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        r = json.load(f)
    for title, fn in (("Walks (ns per walk)", walks), ("Integrity", integrity),
                      ("NPF path (trace replay)", npf), ("memtouch guest (hv boot)", memtouch),
                      ("PSP transports", psp), ("Targets", targets)):
        print(f"#### {title}\n")
        print("\n".join(fn(r)))
        print()
    k = r.get("kvm", {})
    print(f"KVM: demand fault {_f(k.get('kvm_fault_us'), 2)} µs/page (THP "
          f"{_f(k.get('kvm_fault_thp_us'), 2)}), second touch {_f(k.get('kvm_touch_us'), 2)}, "
          f"exit round trip {_f(k.get('kvm_exit_us'), 2)} µs; SHA-256 "
          f"{_f(r['sha256']['sha256_mb_s'], 0)} MB/s; total {_f(r.get('total_seconds'))} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
