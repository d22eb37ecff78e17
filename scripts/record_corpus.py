#!/usr/bin/env python3
"""Record a corpus of fault traces: valgrind lackey traces of real programs.

    python3 scripts/record_corpus.py --out corpus          # about a minute on two cores
    hv sweep corpus/sweep.toml --out corpus/results --plot

Runs a dozen programs found on this machine (coreutils, gzip, sort of a
large file, python -c, ...) under ``valgrind --tool=lackey --trace-mem=yes``
and writes each one's memory trace, gzipped, to ``OUT/NAME.lackey.gz``
(what ``hv replay`` reads).  A program that is not installed is skipped.
Each trace is cut after ``--max-lines`` lines (default 4,000,000, about as
many accesses; 0: the whole run), so that a long program's trace stays a
few tens of MB: the cut trace is the program's first accesses.  The input
files the programs read are made here, the same on every run.

Also writes ``OUT/manifest.json`` (each trace's command line, lines,
whether it was cut, the program's exit code) and, unless it exists,
``OUT/sweep.toml``: a SPEC over every trace, integrity full/merkle x
fault-around 1/16.  Needs valgrind (apt-get install valgrind).  Exit
codes: 0 done, 2 bad usage or no valgrind, 130 interrupted (the trace
being written is removed; finished ones stay).
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SPEC = """\
# made by scripts/record_corpus.py: every trace of this folder, four ways
inputs = ["*.lackey.gz"]

[axes]
integrity = ["full", "merkle"]
fault-around = [1, 16]
"""


def programs(data, text, tree):
    """(name, argv) of each program to trace; argv[0] is found on PATH."""
    return [
        ("true", ["true"]),
        ("date", ["date", "-u"]),
        ("ls", ["ls", "-l", "/usr/lib"]),
        ("cat", ["cat", text]),
        ("wc", ["wc", text]),
        ("grep", ["grep", "-c", "7", text]),
        ("sed", ["sed", "s/line/LINE/", text]),
        ("sort", ["sort", text]),
        ("gzip", ["gzip", "-c", data]),
        ("sha256sum", ["sha256sum", data]),
        ("tar", ["tar", "cf", "-", tree]),
        ("find", ["find", "/usr/share", "-maxdepth", "2"]),
        ("awk", ["awk", "{s += $1} END {print s}", text]),
        ("python", [os.path.realpath(sys.executable), "-S", "-c",
                    "print(sum(i * i for i in range(10 ** 5)))"]),
    ]


def make_inputs(work):
    """A text file of 100,000 lines (sort, sed, wc...), 1 MiB of mixed
    bytes (gzip, sha256sum), a folder for tar: deterministic."""
    text = os.path.join(work, "lines.txt")
    with open(text, "w") as f:
        for i in range(1, 100_001):
            f.write(f"{(i * 7919) % 100003} line {i}\n")
    data = os.path.join(work, "data.bin")
    with open(data, "wb") as f:
        x = 1
        chunk = bytearray()
        for i in range(1 << 20):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            chunk.append((x >> 16) & 0xFF if i % 3 else 0x61 + (i % 26))
        f.write(chunk)
    tree = os.path.join(work, "tree")
    for d in range(8):
        os.makedirs(os.path.join(tree, f"d{d}"))
        for k in range(8):
            with open(os.path.join(tree, f"d{d}", f"f{k}.txt"), "w") as f:
                f.write(f"file {d}/{k}\n" * (50 * (k + 1)))
    return data, text, tree


def record(argv, dest, max_lines, cwd):
    """Trace argv into dest (gzip; written to a temporary name first).
    Returns (lines, cut, exit_code)."""
    r, w = os.pipe()
    tmp = dest + ".part"
    proc = subprocess.Popen(["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-fd={w}",
                             *argv], pass_fds=(w,), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    os.close(w)
    lines, cut = 0, False
    try:
        with open(tmp, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=raw,
                              mtime=0) as gz, \
                os.fdopen(r, "rb", buffering=0) as src:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                n = chunk.count(b"\n")
                if max_lines and lines + n >= max_lines:
                    end = -1
                    for _ in range(max_lines - lines):
                        end = chunk.index(b"\n", end + 1)
                    gz.write(chunk[:end + 1])
                    lines, cut = max_lines, True
                    break
                gz.write(chunk)
                lines += n
        if cut:
            proc.kill()
        code = proc.wait()
        os.replace(tmp, dest)
    except BaseException:
        proc.kill()
        proc.wait()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return lines, cut, (None if cut else code)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="corpus", help="folder for the traces (default ./corpus)")
    ap.add_argument("--max-lines", type=int, default=4_000_000, metavar="N",
                    help="cut each trace after N lines (default 4000000; 0: whole runs)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="record only these programs")
    ap.add_argument("--list", action="store_true", help="list the programs and exit")
    args = ap.parse_args(argv)
    if args.max_lines < 0:
        ap.error("--max-lines must be >= 0")
    if shutil.which("valgrind") is None and not args.list:
        print("record_corpus: valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hv-corpus-") as work:
        progs = programs(*(os.path.join(work, n) for n in ("data.bin", "lines.txt", "tree")))
        if args.list:
            for name, cmd in progs:
                print(f"{name:10} {' '.join(cmd)}")
            return 0
        if args.only:
            unknown = sorted(set(args.only) - {n for n, _ in progs})
            if unknown:
                ap.error(f"unknown program {unknown[0]!r} (--list names them)")
            progs = [p for p in progs if p[0] in args.only]
        make_inputs(work)
        os.makedirs(args.out, exist_ok=True)
        manifest_path = os.path.join(args.out, "manifest.json")
        manifest = {}
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
        try:
            for name, cmd in progs:
                if shutil.which(cmd[0]) is None:
                    print(f"  {name:10} skipped: {cmd[0]} not found", file=sys.stderr)
                    continue
                dest = os.path.join(args.out, f"{name}.lackey.gz")
                t0 = time.monotonic()
                lines, cut, code = record(cmd, dest, args.max_lines, work)
                manifest[name] = {"file": os.path.basename(dest), "command": cmd, "lines": lines,
                                  "cut": cut, "exit_code": code}
                print(f"  {name:10} {lines:>10,} lines{' (cut)' if cut else '      '}  "
                      f"{os.path.getsize(dest) / 1e6:6.1f} MB  {time.monotonic() - t0:5.1f} s",
                      file=sys.stderr)
        finally:
            with open(manifest_path + ".tmp", "w") as f:
                json.dump(manifest, f, indent=1)
            os.replace(manifest_path + ".tmp", manifest_path)
    spec = os.path.join(args.out, "sweep.toml")
    if not os.path.exists(spec):
        with open(spec, "w") as f:
            f.write(SPEC)
    print(f"{len(manifest)} traces in {args.out}; sweep them: hv sweep {spec}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("record_corpus: interrupted", file=sys.stderr)
        sys.exit(130)
