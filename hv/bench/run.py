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

Timings are best-of-a-few wall clock (time.perf_counter); ratios come from one
run. Tests never assert times.
"""
import gc
import hashlib
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from array import array

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
HUGE = 2 * MiB

# flags of a dense table built for the walk benchmark: present, writable,
# user, accessed, dirty (so that steady-state walks write nothing)
_P, _W, _U, _A, _D = 1, 2, 4, 0x20, 0x40
_NONLEAF = _P | _W | _U | _A
_LEAF = _P | _W | _U | _A | _D


def _fmt_size(n):
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB"


def _best(fn, reps=3):
    best = None
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    return best


# ---------------------------------------------------------------------------
# profiles
PROFILES = {
    "full": dict(
        walk_sizes=[16 * MiB, 64 * MiB, 256 * MiB, GiB, 4 * GiB, 16 * GiB],
        walk_n=1_000_000, walk_single=200_000, walk_py=50_000,
        integ_sizes=[16 * MiB, 64 * MiB, 256 * MiB, GiB, 4 * GiB, 16 * GiB],
        integ_updates=300, integ_full_budget_s=2.0, integ_checks=3,
        npf_pages=32768, replay_accesses=4_000_000, kvm_pages=65536, kvm_exits=50_000,
        guest_insns=None, memtouch_pages=16384, rss=True, valgrind=True,
        psp_n=20_000, psp_batch=256, psp_rounds=16, repeat=3),
    "quick": dict(
        walk_sizes=[16 * MiB, 256 * MiB, 4 * GiB, 16 * GiB],
        walk_n=300_000, walk_single=50_000, walk_py=10_000,
        integ_sizes=[16 * MiB, 256 * MiB, 4 * GiB, 16 * GiB],
        integ_updates=100, integ_full_budget_s=0.6, integ_checks=1,
        npf_pages=8192, replay_accesses=1_500_000, kvm_pages=16384, kvm_exits=10_000,
        guest_insns=None, memtouch_pages=4096, rss=True, valgrind=False,
        psp_n=3000, psp_batch=256, psp_rounds=4, repeat=2),
    "tiny": dict(      # for the test suite: every figure, small sizes
        walk_sizes=[16 * MiB, 64 * MiB],
        walk_n=20_000, walk_single=5_000, walk_py=1_000,
        integ_sizes=[16 * MiB, 64 * MiB],
        integ_updates=20, integ_full_budget_s=0.1, integ_checks=1,
        npf_pages=512, replay_accesses=60_000, kvm_pages=1024, kvm_exits=1_000,
        guest_insns=1_000_000, memtouch_pages=256, rss=False, valgrind=False,
        psp_n=300, psp_batch=32, psp_rounds=2, repeat=1),
}


# ---------------------------------------------------------------------------
# PSP transports: empty-command round trip in-process and to the PSP process,
# and per-command cost of a ring batch of UPDATE_NPT commands
def bench_psp(p, log):
    from .psp_process import bench_psp_figures
    r = bench_psp_figures(n=p["psp_n"], batch=p["psp_batch"], rounds=p["psp_rounds"])
    log(f"psp: round trip {r['psp_roundtrip_us_inprocess']:.1f} us in-process, "
        f"{r['psp_roundtrip_us_process']:.1f} us to the PSP process; "
        f"ring {r['psp_ring_us_per_cmd']:.1f} us per UPDATE_NPT on fresh frames, "
        f"{r['psp_ring_us_per_cmd_resident']:.1f} us on touched ones")
    return r


# ---------------------------------------------------------------------------
# SHA-256
def bench_sha256(p):
    buf = bytes(16 * MiB)
    dt = _best(lambda: hashlib.sha256(buf).digest(), 3)
    page = bytes(PAGE)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        hashlib.sha256(page).digest()
    per_page = (time.perf_counter() - t0) / n
    return {"sha256_mb_s": len(buf) / dt / 1e6, "sha256_us_per_4k_page": per_page * 1e6}


# ---------------------------------------------------------------------------
# walks
class DenseTable:
    """A dense 4-level table mapping GPA 0..size with 4 KiB leaves, written
    straight into host memory (no PSP: the walk is what is measured)."""

    def __init__(self, size):
        from .hostmem import HostMemory
        self.size = size
        npages = size // PAGE
        n_pt = max(1, npages // 512)
        n_pd = (n_pt + 511) // 512
        n_pdpt = (n_pd + 511) // 512
        n_tables = 1 + n_pdpt + n_pd + n_pt
        self.data_base = 16 * PAGE
        self.data_frames = 1024
        tables_base = self.data_base + self.data_frames * PAGE
        mem_size = tables_base + n_tables * PAGE + MiB
        mem_size = (mem_size + MiB - 1) // MiB * MiB
        self.mem = HostMemory(max(mem_size, 64 * MiB))
        buf = self.mem.buf
        nxt = [tables_base]

        def take():
            h = nxt[0]
            nxt[0] += PAGE
            return h
        self.root = take()
        pdpts = [take() for _ in range(n_pdpt)]
        pds = [take() for _ in range(n_pd)]
        pts = [take() for _ in range(n_pt)]
        for i, h in enumerate(pdpts):
            buf[self.root + 8 * i:self.root + 8 * i + 8] = (h | _NONLEAF).to_bytes(8, "little")
        self._fill_parents(buf, pdpts, pds)
        self._fill_parents(buf, pds, pts)
        per_pt = min(512, npages)
        for k, h in enumerate(pts):
            first = self.data_base + ((k * 512) % self.data_frames) * PAGE
            v = first | _LEAF
            buf[h:h + 8 * per_pt] = array("Q", range(v, v + per_pt * PAGE, PAGE)).tobytes()
        self.n_tables = n_tables

    @staticmethod
    def _fill_parents(buf, parents, children):
        for j, p in enumerate(parents):
            kids = children[j * 512:(j + 1) * 512]
            buf[p:p + 8 * len(kids)] = array("Q", [c | _NONLEAF for c in kids]).tobytes()

    def random_gpas(self, n, seed=1):
        """n uniformly random GPAs below size (a power of two), and accesses."""
        rnd = random.Random(seed)
        b = bytearray(rnd.randbytes(8 * n))
        bits = self.size.bit_length() - 1
        full, part = divmod(bits, 8)
        for pos in range(full + (1 if part else 0), 8):
            b[pos::8] = bytes(n)
        if part:
            table = bytes(i & ((1 << part) - 1) for i in range(256))
            b[full::8] = bytes(b[full::8]).translate(table)
        gpas = array("Q", bytes(b))
        accs = rnd.randbytes(n).translate(bytes(i & 1 for i in range(256)))   # read/write
        return gpas, accs

    def close(self):
        self.mem.close()


def bench_walks(p, log):
    from nptcore import CEngine, PyEngine
    if CEngine is None:
        return {"skipped": "C engine not built"}
    rows = []
    for size in p["walk_sizes"]:
        t = DenseTable(size)
        ceng = peng = None
        try:
            gpas, accs = t.random_gpas(p["walk_n"])
            out = array("Q", bytes(8 * len(gpas)))
            ceng = CEngine(t.mem.buf)
            peng = PyEngine(t.mem.buf)
            root = t.root
            n = len(gpas)
            k, miss = ceng.walk_batch(root, gpas, accs, out)     # warm (and check)
            assert k == n, (k, miss)
            check = array("Q", bytes(8 * n))
            ceng.floor_walk_batch(root, gpas, check)
            assert check == out, "floor walk disagrees with the walk"
            t_batch = _best(lambda: ceng.walk_batch(root, gpas, accs, out), 3) / n
            t_floor = _best(lambda: ceng.floor_walk_batch(root, gpas, out), 3) / n
            ns = p["walk_single"]
            walk = ceng.walk
            g1, a1 = gpas[:ns], accs[:ns]

            def single():
                for g, a in zip(g1, a1):
                    walk(root, g, a)
            t_single = _best(single, 2) / ns
            npy = p["walk_py"]
            gp, ap, op = gpas[:npy], accs[:npy], array("Q", bytes(8 * npy))
            t_py = _best(lambda: peng.walk_batch(root, gp, ap, op), 1) / npy
            assert op == out[:npy]
            ceng.close()
            peng.close()
        finally:
            ceng = peng = None     # drop the engines' exports before the mmap closes
            gc.collect()
            t.close()
        row = {"mapped": size, "table_pages": t.n_tables,
               "c_batch_ns": t_batch * 1e9, "c_single_ns": t_single * 1e9,
               "python_ns": t_py * 1e9, "floor_ns": t_floor * 1e9,
               "c_vs_python": t_py / t_batch, "c_vs_floor": t_batch / t_floor,
               "single_vs_batch": t_single / t_batch}
        log(f"walks {_fmt_size(size):>7}: batch {row['c_batch_ns']:.1f} ns, single "
            f"{row['c_single_ns']:.0f} ns, python {row['python_ns']:.0f} ns, floor "
            f"{row['floor_ns']:.1f} ns")
        rows.append(row)
    return {"rows": rows,
            "walk_c_vs_python": min(r["c_vs_python"] for r in rows),
            "walk_c_vs_floor": max(r["c_vs_floor"] for r in rows)}


# ---------------------------------------------------------------------------
# integrity: UPDATE_NPT and full-check cost vs mapped span
def _swap_integrity(vmm, vm, mode):
    """Give the guest a fresh integrity object of `mode` over the same table
    (the benchmark builds large tables once, in merkle mode, then measures
    each mode on them; building them in full mode would take quadratic time)."""
    vmm._psp_obj._switch_integrity(vm.handle, mode)


def bench_integrity(p, log):
    from .vmm import Vmm
    sizes = p["integ_sizes"]
    largest = sizes[-1]
    host = max(256 * MiB, 4 * (largest // HUGE) * PAGE + 128 * MiB)
    vmm = Vmm(host_mem=host, integrity="merkle")
    rows = {"full": [], "merkle": []}
    try:
        vm = vmm.create_vm()
        built = 0
        rnd = random.Random(2)
        used = set()
        for size in sizes:
            for b in range(built // HUGE, size // HUGE):       # one page per 2 MiB block
                vmm.handle_npf(vm, b * HUGE)
            built = size
            blocks = size // HUGE
            npt_pages = vmm.psp.guest_status(vm.handle).table_pages
            for mode in ("merkle", "full"):
                _swap_integrity(vmm, vm, mode)
                # UPDATE_NPT: a new 4 KiB page in an existing PT (no new tables)
                times = []
                budget = p["integ_full_budget_s"] if mode == "full" else 1e9
                spent = 0.0
                # untimed warm-up updates first: the first ones after a mode
                # switch or a table build pay for cold caches and first
                # touches of PSP pages, which is not what grows with the table
                warm = 20 if mode == "merkle" else 1
                # merkle: `repeat` rounds, each separated by a full check (so a
                # slow spell of a shared machine spoils one round, not all);
                # the figure is the lowest round median
                rounds = p.get("repeat", 1) if mode == "merkle" else 1
                per_round = max(3, p["integ_updates"] // rounds)
                medians = []
                while len(times) < p["integ_updates"] + warm and \
                        (spent < budget or len(times) < 3 + warm):
                    while True:
                        gpa = rnd.randrange(blocks) * HUGE + rnd.randrange(1, 512) * PAGE
                        if gpa not in used:
                            used.add(gpa)
                            break
                    hpa = vmm.alloc.alloc(1)
                    t0 = time.perf_counter()
                    r = vmm.psp.update_npt(vm.handle, gpa, hpa)
                    dt = time.perf_counter() - t0
                    if not r.ok:
                        raise RuntimeError(f"UPDATE_NPT refused in the benchmark: {r.name}")
                    times.append(dt)
                    spent += dt
                    if len(times) > warm and (len(times) - warm) % per_round == 0:
                        r = sorted(times[-per_round:])
                        medians.append(r[len(r) // 2])
                        if mode == "merkle":
                            vmm.psp.verify(vm.handle)
                times = sorted(times[warm:])
                upd = min(medians) if medians else times[len(times) // 2]
                chk = _best(lambda: vmm.psp.verify(vm.handle), p["integ_checks"])
                rows[mode].append({"mapped": size, "table_pages": npt_pages,
                                   "update_us": upd * 1e6, "check_us": chk * 1e6,
                                   "updates_timed": len(times)})
                log(f"integrity {mode:>6} {_fmt_size(size):>7} ({npt_pages} table pages): "
                    f"UPDATE_NPT {upd * 1e6:.1f} us, check {chk * 1e3:.2f} ms")
            _swap_integrity(vmm, vm, "merkle")
    finally:
        vmm.close()

    def growth(mode):
        r = rows[mode]
        return r[-1]["update_us"] / r[0]["update_us"]
    return {"rows": rows, "merkle_update_growth": growth("merkle"),
            "full_update_growth": growth("full"),
            "mapped_growth": largest / sizes[0]}


# ---------------------------------------------------------------------------
# NPF path on a trace replay
def _touch_trace(npages, base=0x4000_0000):
    from .trace import Trace
    gpas = array("Q", range(base, base + npages * PAGE, PAGE))
    return Trace(array("B", bytes(npages)), gpas, array("I", [8]) * npages, format="csv")


def bench_npf(p, log, integrity="merkle"):
    from .replay import replay
    from .vmm import Vmm
    n = p["npf_pages"]
    trace = _touch_trace(n)
    out = {}
    for name, kw in (("4k", {}), ("fa16", {"fault_around": 16}), ("2m", {"huge": True})):
        el = None
        for _ in range(p.get("repeat", 1)):         # best of `repeat` fresh VMs
            vmm = Vmm(host_mem=max(256 * MiB, 2 * n * PAGE + 128 * MiB), integrity=integrity)
            try:
                vm = vmm.create_vm(**kw)
                res = replay(vmm, vm, trace)
                if res["stopped"]:
                    raise RuntimeError(f"replay stopped: {res['stopped']}")
            finally:
                vmm.close()
            el = res["elapsed_s"] if el is None else min(el, res["elapsed_s"])
        out[name] = {"pages": n, "npf": res["npf"], "elapsed_s": el,
                     "us_per_fault": el * 1e6 / max(1, res["npf"]),
                     "us_per_page": el * 1e6 / n}
        log(f"npf {name:>4} ({integrity}): {out[name]['us_per_fault']:.1f} us/fault, "
            f"{out[name]['us_per_page']:.2f} us/page")
    return out


# ---------------------------------------------------------------------------
# replay speed on a lackey trace
def synth_lackey(path, n_accesses, seed=3):
    """A lackey-format trace with a realistic mix: instruction fetches in a
    code loop, stack pushes/pops, a streaming array, random heap loads, and
    some modify (M = load + store) records. ~n_accesses accesses."""
    rnd = random.Random(seed)
    code, stack, heap, arr = 0x0040_0000, 0x1FFE_FFF000, 0x0480_0000, 0x0800_0000
    lines = ["==1== Lackey, an example Valgrind tool (synthesized by hv bench)"]
    per_iter = 5
    iters = n_accesses // per_iter
    rand = [rnd.randrange(1 << 22) & ~7 for _ in range(4096)]
    for i in range(iters):
        lines.append("I  %08x,%d" % (code + (i * 13) % 0x6000, 1 + (i % 7)))
        lines.append(" L %08x,8" % (heap + rand[i & 4095]))
        lines.append(" S %010x,8" % (stack - (i % 256) * 8))
        lines.append(" M %08x,4" % (arr + (i * 4) % (8 << 20)))
    lines.append("==1== ")
    with open(path, "w") as f:
        f.write("\n".join(lines))
        f.write("\n")


def valgrind_lackey(path, timeout=120):
    """A real lackey trace of a real program (needs valgrind); False if not."""
    import shutil
    if not shutil.which("valgrind"):
        return False
    cmd = ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={path}",
           "/bin/ls", "-l", "/usr/bin"]
    try:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return os.path.exists(path) and os.path.getsize(path) > 0


def bench_replay(p, log, tmpdir):
    from .replay import replay
    from .trace import load_trace
    from .vmm import Vmm
    path = os.path.join(tmpdir, "bench.lackey")
    source = "synthesized"
    if p.get("valgrind") and valgrind_lackey(path):
        source = "valgrind lackey on ls -l /usr/bin"
    else:
        synth_lackey(path, p["replay_accesses"])
    vmm = Vmm(host_mem=GiB)
    try:
        vm = vmm.create_vm()
        t0 = time.perf_counter()
        trace = load_trace(path)
        t1 = time.perf_counter()
        res = replay(vmm, vm, trace)
        t2 = time.perf_counter()
    finally:
        vmm.close()
    n = len(trace)
    out = {"trace": source, "accesses": n, "npf": res["npf"], "parse_s": t1 - t0,
           "replay_s": t2 - t1, "total_s": t2 - t0,
           "replay_accesses_per_s": n / (t2 - t0),
           "replay_only_accesses_per_s": n / (t2 - t1),
           "trace_path": path}
    log(f"replay ({source}): {n} accesses, {res['npf']} NPFs, parse {t1 - t0:.3f} s + "
        f"replay {t2 - t1:.3f} s = {out['replay_accesses_per_s'] / 1e6:.2f} M accesses/s")
    return out


# ---------------------------------------------------------------------------
# KVM
def bench_kvm(p, log):
    from . import kvm
    try:
        f = kvm.bench_faults(p["kvm_pages"])
        if f is None:
            return {"skipped": "/dev/kvm absent or not usable", "kvm_fault_us": None}
        for _ in range(p.get("repeat", 1) - 1):     # best of `repeat`, as for our NPF
            f2 = kvm.bench_faults(p["kvm_pages"])
            if f2 is not None and f2["fault_us"] < f["fault_us"]:
                f = f2
        fh = kvm.bench_faults(p["kvm_pages"], huge=True)
        e = kvm.bench_exits(p["kvm_exits"])
    except kvm.KvmError as exc:
        return {"skipped": str(exc), "kvm_fault_us": None}
    log(f"kvm: demand fault {f['fault_us']:.2f} us/page (THP {fh['fault_us']:.2f}), "
        f"exit round trip {e['exit_us']:.2f} us")
    return {"kvm_fault_us": f["fault_us"], "kvm_touch_us": f["touch_us"],
            "kvm_fault_thp_us": fh["fault_us"], "kvm_exit_us": e["exit_us"],
            "pages": f["npages"], "exits": e["nexits"]}


# ---------------------------------------------------------------------------
# guest speed and memtouch NPF (hv.boot)
def bench_guest(p, log):
    try:
        from . import boot as bootmod
    except ImportError as exc:
        return {"skipped": f"hv.boot not available ({exc})"}
    try:
        return _bench_guest(p, log, bootmod)
    except Exception as exc:        # boot is another component: report, do not fail
        return {"skipped": f"hv.boot failed: {exc.__class__.__name__}: {exc}"}


def _guest_images():
    try:
        import guests.build as gb
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        import guests.build as gb
    return gb.build_all()


def _bench_guest(p, log, bootmod):
    from guests.flat_runner import run_flat_unicorn
    from .vmm import Vmm
    imgs = _guest_images()
    out = {}
    compute = str(imgs["compute"])
    mem = 16 * MiB
    limit = p["guest_insns"]
    reps = 1 if limit else 2
    best_hv = best_flat = None
    insns = None
    for _ in range(reps):
        vmm = Vmm(host_mem=256 * MiB)
        try:
            b = bootmod.Boot(vmm, compute, mem=mem)
            r = b.run(max_insns=limit)
            b.close()
        finally:
            vmm.close()
        if r.exit_reason not in ("exit_port", "hlt", "insn_limit"):
            raise RuntimeError(f"compute guest ended with {r.exit_reason}: {r.reason}")
        insns = r.instructions
        best_hv = r.elapsed_s if best_hv is None else min(best_hv, r.elapsed_s)
        f = run_flat_unicorn(compute, mem, max_insns=insns if limit else 0, count_insns=False)
        best_flat = f.seconds if best_flat is None else min(best_flat, f.seconds)
    out.update({"compute_insns": insns, "hv_boot_s": best_hv, "unicorn_flat_s": best_flat,
                "hv_insns_per_s": insns / best_hv, "unicorn_insns_per_s": insns / best_flat,
                "guest_speed_vs_unicorn": best_flat / best_hv})
    log(f"guest: compute {insns} insns, hv boot {insns / best_hv / 1e6:.1f} M insn/s, plain "
        f"Unicorn {insns / best_flat / 1e6:.1f} M insn/s ({best_flat / best_hv:.2f}x)")
    memtouch = str(imgs["memtouch"])
    mt_mem = p["memtouch_pages"] * PAGE + 2 * MiB
    for name, fa, huge in (("4k", 1, False), ("fa16", 16, False), ("2m", 1, True)):
        vmm = Vmm(host_mem=max(256 * MiB, 2 * mt_mem + 64 * MiB))
        try:
            b = bootmod.Boot(vmm, memtouch, mem=mt_mem)
            b.vm.fault_around, b.vm.huge = fa, huge
            r = b.run()
            b.close()
        finally:
            vmm.close()
        if r.exit_reason not in ("exit_port", "hlt"):
            raise RuntimeError(f"memtouch guest ended with {r.exit_reason}: {r.reason}")
        touched = max(1, r.pages_mapped - r.launch_pages)
        out[f"memtouch_{name}"] = {"npf": r.npf, "pages": touched, "elapsed_s": r.elapsed_s,
                                   "us_per_fault": r.elapsed_s * 1e6 / max(1, r.npf),
                                   "us_per_page": r.elapsed_s * 1e6 / touched}
        log(f"memtouch {name:>4}: {r.npf} NPFs, {out[f'memtouch_{name}']['us_per_fault']:.1f} "
            f"us/fault, {out[f'memtouch_{name}']['us_per_page']:.2f} us/page")
    out["memtouch_npf_us_4k"] = out["memtouch_4k"]["us_per_fault"]
    return out


# ---------------------------------------------------------------------------
# memory: peak RSS of a replay in a child process
_RSS_CHILD = r"""
import os, sys
from hv.cli import main
sys.stdout = open(os.devnull, "w")
try:
    rc = main(sys.argv[2:])
