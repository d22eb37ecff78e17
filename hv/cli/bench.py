"""`hv bench [--quick] [--json] [--plot DIR]`: see hv/bench/.

`hv bench` does not take the options the other commands share (--backend,
--psp, --integrity, --host-mem, ...): it measures the alternatives side by
side in one run and sets up its own host memory per section.  Given anyway,
they are refused with a line saying which section measures what.
"""
import argparse
import os
import sys

from hv.cli.common import check_plot_dir, emit_json
from hv.errors import BadInput

EXIT_OK, EXIT_FAILED = 0, 1

# the shared options of the other commands -> why hv bench has none of them
_NOT_FOR_BENCH = {
    "--backend": "it measures both NPT engines itself: section walks times C (batch, single) "
                 "against pure Python; the other sections use the C engine when built",
    "--psp": "it measures both PSP transports itself: section psp times the in-process "
             "mailbox against the PSP process; the other sections run the PSP in-process",
    "--psp-timeout": "section psp starts and times its own PSP process; the other sections "
                     "run the PSP in-process",
    "--integrity": "it measures both integrity modes itself: section integrity times full "
                   "against merkle; the other sections use merkle",
    "--host-mem": "every section sets up host memory of the sizes it measures (section "
                  "memory: peak RSS at two --host-mem sizes)",
    "--host-mem-file": "every section sets up its own anonymous host memory",
    "--host-mem-file-overwrite": "every section sets up its own anonymous host memory",
}


class _NotForBench(argparse.Action):
    """A shared option hv bench does not take: refuse it and say why."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise BadInput(f"bench: {option_string} is not an option of hv bench: "
                       f"{_NOT_FOR_BENCH[option_string]} (see hv bench --help)")


def add_parser(sub, common):
    p = sub.add_parser("bench", help="measure walks, integrity, NPF path, replay, KVM side by side")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and counts (about a minute on two cores)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # the test suite's size
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="write PNG plots (matplotlib) into DIR")
    p.add_argument("--only", metavar="SECTIONS", default=None,
                   help="comma-separated sections: sha256,walks,integrity,npf,replay,kvm,kvm_accel,"
                        "guest,psp,memory,design")
    from psp_firmware import DESIGNS
    p.add_argument("--protect", default=None, choices=DESIGNS,
                   help="protection design: the NPF path runs under it and section design adds "
                        "its costs (first-touch NPF, walk with its check, periodic check, PSP "
                        "memory, guest speed; as hv compare); default: the digest design's "
                        "parts, without section design")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="show progress on stderr also with --json (never the NPF log: "
                        "nothing logs inside a timed section)")
    for opt in _NOT_FOR_BENCH:       # hidden: refused with the reason, not "unrecognized"
        p.add_argument(opt, action=_NotForBench, nargs="?", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args):
    import hv.bench as bench
    profile = "full"
    if args.quick:
        profile = "quick"
    if args.tiny or os.environ.get("HV_BENCH_TINY"):
        profile = "tiny"
    sections = None
    if args.only:
        sections = {s.strip() for s in args.only.split(",") if s.strip()}
        known = {"sha256", "walks", "integrity", "npf", "replay", "kvm", "kvm_accel", "guest", "psp",
                 "memory", "design"}
        if sections - known:
            raise BadInput(f"bench: unknown section(s) {','.join(sorted(sections - known))}")
        if not sections:
            raise BadInput(f"bench: --only {args.only!r} names no section")
    if args.plot:
        check_plot_dir(args.plot, "bench")
    quiet = args.json

    def log(msg):
        if not quiet or args.verbose:
            print(msg, file=sys.stderr, flush=True)
    res = bench.run(profile, plot_dir=args.plot, log=log, sections=sections,
                    protect=args.protect)
    if args.json:
        emit_json(res, default=str)
    else:
        print(bench.format_report(res))
    for err in res["errors"]:          # a broken section is an error, not a skip
        print(f"hv: bench: section {err}", file=sys.stderr)
    return EXIT_FAILED if res["errors"] else EXIT_OK
