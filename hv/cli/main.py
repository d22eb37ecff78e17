"""`hv` command line: boot, replay, attack, bench, inspect.

Exit codes: 0 ok; 1 the guest failed (or, for `hv boot`, did not finish
within --max-insns); 2 bad input or usage (one line on stderr, never a
traceback); 3 the PSP stopped the VM (tamper detected).
"""
import argparse
import json
import logging
import os
import sys

from .errors import BadInput

EXIT_OK, EXIT_GUEST, EXIT_INPUT, EXIT_TAMPER = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # main() prints "hv: " first: name the subcommand, not "hv" twice
        raise BadInput(message if self.prog == "hv" else f"{self.prog}: {message}")


def _size_arg(text):
    """A size option (--host-mem, --mem): a positive multiple of 4 KiB."""
    from .hostmem import PAGE, parse_size
    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n % PAGE:
        raise argparse.ArgumentTypeError(f"size must be a multiple of 4 KiB: {text!r}")
    return n


def _bytes_arg(text):
    """A byte count (--max-trace-bytes): positive, with an optional unit (512M, 4G)."""
    from .hostmem import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _timeout_arg(text):
    """--psp-timeout: seconds, > 0 (inf: never declare the PSP dead)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0:       # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0 seconds: {text!r}")
    return v


_json_printed = False


def emit_json(obj, **kw):
    """Print the command's one JSON object on stdout (and remember that it was)."""
    global _json_printed
    print(json.dumps(obj, **kw))
    _json_printed = True


def _common(p, psp=True):
    from nptcore import available_backends
    p.add_argument("--backend", choices=["c", "python"], default=None,
                   help="NPT engine backend (default: c when built; available: %s)"
                   % ",".join(available_backends()))
    p.add_argument("--host-mem", type=_size_arg, default=1 << 30, metavar="SIZE",
                   help="host memory size (default 1G; untouched pages cost nothing)")
    p.add_argument("--host-mem-file", default=None, metavar="FILE",
                   help="back host memory with this file instead of anonymous memory "
                        "(a new or empty file; it starts zero-filled and is kept)")
    p.add_argument("--host-mem-file-overwrite", action="store_true",
                   help="let --host-mem-file overwrite an existing non-empty file")
    from psp_firmware import INTEGRITY_MODES
    p.add_argument("--integrity", default=None, choices=sorted(INTEGRITY_MODES),
                   help="PSP integrity mode: full (patent-literal: re-hash the whole table on "
                        "every update) or merkle (hash tree; the default)")
    if psp:
        p.add_argument("--psp", choices=["inprocess", "process"], default="inprocess",
                       help="where the PSP firmware runs")
        p.add_argument("--psp-timeout", type=_timeout_arg, default=5.0, metavar="S",
                       help="seconds before a silent PSP process is declared dead")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log every NPF (-v) and PSP command (-vv) to stderr")


def build_parser():
    ap = _Parser(prog="hv", description="Hypervisor prototype with PSP-managed nested page tables")
    sub = ap.add_subparsers(dest="cmd", parser_class=_Parser)

    p = sub.add_parser("replay", help="replay a fault trace through the PSP-managed NPT")
    p.add_argument("trace")
    p.add_argument("--format", choices=["csv", "lackey", "ftrace"], default=None)
    p.add_argument("--fault-around", type=int, default=1, metavar="N",
                   help="map N pages (aligned block) per fault")
    p.add_argument("--huge", action="store_true", help="map 2 MiB pages where possible")
    p.add_argument("--save", metavar="FILE", help="save the table for `hv inspect FILE`")
    p.add_argument("--inspect", action="store_true", help="show the table after the replay")
    from .trace import MAX_TRACE_BYTES
    p.add_argument("--max-trace-bytes", type=_bytes_arg, default=MAX_TRACE_BYTES, metavar="SIZE",
                   help="refuse a trace file, or gzip data decompressing, larger than SIZE "
                        "(default 4G; e.g. 512M)")
    _common(p)

    p = sub.add_parser("inspect", help="show a saved NPT snapshot")
    p.add_argument("snapshot")
    p.add_argument("--backend", choices=["c", "python"], default=None)
    p.add_argument("--json", action="store_true")

    from . import attack_cli, bench_cli, boot_cli
    for mod in (boot_cli, attack_cli, bench_cli):
        mod.add_parser(sub, _common)
    return ap


def _setup_logging(verbose):
    level = logging.WARNING
    if verbose >= 1:
        level = logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level, format="%(name)s: %(message)s")
    # the PSP's own log (tamper reports, -vv: every command) is reported by
    # the commands themselves; show it raw only when asked
    logging.getLogger("psp").setLevel(logging.INFO if verbose >= 2 else logging.ERROR)


