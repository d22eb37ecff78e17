"""Peak RSS of a replay and a boot at two --host-mem sizes."""
import subprocess
import sys
import tempfile

from hv.bench.common import MiB, PAGE
from hv.bench.guest import _guest_images


_RSS_CHILD = r"""
import os, sys
from hv.cli.main import main
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