except SystemExit as e:
    rc = e.code
hwm = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
with open(sys.argv[1], "w") as f:
    f.write("%d %d" % (rc or 0, hwm))
"""


def _child_rss(args):
    """Run `hv ARGS` in a fresh Python process; returns (exit code, peak RSS
    in MiB). The child reads its own VmHWM (the high-water mark of its
    address space since exec): ru_maxrss would also count the pages of this
    (forking) process."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        subprocess.run([sys.executable, "-c", _RSS_CHILD, f.name] + list(args),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        text = f.read().split()
    if len(text) != 2:
        return None, None
    return int(text[0]), int(text[1]) / 1024.0


def bench_memory(p, log, trace_path):
    out = {}
    if not trace_path:
        return {"skipped": "no trace"}
    base_rc, base = _child_rss(["inspect", "--help"])
    out["python_baseline_mb"] = base
    for hm in ("1G", "16G"):
        rc, rss = _child_rss(["replay", trace_path, "--json", "--host-mem", hm])
        out[f"replay_rss_mb_{hm}"] = rss if rc == 0 else None
    a, b = out["replay_rss_mb_1G"], out["replay_rss_mb_16G"]
    out["replay_rss_growth_16g_vs_1g"] = (b / a) if a and b else None
    log(f"memory: replay peak RSS {a} MiB at --host-mem 1G, {b} MiB at 16G "
        f"(python itself {base:.0f} MiB)")
    try:
        memtouch = str(_guest_images()["memtouch"])
    except Exception as exc:
        out["boot_skipped"] = f"{exc.__class__.__name__}: {exc}"
        return out
    mt_mem = f"{max(4, p['memtouch_pages'] * PAGE // MiB + 2)}M"
    for hm in ("1G", "16G"):
        rc, rss = _child_rss(["boot", memtouch, "--mem", mt_mem, "--host-mem", hm, "--json"])
        out[f"boot_rss_mb_{hm}"] = rss if rc == 0 else None
    a, b = out["boot_rss_mb_1G"], out["boot_rss_mb_16G"]
    out["boot_rss_growth_16g_vs_1g"] = (b / a) if a and b else None
    log(f"memory: boot (memtouch --mem {mt_mem}) peak RSS {a} MiB at --host-mem 1G, {b} MiB at 16G")
    return out


# ---------------------------------------------------------------------------
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


def run(profile="quick", plot_dir=None, log=None, sections=None):
    """Run the benchmark; returns one dict (headline keys at the top level)."""
    p = PROFILES[profile]
    log = log or (lambda msg: None)
    res = {"profile": profile, "machine": machine_info()}
    t_start = time.perf_counter()
    want = (lambda s: True) if sections is None else (lambda s: s in sections)
    with tempfile.TemporaryDirectory(prefix="hv-bench-") as tmp:
        def section(name, fn, *a):
            if not want(name):
                return None
            t0 = time.perf_counter()
            try:
                r = fn(*a)
            except Exception as exc:          # one broken section must not hide the others
                r = {"skipped": f"error: {exc.__class__.__name__}: {exc}"}
                log(f"{name}: {r['skipped']}")
            r["seconds"] = time.perf_counter() - t0
            res[name] = r
            return r
        section("sha256", bench_sha256, p)
        section("walks", bench_walks, p, log)
        section("integrity", bench_integrity, p, log)
        section("npf", bench_npf, p, log)
        rp = section("replay", bench_replay, p, log, tmp)
        section("kvm", bench_kvm, p, log)
        section("guest", bench_guest, p, log)
        section("psp", bench_psp, p, log)
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
