#!/usr/bin/env python3
"""Build the toy guest images.

    python guests/build.py [--out DIR] [--force] [--list]

Builds every guest into guests/build/ (or DIR) with gcc (+ binutils).  The
build is idempotent: a guest is rebuilt only when its sources, the linker
script, the flags or this file changed (a hash stamp sits next to each
image).  Images are written atomically, so concurrent builds are safe.

From Python: ``guests.build.build_all(out_dir=None) -> {name: Path}``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
DEFAULT_OUT = HERE / "build"

COMMON = [
    "-O2", "-ffreestanding", "-fno-pie", "-fno-stack-protector",
    "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-fno-builtin",
    "-fno-exceptions", "-Wall", "-Wextra",
    "-nostdlib", "-static", "-no-pie",
    "-Wl,-z,max-page-size=4096", "-Wl,--build-id=none",
]
FLAGS = {
    64: ["-m64", "-mno-red-zone", "-mcmodel=small"] + COMMON
        + ["-Wl,-T," + str(SRC / "link64.ld")],
    32: ["-m32", "-march=i686"] + COMMON
        + ["-Wl,-T," + str(SRC / "link32.ld")],
}

# name -> (bits, sources, what it does); bits 64 = toy ELF64, 32 = multiboot
GUESTS = {
    "hello": (64, ["crt0_64.S", "lib.c", "hello.c"],
              "prints 'Hello from the guest!', exits 0"),
    "memtouch": (64, ["crt0_64.S", "lib.c", "memtouch.c"],
                 "touches one byte per page up to RAM-64KiB, checks, exits 0/1"),
    "firsttouch": (64, ["crt0_64.S", "lib.c", "firsttouch.c"],
                   "writes one byte per page up to RAM-64KiB once (the first-touch benchmark), exits 0"),
    "compute": (64, ["crt0_64.S", "lib.c", "compute.c"],
                "sieve of primes below 10^6, checks the answer, exits 0/1"),
    "paging": (64, ["crt0_64.S", "lib.c", "paging.c"],
               "own 4-level page tables with 4K/2M aliases, exits 0/1"),
    "jump_unmapped": (64, ["crt0_64.S", "lib.c", "jump_unmapped.c"],
                      "jumps beyond its RAM: an instruction-fetch NPF the VMM cannot back, exit 1"),
    "triple_fault": (64, ["crt0_64.S", "lib.c", "triple_fault.c"],
                     "empty IDT + ud2: triple fault"),
    "mb_hello": (32, ["mb_boot.S", "lib.c", "mb_hello.c"],
                 "multiboot v1: prints mem_lower/mem_upper to VGA+serial, exits 0"),
}


class BuildError(RuntimeError):
    """The guests could not be built (no compiler, compile error)."""


def _compiler() -> str:
    cc = os.environ.get("HV_GUEST_CC") or shutil.which("gcc")
    if not cc or not shutil.which(cc):
        raise BuildError("gcc not found: the guest images need gcc and binutils "
                         "(apt-get install gcc binutils)")
    return cc


def _stamp(name: str, cc: str) -> str:
    bits, sources, _ = GUESTS[name]
    h = hashlib.sha256()
    h.update(cc.encode())
    h.update("\0".join(FLAGS[bits]).encode())
    h.update(Path(__file__).read_bytes())
    for f in sorted(set(sources) | {"guest.h", "link64.ld", "link32.ld"}):
        h.update(f.encode() + b"\0" + (SRC / f).read_bytes())
    return h.hexdigest()


def build_one(name: str, out_dir: Path, cc: str | None = None, force: bool = False) -> Path:
    """Build guest `name` into out_dir (if out of date); return its path."""
    if name not in GUESTS:
        raise BuildError(f"unknown guest {name!r} (known: {', '.join(GUESTS)})")
    cc = cc or _compiler()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    stamp_file = out_dir / f".{name}.stamp"
    stamp = _stamp(name, cc)
    if (not force and target.is_file() and stamp_file.is_file()
            and stamp_file.read_text() == stamp):
        return target
    bits, sources, _ = GUESTS[name]
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS[bits], "-I", str(SRC), "-o", tmp, *[str(SRC / s) for s in sources]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"building guest {name} failed:\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
        tmp = None
        fd, tmp_stamp = tempfile.mkstemp(prefix=f".{name}.stamp.", dir=out_dir)
        with os.fdopen(fd, "w") as f:
            f.write(stamp)
        os.replace(tmp_stamp, stamp_file)
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build_all(out_dir: str | os.PathLike | None = None, force: bool = False) -> dict[str, Path]:
    """Build every guest (if out of date) and return {name: path}."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    cc = _compiler()
    return {name: build_one(name, out, cc, force) for name in GUESTS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the hv toy guest images.")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default guests/build)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--list", action="store_true", help="list the guests and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, (bits, _, what) in GUESTS.items():
            print(f"{name:14} {'ELF64' if bits == 64 else 'multiboot'}  {what}")
        return 0
    try:
        paths = build_all(args.out, force=args.force)
    except BuildError as e:
        print(f"guests/build.py: {e}", file=sys.stderr)
        return 1
    for name, p in paths.items():
        print(f"{name:14} {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
