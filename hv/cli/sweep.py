"""`hv sweep SPEC`: grids of `hv replay` / `hv boot` runs (docs/sweep.md).

The SPEC, the executors and the results files are hv/sweep; this module
adds the command line's part: which options a point may vary (those of the
`hv replay` / `hv boot` parsers, less the ones that write files), every
point checked by those parsers before anything runs, bundled guests built
here, and :func:`run_point`, the runner the executors call on their
workers: it runs a point exactly as `hv replay ... --json` / `hv boot ...
--json` would (the same parser, run_replay / run_boot, error_outcome) and
returns its exit code and JSON object instead of printing them.
"""
import argparse
import os
import sys

from hv.cli import boot as boot_cli, replay as replay_cli
from hv.cli.common import (EXIT_GUEST, EXIT_OK, Parser, add_common_options, check_host_mem_file,
                           emit_json, error_outcome, setup_logging)
from hv.errors import BadInput

# options a point cannot vary: they write files, or change what is printed
FIXED_OPTIONS = frozenset({"json", "save", "record", "serial", "host-mem-file",
                           "host-mem-file-overwrite", "verbose", "help"})
_RUNNERS = {"replay": replay_cli.run_replay, "boot": boot_cli.run_boot}


def _jobs_arg(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return v


def add_parser(sub):
    p = sub.add_parser("sweep", help="run hv replay / hv boot over a grid of inputs and options "
                                     "(a TOML SPEC), locally or on Ray")
    p.add_argument("spec", help="the SPEC: inputs = [...] and [axes] (docs/sweep.md)")
    p.add_argument("--out", metavar="DIR",
                   help="results folder (default sweep-NAME, NAME the SPEC's file name)")
    p.add_argument("--resume", action="store_true",
                   help="run only the points that have no row in DIR yet (and the failed ones)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: rows, ran, skipped, failed")
    p.add_argument("--plot", action="store_true", help="draw DIR/sweep.png (needs matplotlib)")
    p.add_argument("--executor", choices=["local", "ray"], default=None,
                   help="local worker processes (default) or Ray tasks")
    p.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="Ray cluster: HOST:PORT, auto, or local (start one for this run); "
                        "implies --executor ray")
    p.add_argument("-j", "--jobs", type=_jobs_arg, default=None, metavar="N",
                   help="points at once (default: this machine's CPUs; Ray: the cluster's)")
    p.set_defaults(func=cmd_sweep)
    return p


