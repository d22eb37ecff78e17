"""`hv` command line: the entry point (`hv`, `python -m hv`).

Builds the parser from one module per subcommand (boot, replay/inspect,
attack, bench, sweep) and maps every outcome to an exit code: 0 ok; 1 the guest
failed (or, for `hv boot`, did not finish within --max-insns); 2 bad input
or usage (one line on stderr, never a traceback); 3 the PSP stopped the VM
(tamper detected); 130 interrupted. Nothing imports this module but
`hv.__main__` and the console script.
"""
import logging
import os
import sys

from hv.cli import (attack as attack_cli, bench as bench_cli, boot as boot_cli, replay as replay_cli,
                    sweep as sweep_cli)
from hv.cli import compare as compare_cli
from hv.cli.common import (EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, Parser, add_common_options,
                           check_host_mem_file, emit_json, error_outcome, json_state,
                           setup_logging)
from hv.errors import BadInput


def build_parser():
    ap = Parser(prog="hv", description="Hypervisor prototype with PSP-managed nested page tables")
    sub = ap.add_subparsers(dest="cmd", parser_class=Parser)
    replay_cli.add_parser(sub)
    for mod in (boot_cli, attack_cli, bench_cli):
        mod.add_parser(sub, add_common_options)
    sweep_cli.add_parser(sub)
    compare_cli.add_parser(sub)
    return ap


def main(argv=None):
    json_state.printed = False
    args = None
    try:
        ap = build_parser()
        args = ap.parse_args(argv)
        if not args.cmd:
            raise BadInput("usage: hv {boot,replay,attack,bench,compare,inspect,sweep} ... (hv --help)")
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
        # a dead PSP process (hv.psp_link.process.PspDead) or an internal error
        psp_dead = getattr(e, "exit_reason", None) == "psp_dead"
        if not psp_dead:
            logging.getLogger("hv").debug("internal error", exc_info=True)
        code, report, line = error_outcome(e)
        if getattr(args, "json", False) and not json_state.printed:
            try:
                emit_json(report)
            except Exception:   # noqa: BLE001 - stdout itself is broken
                pass
        print(line, file=sys.stderr)
        if os.environ.get("HV_DEBUG") and not psp_dead:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
