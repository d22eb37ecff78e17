"""The NPF path end to end on trace replays, and replay throughput."""
import os
import random
import subprocess
import time
from array import array
from hv.bench.common import GiB, MiB, PAGE


def _touch_trace(npages, base=0x4000_0000):
    from hv.trace import Trace
    gpas = array("Q", range(base, base + npages * PAGE, PAGE))
    return Trace(array("B", bytes(npages)), gpas, array("I", [8]) * npages, format="csv")


def bench_npf(p, log, integrity="merkle", protect="digest"):
    from hv.trace.replay import replay
    from hv.vmm.vmm import Vmm
    n = p["npf_pages"]
    trace = _touch_trace(n)
    out = {}
    for name, kw in (("4k", {}), ("fa16", {"fault_around": 16}), ("2m", {"huge": True})):
        el = None
        for _ in range(p.get("repeat", 1)):         # best of `repeat` fresh VMs
            vmm = Vmm(host_mem=max(256 * MiB, 2 * n * PAGE + 128 * MiB), protect=protect,
                      integrity=integrity if protect == "digest" else None)
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
        log(f"npf {name:>4} ({integrity if protect == 'digest' else protect}): "
            f"{out[name]['us_per_fault']:.1f} us/fault, "
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
    from hv.trace.replay import replay
    from hv.trace import load_trace
    from hv.vmm.vmm import Vmm
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
