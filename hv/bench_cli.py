"""`hv bench [--quick] [--json] [--plot DIR]`: see hv/bench.py."""
import argparse
import os
import sys

EXIT_OK = 0


def add_parser(sub, common):
    p = sub.add_parser("bench", help="measure walks, integrity, NPF path, replay, KVM side by side")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and counts (about a minute on two cores)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # the test suite's size
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="write PNG plots (matplotlib) into DIR")
    p.add_argument("--only", metavar="SECTIONS", default=None,
                   help="comma-separated sections: sha256,walks,integrity,npf,replay,kvm,guest,psp,memory")
    common(p)
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args):
    from . import bench
    from .cli import emit_json
    from .errors import BadInput
    profile = "full"
    if args.quick:
        profile = "quick"
    if args.tiny or os.environ.get("HV_BENCH_TINY"):
        profile = "tiny"
    sections = None
    if args.only:
        sections = {s.strip() for s in args.only.split(",") if s.strip()}
        known = {"sha256", "walks", "integrity", "npf", "replay", "kvm", "guest", "psp", "memory"}
        if sections - known:
            raise BadInput(f"bench: unknown section(s) {','.join(sorted(sections - known))}")
        if not sections:
            raise BadInput(f"bench: --only {args.only!r} names no section")
    if args.plot:
        # refuse an unusable --plot DIR now, not after the whole run
        try:
            os.makedirs(args.plot, exist_ok=True)
        except OSError as e:
            raise BadInput(f"bench: cannot create --plot directory {args.plot}: "
                           f"{e.strerror or e}") from None
        if not os.access(args.plot, os.W_OK | os.X_OK):
            raise BadInput(f"bench: cannot write into --plot directory {args.plot}: permission denied")
    quiet = args.json

    def log(msg):
        if not quiet or args.verbose:
            print(msg, file=sys.stderr, flush=True)
    res = bench.run(profile, plot_dir=args.plot, log=log, sections=sections)
    if args.json:
        emit_json(res, default=str)
    else:
        print(bench.format_report(res))
    return EXIT_OK