class _PointParser:
    """The parsers of `hv replay` and `hv boot`, as main() builds them."""
    _instance = None

    def __init__(self):
        self.parser = Parser(prog="hv")
        sub = self.parser.add_subparsers(dest="cmd", parser_class=Parser)
        replay_cli.add_parser(sub)
        boot_cli.add_parser(sub, add_common_options)
        self.options = {}
        for cmd in _RUNNERS:
            names = set()
            for action in sub.choices[cmd]._actions:
                names.update(s[2:] for s in action.option_strings if s.startswith("--"))
            self.options[cmd] = names

    @classmethod
    def get(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


def applies(command, option):
    """May a sweep vary `option` (a long option without its dashes) of `hv command`?"""
    return option in _PointParser.get().options.get(command, ()) and option not in FIXED_OPTIONS


def run_point(argv):
    """Run `hv ARGV --json` as main() runs it, printing nothing -> (exit
    code, the JSON object it prints).  The executors call this on their
    workers (ARGV: [command, input file, options...])."""
    setup_logging(0)
    try:
        args = _PointParser.get().parser.parse_args([*argv, "--json"])
        check_host_mem_file(args)
        return _RUNNERS[args.cmd](args)
    except Exception as e:     # noqa: BLE001 - what main() maps to an exit code, so do we
        code, report, _ = error_outcome(e)
        return code, report


def _with_images(spec):
    """The SPEC's inputs, bundled guests built (here, once) and given their image."""
    from dataclasses import replace
    out = []
    for inp in spec.inputs:
        if inp.guest is not None:
            path = boot_cli.resolve_image(inp.guest)
            if not os.path.isfile(path):
                raise BadInput(f"{spec.path}: input {inp.label}: no bundled guest named "
                               f"{inp.guest!r}")
            inp = replace(inp, path=os.path.abspath(path))
        out.append(inp)
    return out


def _points(spec):
    from hv.sweep import expand
    from hv.sweep.run import task_for
    from hv.sweep.spec import Point
    inputs = {i.label: i for i in _with_images(spec)}
    points = [Point(inputs[p.input.label], p.axes) for p in expand(spec, applies)]
    parser = _PointParser.get().parser
    for p in points:
        try:
            parser.parse_args([*task_for(p).argv(), "--json"])
        except BadInput as e:
            raise BadInput(f"{spec.path}: point {p.key}: {e}") from None
    return points


def _executor(args):
    kind = args.executor or ("ray" if args.ray_address else "local")
    if kind == "ray":
        from hv.sweep.rayexec import RayExecutor
        return RayExecutor(args.ray_address or "auto", jobs=args.jobs)
    if args.ray_address:
        raise BadInput("sweep: --ray-address needs --executor ray")
    from hv.sweep import LocalExecutor
    return LocalExecutor(jobs=args.jobs)


def _default_out(spec_path):
    name = os.path.basename(spec_path)
    if name.endswith(".toml"):
        name = name[:-5]
    return f"sweep-{name or 'spec'}"


def cmd_sweep(args):
    from hv.sweep import Results, load_spec, run_sweep
    spec = load_spec(args.spec)
    points = _points(spec)
    executor = _executor(args)
    out_dir = args.out or _default_out(args.spec)
    results = None
    try:
        executor.start()          # a cluster that cannot be reached: exit 2, nothing written
        results = Results(out_dir, resume=args.resume, axes=list(spec.axes))
        summary = run_sweep(points, results, executor, run_point)
    except KeyboardInterrupt:
        if results is not None:
            done = sum(p.key in results.rows for p in points)
            print(f"hv: sweep interrupted: {done} of {len(points)} points have their row in "
                  f"{out_dir} (hv sweep {args.spec} --out {out_dir} --resume runs the rest)",
                  file=sys.stderr)
        raise
    finally:
        if results is not None:
            results.close()
        executor.close()
    if args.plot:
        from hv.sweep.plot import plot_rows
        summary["plot"] = plot_rows(summary["rows"], list(spec.axes),
                                    os.path.join(out_dir, "sweep.png"))
        if summary["plot"] is None:
            print("hv: sweep: no plot: no axis with two values among rows that have NPFs",
                  file=sys.stderr)
    if args.json:
        emit_json(summary)
    else:
        print(format_summary(summary, list(spec.axes), args.spec))
    return EXIT_GUEST if summary["failed"] else EXIT_OK


_SHOWN = ("npf", "pages_mapped", "psp_commands", "elapsed_s")


def format_summary(summary, axes, spec_path, max_rows=60):
    """The summary without --json: a table of the rows (when not too many),
    then the counts and where the files are."""
    rows = summary["rows"]
    lines = []
    if rows and len(rows) <= max_rows:
        cols = ["input", *axes, *_SHOWN, "exit"]
        cells = []
        for r in rows:
            c = [str(r.get("input", ""))]
            c += ["" if r.get(a) is None else str(r[a]) for a in axes]
            c += ["" if r.get(k) is None else str(r[k]) for k in _SHOWN]
            c.append(f"{r.get('exit_code')}" + (f" {r['error']}" if r.get("error") else ""))
            cells.append(c)
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(cols)]
        fmt = "  ".join(f"{{:{w}}}" for w in widths[:-1]) + "  {}"
        lines.append(fmt.format(*cols))
        lines.extend(fmt.format(*c) for c in cells)
    ex = summary["executor"] + (f" x{summary['jobs']}" if summary.get("jobs") else "")
    lines.append(f"hv sweep {spec_path}: {summary['points']} points: ran {summary['ran']} "
                 f"({summary['failed']} failed), skipped {summary['skipped']}; "
                 f"{summary['wall_s']:.1f} s on {ex}")
    out = summary["out"]
    files = f"{os.path.join(out, 'results.csv')}, {os.path.join(out, 'results.jsonl')}"
    if summary.get("plot"):
        files += f", {summary['plot']}"
    lines.append(f"results: {files}")
    return "\n".join(lines)
