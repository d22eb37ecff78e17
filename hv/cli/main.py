"""`hv` command line: the entry point (`hv`, `python -m hv`).

Builds the parser from one module per subcommand (boot, replay/inspect,
attack, bench) and maps every outcome to an exit code: 0 ok; 1 the guest
failed (or, for `hv boot`, did not finish within --max-insns); 2 bad input
or usage (one line on stderr, never a traceback); 3 the PSP stopped the VM
(tamper detected); 130 interrupted. Nothing imports this module but
`hv.__main__` and the console script.
"""
import logging
import os
import sys

from hv.cli import attack as attack_cli, bench as bench_cli, boot as boot_cli, replay as replay_cli
from hv.cli.common import (EXIT_GUEST, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, Parser,
                           add_common_options, check_host_mem_file, emit_json, json_state,
                           setup_logging)
from hv.errors import BadInput


def build_parser():
    ap = Parser(prog="hv", description="Hypervisor prototype with PSP-managed nested page tables")
    sub = ap.add_subparsers(dest="cmd", parser_class=Parser)
    replay_cli.add_parser(sub)
    for mod in (boot_cli, attack_cli, bench_cli):
        mod.add_parser(sub, add_common_options)
    return ap


def _psp_dead(args, e):
    """hv.psp_link.process.PspDead: the PSP process crashed, hung or was killed."""
    if getattr(args, "json", False) and not json_state.printed:
        emit_json({"exit_reason": "psp_dead", "exit_code": EXIT_GUEST, "error": str(e)})
    print(f"hv: PSP dead: {' '.join(str(e).splitlines())}", file=sys.stderr)
    return EXIT_GUEST


def main(argv=None):
    json_state.printed = False
    args = None
    try:
        ap = build_parser()
        args = ap.parse_args(argv)
        if not args.cmd:
            raise BadInput("usage: hv {boot,replay,attack,bench,inspect} ... (hv --help)")
        setup_logging(getattr(args, "verbose", 0))
        check_host_mem_file(args)
        return args.func(args)
    except BadInput as e:
        print(f"hv: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("hv: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:   # never a traceback on the terminal
        if getattr(e, "exit_reason", None) == "psp_dead":
            return _psp_dead(args, e)
        logging.getLogger("hv").debug("internal error", exc_info=True)
        msg = " ".join(f"{e.__class__.__name__}: {e}".splitlines())
        if getattr(args, "json", False) and not json_state.printed:
            try:
                emit_json({"exit_reason": "error", "exit_code": EXIT_GUEST,
                           "error": f"internal error: {msg}"})
            except Exception:   # noqa: BLE001 - stdout itself is broken
                pass
        print(f"hv: internal error: {msg} (run with HV_DEBUG=1 for a traceback)", file=sys.stderr)
        if os.environ.get("HV_DEBUG"):
            raise
        return EXIT_GUEST


if __name__ == "__main__":
    sys.exit(main())
