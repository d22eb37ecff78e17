"""`hv inspect`: what a VM's nested page table holds.

A snapshot is what the VMM can see: the table pages reachable from the root
in host memory, plus the PSP's public counters (PLATFORM_STATUS and
GUEST_STATUS). It is saved as JSON (`hv replay --save FILE`) and can be
inspected later without the run that made it.
"""
import base64
import json
import os
import stat
import tempfile

from nptcore import get_engine
from nptcore.bits import NX, W

from hv.errors import BadInput
from hv.vmm.hostmem import HostMemory

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
    """Write the snapshot to path whole or not at all: a temporary file in
    the same directory, renamed over path (an interrupted run leaves no
    half-written snapshot, and an existing file stays as it was)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".hv-snapshot-", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


HPA_LIMIT = 1 << 52          # NPT entries hold frames below 2^52
_MAX_DIGITS = 40             # no number in a snapshot needs more (2^64 has 20 digits)


class _BadNumber(ValueError):
    pass


def _parse_int(text):
    """json's parse_int: a snapshot's numbers are addresses, sizes and
    counts; a longer one is malformed (and Python refuses to convert one of
    over 4300 digits)."""
    digits = text.lstrip("-")
    if len(digits) > _MAX_DIGITS:
        raise _BadNumber(f"a number of {len(digits)} digits")
    return int(text)


def _no_constant(name):
    raise _BadNumber(f"{name} is not a number a snapshot holds")


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def load_snapshot(path):
    def bad(msg):
        return BadInput(f"{path}: malformed snapshot ({msg})")

    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)):
        raise BadInput(f"{path}: is a device or socket, not an hv snapshot")
    try:
        with open(path, "rb") as f:
            snap = json.loads(f.read().decode("utf-8"), parse_int=_parse_int,
                              parse_constant=_no_constant)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: is a directory, not an hv snapshot") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadInput(f"{path}: not an hv snapshot (invalid JSON: {e.__class__.__name__})") from None
    except _BadNumber as e:
        raise BadInput(f"{path}: malformed snapshot ({e})") from None
    except MemoryError:
        raise BadInput(f"{path}: not enough memory to read this snapshot") from None
    if not isinstance(snap, dict) or snap.get("version") != SNAPSHOT_VERSION:
        raise BadInput(f"{path}: not an hv snapshot (missing or unknown version)")
    try:
        size = snap["host_size"]
        root = snap["root"]
        raw = snap["tables"]
    except KeyError as e:
        raise bad(f"no {e.args[0]!r}") from None
    if not _int(size) or size <= 0 or size % 4096 or size > HPA_LIMIT:
        raise bad(f"host_size {size!r} is not a positive multiple of 4 KiB up to 2^52")
    if not _int(root) or root < 0 or root % 4096 or root >= size:
        raise bad(f"root {root:#x} is not a page-aligned address inside host memory"
                  if _int(root) else f"root {root!r} is not an integer")
    if not isinstance(raw, list):
        raise bad("'tables' is not a list")
    tables, seen = [], set()
    for t in raw:
        if not (isinstance(t, list) and len(t) == 3 and _int(t[0]) and _int(t[1])
                and isinstance(t[2], str)):
            raise bad("a 'tables' item is not [hpa, level, base64]")
        hpa, lv, b64 = t
        try:
            data = base64.b64decode(b64, validate=True)
        except ValueError:
            raise bad(f"table page {hpa:#x}: invalid base64") from None
        if hpa % 4096 or not 0 <= hpa < size:
            raise bad(f"table page {hpa:#x} is not a page-aligned address inside host memory")
        if len(data) != 4096:
            raise bad(f"table page {hpa:#x} holds {len(data)} bytes, not 4096")
        if lv not in (1, 2, 3, 4):
            raise bad(f"table page {hpa:#x} has level {lv}, not 1..4")
        if hpa in seen:
            raise bad(f"table page {hpa:#x} listed twice")
        seen.add(hpa)
        tables.append((hpa, lv, data))
    if root not in seen:
        raise bad(f"root {root:#x} is not one of its table pages")
    if not isinstance(snap.get("digest", ""), str):
        raise bad("'digest' is not a string")
    frames = snap.get("frames", {})
    if not isinstance(frames, dict) or not all(_int(v) for v in frames.values()):
        raise bad("'frames' is not an object of counts")
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
    """Rebuild the table pages in a sparse scratch memory and walk them.

    The scratch memory ends at the highest table page, not at host_size (a
    snapshot may claim any host size): a table entry pointing above every
    table page of the snapshot is treated as pointing outside memory."""
    span = max(hpa for hpa, _lv, _d in snap["_tables"]) + 4096
    try:
        mem = HostMemory(span)
    except BadInput:
        raise BadInput(f"cannot inspect a snapshot whose table pages span {span:#x} bytes "
                       f"of host memory") from None
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
