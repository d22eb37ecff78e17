#!/usr/bin/env python3
"""The long benchmark run recorded in docs/benchmarks.md.

    .venv/bin/python scripts/bench_full.py [--out results.json] [--plot DIR] [--quick]

Runs the "full" profile of hv/bench/ (walks and integrity from 16 MiB to
16 GiB mapped in 6 steps, 1M walks per size, NPF path on 32768 pages, a real
valgrind lackey trace when valgrind is installed, KVM side by side, guest
speed, peak RSS), prints the human-readable report on stderr-free stdout and
writes every figure as JSON.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_full.json", help="JSON results file")
    ap.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots into DIR")
    ap.add_argument("--quick", action="store_true", help="the quick profile instead")
    args = ap.parse_args(argv)
    import hv.bench as bench
    res = bench.run("quick" if args.quick else "full", plot_dir=args.plot,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(bench.format_report(res))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
