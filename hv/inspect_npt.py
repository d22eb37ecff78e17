"""`hv inspect`: what a VM's nested page table holds.

A snapshot is what the VMM can see: the table pages reachable from the root
in host memory, plus the PSP's public counters (PLATFORM_STATUS and
GUEST_STATUS). It is saved as JSON (`hv replay --save FILE`) and can be
inspected later without the run that made it.
"""
import base64
import json

from nptcore import get_engine
from nptcore.bits import NX, W

from .errors import BadInput
from .hostmem import HostMemory

SNAPSHOT_VERSION = 1


def take_snapshot(vmm, vm):
    root = vmm.npt_root(vm)
    pages = vmm.engine.table_pages(root)
    plat = vmm.psp.platform_status().fields
    gst = vmm.psp.guest_status(vm.handle).fields
    return {
        "version": SNAPSHOT_VERSION,
        "host_size": vmm.mem.size,
        "root": root,
        "handle": vm.handle,
        "digest": gst.get("digest", b"").hex(),
        "frames": {k[len("frames_"):]: v for k, v in plat.items() if k.startswith("frames_")}
                  | {"pool": plat.get("pool_free", 0)},
        "tables": [[hpa, lvl, base64.b64encode(vmm.mem.read(hpa, 4096)).decode()]
                   for hpa, lvl in pages],
    }


def save_snapshot(path, snap):
    with open(path, "w") as f:
        json.dump(snap, f)


def load_snapshot(path):
    try:
        with open(path) as f:
            snap = json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not an hv snapshot (invalid JSON: {e.__class__.__name__})") from None
    if not isinstance(snap, dict) or snap.get("version") != SNAPSHOT_VERSION:
        raise BadInput(f"{path}: not an hv snapshot (missing or unknown version)")
    try:
        size = int(snap["host_size"])
        root = int(snap["root"])
        tables = [(int(h), int(lv), base64.b64decode(d, validate=True)) for h, lv, d in snap["tables"]]
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{path}: malformed snapshot ({e.__class__.__name__}: {e})") from None
    for hpa, _lv, data in tables:
        if len(data) != 4096 or hpa % 4096 or not 0 <= hpa < size:
            raise BadInput(f"{path}: malformed snapshot (table page {hpa:#x})")
    snap["_tables"] = tables
    snap["_root"] = root
    snap["_size"] = size
    return snap


def perms(entry):
    return "r" + ("w" if entry & W else "-") + ("-" if entry & NX else "x")


def coalesce(mappings):
    """Merge runs of mappings contiguous in GPA and HPA with equal size/perms."""
    out = []
    for gpa, hpa, size, entry in mappings:
        p = perms(entry)
        if out:
            g0, h0, n, s0, p0 = out[-1]
            if s0 == size and p0 == p and g0 + n == gpa and h0 + n == hpa:
                out[-1][2] += size
                continue
        out.append([gpa, hpa, size, size, p])
    return [{"gpa": g, "hpa": h, "bytes": n, "page_size": s, "perms": p} for g, h, n, s, p in out]


def analyse(snap, backend=None):
    """Rebuild the table pages in a sparse scratch memory and walk them."""
    mem = HostMemory(snap["_size"])
    for hpa, _lv, data in snap["_tables"]:
        mem.write(hpa, data)
    eng = get_engine(mem.buf, backend)
    maps = eng.mappings(snap["_root"])
    pages = eng.table_pages(snap["_root"])
    per_level = {str(lv): 0 for lv in (4, 3, 2, 1)}
    for _hpa, lv in pages:
        per_level[str(lv)] = per_level.get(str(lv), 0) + 1
    mapped_bytes = sum(m[2] for m in maps)
    return {
        "root": snap["_root"],
        "digest": snap.get("digest", ""),
        "ranges": coalesce(maps),
        "mappings": len(maps),
        "mapped_bytes": mapped_bytes,
        "table_pages": per_level,
        "frames": snap.get("frames", {}),
    }


def format_report(rep):
    lines = [f"NPT root {rep['root']:#x}  digest {rep['digest'][:16]}...",
             f"{rep['mappings']} leaf mappings, {rep['mapped_bytes'] // 1024} KiB mapped, "
             f"{len(rep['ranges'])} ranges",
             "",
             f"{'GPA range':>37}  {'HPA base':>14}  {'size':>10}  page  perms"]
    for r in rep["ranges"]:
        lines.append(f"{r['gpa']:#018x}-{r['gpa'] + r['bytes'] - 1:#018x}  {r['hpa']:#14x}  "
                     f"{_size(r['bytes']):>10}  {_size(r['page_size']):>4}  {r['perms']}")
    lines.append("")
    lines.append("table pages per level: " + ", ".join(
        f"L{lv}={n}" for lv, n in sorted(rep["table_pages"].items(), reverse=True)))
    if rep["frames"]:
        lines.append("frame states: " + ", ".join(f"{k}={v}" for k, v in rep["frames"].items()))
    return "\n".join(lines)


def _size(n):
    for unit, sh in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << sh and n % (1 << sh) == 0:
            return f"{n >> sh}{unit}"
    return str(n)
