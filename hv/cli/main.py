"""`hv` command line: the entry point (`hv`, `python -m hv`).

Builds the parser from one module per subcommand (boot, replay/inspect,
attack, bench, sweep, compare) and maps every outcome to an exit code: 0 ok; 1 the guest
failed (or, for `hv boot`, did not finish within --max-insns); 2 bad input
or usage (one line on stderr, never a traceback); 3 the PSP stopped the VM
(tamper detected); 130 interrupted. Nothing imports this module but
`hv.__main__` and the console script.
"""
import os
import signal
import sys

# Only modules the interpreter has loaded anyway at the top: everything else
# is imported inside main(), so that a Ctrl-C while hv is still starting
# (its imports take ~100 ms) ends it as cleanly as one later.
EXIT_INTERRUPTED = 130


def build_parser():
    from hv.cli.common import Parser, add_common_options
    from hv.cli import attack as attack_cli, bench as bench_cli, boot as boot_cli
    from hv.cli import compare as compare_cli, replay as replay_cli, sweep as sweep_cli
    ap = Parser(prog="hv", description="Hypervisor prototype with PSP-managed nested page tables",
                epilog="exit codes: 0 ok; 1 the guest failed or did not finish; 2 bad input or "
                       "usage; 3 the PSP stopped the VM (tamper detected); 130 interrupted "
                       "(Ctrl-C). Documentation: docs/usage.md in the project.")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", parser_class=Parser)
    replay_cli.add_parser(sub)
    for mod in (boot_cli, attack_cli, bench_cli):
        mod.add_parser(sub, add_common_options)
    sweep_cli.add_parser(sub)
    compare_cli.add_parser(sub)
    return ap


def version():
    """This installation's version (the package metadata; hv.__version__
    when run from a source tree that is not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version as _v
        try:
            return _v("hv")
        except PackageNotFoundError:
            pass
    except ImportError:         # pragma: no cover - Python < 3.8
        pass
    import hv
    return hv.__version__


def _error_json(want, report):
    """--json: the error as the command's one JSON object on stdout."""
    from hv.cli.common import emit_json, json_state
    if want and not json_state.printed:
        try:
            emit_json(report)
        except Exception:       # noqa: BLE001 - stdout itself is broken
            pass


def main(argv=None):
    """The `hv` command: argv (default sys.argv[1:]) -> the exit code.  Run
    as the program (argv None), a Ctrl-C after it has returned (while the
    interpreter exits) is ignored: the command's outcome is decided."""
    try:
        return _main(argv)
    finally:
        import threading
        if argv is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv            # until the arguments are parsed
    try:
        import logging
        from hv.cli.common import (EXIT_INPUT, EXIT_OK, check_backend, check_host_mem_file,
                                   error_outcome, json_state, outputs, setup_logging)
        from hv.errors import BadInput
    except KeyboardInterrupt:
        print("hv: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    json_state.printed = False
    outputs.reset()
    args = None
    try:
        ap = build_parser()
        args = ap.parse_args(argv)
        want_json = bool(getattr(args, "json", False))
        if args.version:
            print(f"hv {version()}")
            return EXIT_OK
        if not args.cmd:
            raise BadInput("usage: hv {boot,replay,attack,bench,compare,inspect,sweep} ... (hv --help)")
        setup_logging(getattr(args, "verbose", 0))
        check_host_mem_file(args)
        check_backend(args)
        return args.func(args)
    except BadInput as e:
        outputs.remove_created()            # a refused command leaves no new file behind
        code, report, line = error_outcome(e)
        _error_json(want_json, report)
        print(line, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return _interrupted(want_json)
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:   # never a traceback on the terminal
        # a dead PSP process (hv.psp_link.process.PspDead), no memory left
        # (bad input: exit 2) or an internal error
        psp_dead = getattr(e, "exit_reason", None) == "psp_dead"
        code, report, line = error_outcome(e)
        if code == EXIT_INPUT:
            outputs.remove_created()
        elif not psp_dead:
            logging.getLogger("hv").debug("internal error", exc_info=True)
        _error_json(want_json, report)
        print(line, file=sys.stderr)
        if os.environ.get("HV_DEBUG") and not psp_dead and code != EXIT_INPUT:
            raise
        return code


def _interrupted(want_json):
    """Ctrl-C: exit 130 with one line, naming any output left half-written.
    A second Ctrl-C while this is said is ignored."""
    from hv.cli.common import outputs
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:          # not the main thread
        old = None
    try:
        partial = outputs.partial()
        _error_json(want_json, {"exit_reason": "interrupted", "exit_code": EXIT_INTERRUPTED,
                                "error": "interrupted",
                                "partial_outputs": [{"path": p, "option": o}
                                                    for p, o in partial]})
        msg = "hv: interrupted"
        if partial:
            msg += "; partial output left in " + ", ".join(f"{p} ({o})" for p, o in partial)
        print(msg, file=sys.stderr)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