def _progress(enabled):
    if not enabled or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    prog = Progress(TextColumn("replay"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeRemainingColumn(), transient=True, console=_stderr_console())
    task = prog.add_task("replay", total=None)

    def cb(done, total):
        prog.update(task, completed=done, total=total)
    return prog, cb


def _stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def make_vmm(args):
    from .vmm import Vmm
    return Vmm(host_mem=args.host_mem, host_mem_path=args.host_mem_file, backend=args.backend,
               integrity=args.integrity, psp=getattr(args, "psp", "inprocess"),
               psp_timeout=getattr(args, "psp_timeout", 5.0))


def cmd_replay(args):
    from .inspect_npt import analyse, format_report, load_snapshot, save_snapshot, take_snapshot
    from .replay import replay
    from .trace import load_trace
    trace = load_trace(args.trace, args.format, max_bytes=args.max_trace_bytes)
    if args.save:
        _check_output_path(args.save, "--save")
    vmm = make_vmm(args)
    try:
        vm = vmm.create_vm(fault_around=args.fault_around, huge=args.huge)
        prog, cb = _progress(not args.json)
        if prog:
            with prog:
                res = replay(vmm, vm, trace, progress=cb)
        else:
            res = replay(vmm, vm, trace)
        stopped = res["stopped"]
        st = vmm.psp.guest_status(vm.handle)
        digest = st.fields.get("digest", b"").hex()
        tamper = stopped is not None and stopped.status.name in ("INTEGRITY_FAILURE", "GUEST_STOPPED")
        out = {
            "trace": args.trace,
            "format": trace.format,
            "accesses": res["accesses"],
            "npf": res["npf"],
            "pages_mapped": res["pages_mapped"],
            "psp_commands": vmm.psp.commands,
            "refused": vmm.psp.refused,
            "tamper_detected": tamper,
            "digest": digest,
            "backend": vmm.backend,
            "integrity": args.integrity or "default",
            "psp": vmm.psp_kind,
            "elapsed_s": round(res["elapsed_s"], 6),
            "accesses_per_s": round(res["accesses"] / res["elapsed_s"]) if res["elapsed_s"] else None,
            "stopped": str(stopped) if stopped else None,
        }
        if args.save or args.inspect:
            snap = take_snapshot(vmm, vm)
            if args.save:
                try:
                    save_snapshot(args.save, snap)
                except OSError as e:
                    raise BadInput(f"cannot write snapshot {args.save} (--save): "
                                   f"{e.strerror or e}") from None
            if args.inspect:
                import tempfile
                with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                    save_snapshot(f.name, snap)
                rep = analyse(load_snapshot(f.name), args.backend)
                os.unlink(f.name)
                out["inspect"] = rep
        if args.json:
            emit_json(out)
        else:
            print(f"{trace.format} trace {args.trace}: {out['accesses']} accesses, {out['npf']} NPFs, "
                  f"{out['pages_mapped']} pages mapped, {out['psp_commands']} PSP commands "
                  f"({out['refused']} refused), backend {out['backend']}")
            print(f"NPT digest {digest}")
            if stopped:
                print(f"stopped: {stopped}")
            if args.inspect:
                print(format_report(out["inspect"]))
        if tamper:
            return EXIT_TAMPER
        return EXIT_GUEST if stopped else EXIT_OK
    finally:
        vmm.close()


def cmd_inspect(args):
    from .inspect_npt import analyse, format_report, load_snapshot
    rep = analyse(load_snapshot(args.snapshot), args.backend)
    if args.json:
        emit_json(rep)
    else:
        print(format_report(rep))
    return EXIT_OK


def _check_output_path(path, option):
    """Refuse an output file that cannot be created, before the work is done."""
    if os.path.isdir(path):
        raise BadInput(f"cannot write {path} ({option}): is a directory")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise BadInput(f"cannot write {path} ({option}): no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                     and not os.access(path, os.W_OK)):
        raise BadInput(f"cannot write {path} ({option}): permission denied")


def _check_host_mem_file(args):
    """Refuse --host-mem-file naming a non-empty file before any work is done
    (HostMemory refuses it too; with --host-mem-file-overwrite it is allowed
    for every host memory this run sets up)."""
    path = getattr(args, "host_mem_file", None)
    overwrite = getattr(args, "host_mem_file_overwrite", False)
    if overwrite and path is None:
        raise BadInput("--host-mem-file-overwrite needs --host-mem-file FILE")
    if path is not None:
        from .hostmem import check_file
        check_file(path, overwrite=overwrite)


def _psp_dead(args, e):
    """hv.psp_process.PspDead: the PSP process crashed, hung or was killed."""
    if getattr(args, "json", False) and not _json_printed:
        emit_json({"exit_reason": "psp_dead", "exit_code": EXIT_GUEST, "error": str(e)})
    print(f"hv: PSP dead: {' '.join(str(e).splitlines())}", file=sys.stderr)
    return EXIT_GUEST


def main(argv=None):
    global _json_printed
    _json_printed = False
    args = None
    try:
        ap = build_parser()
        args = ap.parse_args(argv)
        if not args.cmd:
            raise BadInput("usage: hv {boot,replay,attack,bench,inspect} ... (hv --help)")
        _setup_logging(getattr(args, "verbose", 0))
        _check_host_mem_file(args)
        handler = getattr(args, "func", None) or {"replay": cmd_replay, "inspect": cmd_inspect}[args.cmd]
        return handler(args)
    except BadInput as e:
        print(f"hv: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("hv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:   # never a traceback on the terminal
        if getattr(e, "exit_reason", None) == "psp_dead":
            return _psp_dead(args, e)
        logging.getLogger("hv").debug("internal error", exc_info=True)
        msg = " ".join(f"{e.__class__.__name__}: {e}".splitlines())
        if getattr(args, "json", False) and not _json_printed:
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
