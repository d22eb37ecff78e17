"""`hv replay TRACE` (a fault trace through the NPF path) and `hv inspect FILE`
(a table saved by `hv replay --save`)."""
import os
import sys

from hv.cli.common import (EXIT_GUEST, EXIT_OK, EXIT_TAMPER, add_common_options, bytes_arg,
                           check_output_path, emit_json, make_vmm, progress_bar)
from hv.errors import BadInput


def add_parser(sub):
    p = sub.add_parser("replay", help="replay a fault trace through the PSP-managed NPT")
    p.add_argument("trace")
    p.add_argument("--format", choices=["csv", "lackey", "ftrace", "perf"], default=None,
                   help="trace format (default: detected from the content; docs/formats.md)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="leave out lines that would be refused (a line cut off by a killed "
                        "tracer, a bad record) instead of refusing the trace; says how many")
    p.add_argument("--fault-around", type=int, default=1, metavar="N",
                   help="map N pages (aligned block) per fault")
    p.add_argument("--huge", action="store_true", help="map 2 MiB pages where possible")
    p.add_argument("--save", metavar="FILE", help="save the table for `hv inspect FILE`")
    p.add_argument("--inspect", action="store_true", help="show the table after the replay")
    from hv.trace import MAX_TRACE_BYTES
    p.add_argument("--max-trace-bytes", type=bytes_arg, default=MAX_TRACE_BYTES, metavar="SIZE",
                   help="refuse a trace file, or gzip data decompressing, larger than SIZE "
                        "(default 4G; e.g. 512M)")
    add_common_options(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("inspect", help="show a saved NPT snapshot")
    p.add_argument("snapshot")
    p.add_argument("--backend", choices=["c", "python"], default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def run_replay(args, progress=None):
    """`hv replay` on parsed options, printing nothing -> (exit code, the
    JSON object `--json` prints).  `progress(done, total)`: see replay().
    Used by cmd_replay and by each point of `hv sweep`."""
    from hv.trace.inspect import analyse, load_snapshot, save_snapshot, take_snapshot
    from hv.trace.replay import replay
    from hv.trace import load_trace
    if args.save:
        check_output_path(args.save, "--save")
    trace = load_trace(args.trace, args.format, max_bytes=args.max_trace_bytes,
                       skip_bad_lines=args.skip_bad_lines)
    vmm = make_vmm(args)
    try:
        vm = vmm.create_vm(fault_around=args.fault_around, huge=args.huge)
        res = replay(vmm, vm, trace, progress=progress)
        stopped = res["stopped"]
        st = vmm.psp.guest_status(vm.handle)
        digest = st.fields.get("digest", b"").hex()
        tamper = stopped is not None and stopped.status.name in ("INTEGRITY_FAILURE", "GUEST_STOPPED",
                                                                "RMP_FAULT")
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
            "integrity": _integrity_name(st.fields.get("level_mode"), args.integrity),
            "psp": vmm.psp_kind,
            "protect": vmm.protect,
            "elapsed_s": round(res["elapsed_s"], 6),
            "accesses_per_s": round(res["accesses"] / res["elapsed_s"]) if res["elapsed_s"] else None,
            "stopped": str(stopped) if stopped else None,
            "skipped_lines": trace.skipped,
        }
        if trace.skipped:
            out["skipped"] = [{"line": ln, "error": msg} for ln, msg in trace.skipped_lines]
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
        if tamper:
            return EXIT_TAMPER, out
        return (EXIT_GUEST if stopped else EXIT_OK), out
    finally:
        vmm.close()


def cmd_replay(args):
    from hv.trace.inspect import format_report
    prog, cb = progress_bar(not args.json)
    if prog:
        with prog:
            code, out = run_replay(args, cb)
    else:
        code, out = run_replay(args)
    if out["skipped_lines"]:
        n, first = out["skipped_lines"], out["skipped"][0]
        print(f"hv: warning: {args.trace}: skipped {n} bad line{'s' if n != 1 else ''} "
              f"(--skip-bad-lines); the first: line {first['line']}: {first['error']}",
              file=sys.stderr)
    if args.json:
        emit_json(out)
    else:
        print(f"{out['format']} trace {args.trace}: {out['accesses']} accesses, {out['npf']} NPFs, "
              f"{out['pages_mapped']} pages mapped, {out['psp_commands']} PSP commands "
              f"({out['refused']} refused), backend {out['backend']}")
        print(f"NPT digest {out['digest']}")
        if out["stopped"]:
            print(f"stopped: {out['stopped']}")
        if args.inspect:
            print(format_report(out["inspect"]))
    return code


def _integrity_name(mode_id, asked):
    """The integrity mode the PSP says the guest has (GUEST_STATUS level_mode)."""
    from psp_firmware import DEFAULT_INTEGRITY, INTEGRITY_MODES
    for name, cls in INTEGRITY_MODES.items():
        if getattr(cls, "mode_id", None) == mode_id:
            return name
    return asked or DEFAULT_INTEGRITY


def cmd_inspect(args):
    from hv.trace.inspect import analyse, format_report, load_snapshot
    rep = analyse(load_snapshot(args.snapshot), args.backend)
    if args.json:
        emit_json(rep)
    else:
        print(format_report(rep))
    return EXIT_OK
