"""`hv bench`: what the design costs, measured side by side in one run.

Sections (each returns a dict; `run()` gathers them and the headline figures):

- sha256:    SHA-256 throughput on this machine (the floor for integrity work)
- walks:     ns per NPT walk, C batch / C single call / pure Python / C floor
             (the same four dependent loads, no checks), on dense 4 KiB tables
             mapping 16 MiB .. 16 GiB, random GPAs over the mapped range
- integrity: µs per UPDATE_NPT and per full check (VERIFY), full vs merkle, as
             the mapped span grows 16 MiB .. 16 GiB (one 4 KiB page per 2 MiB
             block: a sparse mapping with the page-table footprint, and so the
             integrity cost, of a dense one)
- npf:       the NPF path end to end (walk miss -> VMM -> PSP UPDATE_NPT ->
             resume) on a trace replay touching every page of a region once:
             4 KiB faults, fault-around 16, 2 MiB pages; µs per fault and per page
- replay:    accesses per second of `hv replay` on a lackey trace, parsing included
- kvm:       /dev/kvm: in-kernel demand fault per page, user-space exit round trip
- guest:     instructions per second of a compute-bound guest under `hv boot`
             vs plain Unicorn (all memory mapped flat, no hooks); µs per NPF of
             the memtouch guest (needs hv.boot)
- memory:    peak RSS of a replay (and a boot) at two --host-mem sizes
- design:    with --protect X only: X's costs as hv compare measures them
             (designs.py: first-touch NPF, walk with the design's check,
             periodic check, PSP memory per GiB, guest speed)

Timings are best-of-a-few wall clock (time.perf_counter); ratios come from one
run. Tests never assert times.

Modules: common.py (units, profiles, timing helpers), one module per section
(walks.py with sha256, integrity.py, npf.py with replay, guest.py with kvm,
psp.py, memory.py) and report.py (machine facts, headline figures, targets,
plots, text). Imports every room but hv.cli (memory.py runs `hv` in child
processes to measure their peak RSS).
"""
import contextlib
import logging
import tempfile
import time

from hv.bench.common import PROFILES
from hv.bench.guest import bench_guest, bench_kvm
from hv.bench.integrity import bench_integrity
from hv.bench.kvm import bench_kvm_accel
from hv.bench.memory import bench_memory
from hv.bench.npf import bench_npf, bench_replay
from hv.bench.psp import bench_psp
from hv.bench.report import _headline, format_report, machine_info, plot
from hv.bench.walks import bench_sha256, bench_walks

__all__ = ["run", "format_report", "PROFILES"]


@contextlib.contextmanager
def _quiet_logs():
    """Nothing logs inside a timed section: the NPF log (-v: every NPF with
    its disassembled instruction) and the PSP's own log are off for the
    whole run; -v shows the benchmark's progress lines only."""
    saved = [(lg, lg.level) for lg in (logging.getLogger("hv"), logging.getLogger("psp"))]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def run(profile="quick", plot_dir=None, log=None, sections=None, protect=None):
    """Run the benchmark; returns one dict (headline keys at the top level).

    protect: None measures the digest design's parts as ever; a design
    (hv bench --protect) runs the NPF path under it and adds section
    `design`: its costs as hv compare measures them (hv/bench/designs.py);
    the integrity section is digest's only.

    A section that raises is recorded as {"error": ...} and the others still
    run; `res["errors"]` lists them (the CLI then exits 1). A section that
    cannot run here for a reason of the machine (no /dev/kvm) says
    {"skipped": reason}, which is not an error."""
    p = PROFILES[profile]
    log = log or (lambda msg: None)
    res = {"profile": profile, "machine": machine_info(), "errors": []}
    t_start = time.perf_counter()
    want = (lambda s: True) if sections is None else (lambda s: s in sections)
    with tempfile.TemporaryDirectory(prefix="hv-bench-") as tmp, _quiet_logs():
        def section(name, fn, *a):
            if not want(name):
                return None
            t0 = time.perf_counter()
            try:
                r = fn(*a)
            except Exception as exc:          # one broken section must not hide the others
                msg = " ".join(f"{exc.__class__.__name__}: {exc}".splitlines())
                r = {"error": msg}
                res["errors"].append(f"{name}: {msg}")
                log(f"{name}: ERROR {msg}")
            r["seconds"] = time.perf_counter() - t0
            res[name] = r
            return r
        section("sha256", bench_sha256, p)
        section("walks", bench_walks, p, log)
        if protect in (None, "digest"):
            section("integrity", bench_integrity, p, log)
        elif want("integrity"):
            res["integrity"] = {"skipped": f"the digest design's integrity modes: --protect "
                                           f"{protect} keeps no digest"}
        section("npf", bench_npf, p, log, "merkle", protect or "digest")
        rp = section("replay", bench_replay, p, log, tmp)
        section("kvm", bench_kvm, p, log)
        section("kvm_accel", bench_kvm_accel, p, log)
        section("guest", bench_guest, p, log)
        section("psp", bench_psp, p, log)
        if protect is not None:
            from hv.bench.designs import design_costs, walk_ns
            section("design", _design_section, protect, profile, log, design_costs, walk_ns)
        if p["rss"]:
            section("memory", bench_memory, p, log, (rp or {}).get("trace_path"))
        for r in (rp,):
            if r:
                r.pop("trace_path", None)
    res["total_seconds"] = time.perf_counter() - t_start
    _headline(res)
    if plot_dir:
        res["plots"] = plot(res, plot_dir)
    return res


def _design_section(protect, profile, log, design_costs, walk_ns):
    """hv bench --protect X: X's costs (digest: merkle, the default mode)."""
    tiny, quick = profile == "tiny", profile != "full"
    out = design_costs(protect, "merkle" if protect == "digest" else None, quick=quick,
                       tiny=tiny, log=log)
    w = walk_ns(size=(64 << 20) if tiny else (1 << 30), n=20_000 if tiny else 300_000)
    out["walk_ns"] = None if w is None else (w["rmp"] if protect == "rmp" else w["plain"])
    out["protect"] = protect
    return out
