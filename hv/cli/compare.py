"""`hv compare [--json] [--plot DIR] [--quick]`: every protection design side by side.

One run: the attack matrix (every scenario under digest-full, digest-merkle,
isolated, rmp and none: outcome, expectation, exposure) and each design's
costs (first-touch NPF, walk with the design's check, periodic check at 1
and 16 GiB mapped, PSP memory per GiB, guest speed); with --plot an outcome
heatmap and cost bars. Exit code 1 when an outcome differs from what its
scenario expects under that design, else 0; 2 on bad usage.
"""
import argparse
import sys

from hv.cli.common import EXIT_GUEST, EXIT_OK, check_plot_dir, emit_json
from hv.errors import BadInput


def add_parser(sub, common=None):
    p = sub.add_parser("compare", help="every protection design on the same attacks and costs",
                       description=__doc__.split("\n\n", 1)[1].strip())
    p.add_argument("--quick", action="store_true",
                   help="smaller cost runs and a shorter give-up interval for undetected tampers")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # the test suite's size
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="write compare_outcomes.png and compare_costs.png (matplotlib) into DIR")
    p.add_argument("--designs", metavar="LIST", default=None,
                   help="comma-separated subset of digest-full,digest-merkle,isolated,rmp,none")
    p.add_argument("--scenarios", metavar="LIST", default=None,
                   help="comma-separated attack scenarios (default: all)")
    p.add_argument("--no-costs", action="store_true", help="the attack matrix only")
    p.add_argument("--no-matrix", action="store_true", help="the costs only")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log progress to stderr also with --json")
    p.set_defaults(func=cmd_compare)
    return p


def _list(text, known, what):
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in known]
    if unknown or not items:
        raise BadInput(f"compare: unknown {what} {', '.join(unknown) or repr(text)} "
                       f"(have {', '.join(known)})")
    return items


def cmd_compare(args):
    import logging
    from hv.attacks import SCENARIOS, load_guest_scenarios
    from hv.compare import DESIGNS, format_report, run
    load_guest_scenarios("auto")
    designs = _list(args.designs, DESIGNS, "design") if args.designs else None
    scenarios = _list(args.scenarios, list(SCENARIOS), "scenario") if args.scenarios else None
    if args.no_costs and args.no_matrix:
        raise BadInput("compare: --no-costs and --no-matrix leave nothing to do")
    if args.plot:
        check_plot_dir(args.plot, "compare")
    logging.getLogger("psp").setLevel(logging.ERROR)   # every detection warns: expected here

    def log(msg):
        if not args.json or args.verbose:
            print(msg, file=sys.stderr, flush=True)
    res = run(quick=args.quick or args.tiny, tiny=args.tiny, designs=designs, scenarios=scenarios,
              costs=not args.no_costs, matrix=not args.no_matrix, log=log, plot_dir=args.plot)
    if args.json:
        emit_json(res, default=str)
    else:
        print(format_report(res))
    return EXIT_GUEST if res.get("mismatches") else EXIT_OK
