"""`hv attack [NAME ...|--all] [--json]`: run the malicious-hypervisor suite.

Every scenario states the outcome it expects under each protection design
(hv/attacks/expect.py); `--protect X` runs the suite under design X. Exit
code 1 only where an outcome differs from the expectation for X (or a
scenario erred), else 0; 2 on bad usage.
"""
import math

from hv.cli.common import add_accel_option, emit_json
from hv.errors import BadInput


def add_parser(sub, common):
    p = sub.add_parser(
        "attack", help="run malicious-hypervisor attack scenarios against the PSP",
        description="Each scenario acts as a malicious VMM (host-memory writes, crafted PSP "
                    "commands, racing threads) and reports refused / prevented / detected "
                    "(with the exposure before detection) / not_flagged (benign A/D updates) / "
                    "undetected, against the outcome it expects under the --protect design.",
        epilog="outcomes: refused (the PSP rejected every malicious command, nothing changed); "
               "prevented (the design made the tamper impossible: under isolated the VMM's "
               "store to the table faults); detected (caught by the next UPDATE_NPT, the "
               "periodic check, or under rmp the RMP check at the access; exposure_insns = "
               "guest instructions (guest driver) or accesses (trace driver) run on the "
               "tampered table; with --accel kvm exposure_ms and exposure_exits instead: wall "
               "time and KVM exits); not_flagged (benign scenario correctly not reported); "
               "undetected (the attack worked: expected under none); skipped (not applicable "
               "here, e.g. no guest images). Exit code 1 only where an outcome differs from "
               "the scenario's expectation for the design, or a scenario erred.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="scenarios to run (default with --all or none given: all); "
                        "a category name (e.g. race, alias) selects its scenarios")
    p.add_argument("--all", action="store_true", help="run every scenario")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--check-insns", type=int, default=None, metavar="N",
                   help="periodic check every N guest instructions (guest driver) / "
                        "accesses (trace driver); default 256 accesses, 20000 instructions")
    p.add_argument("--check-ms", type=float, default=None, metavar="MS",
                   help="interval of the PSP's wall-time checker in the wall-clock scenarios, "
                        "and of the periodic check of the guest scenarios on KVM (default 10)")
    p.add_argument("--driver", choices=["auto", "trace", "guest"], default="auto",
                   help="guest: scenarios that can run a real toy guest do so (needs hv.boot "
                        "and the guest images); trace: a synthetic access loop; auto: guest "
                        "variants are added when available")
    add_accel_option(p)
    common(p)
    p.set_defaults(func=cmd_attack)
    return p


def _select(names, want_all):
    from hv.attacks import SCENARIOS
    if want_all or not names:
        return list(SCENARIOS)
    out = []
    cats = {s.category for s in SCENARIOS.values()}
    for n in names:
        if n in SCENARIOS:
            out.append(n)
        elif n in cats:
            out.extend(k for k, s in SCENARIOS.items() if s.category == n)
        else:
            raise BadInput(f"unknown attack scenario {n!r} (hv attack --list)")
    return list(dict.fromkeys(out))


def cmd_attack(args):
    import hv.attacks as attacks
    if args.check_insns is not None and args.check_insns < 1:
        raise BadInput("--check-insns must be >= 1")
    if args.check_ms is not None and not (args.check_ms > 0 and math.isfinite(args.check_ms)):
        raise BadInput(f"--check-ms must be a finite number > 0, not {args.check_ms}")
    if args.integrity is not None:
        from psp_firmware import INTEGRITY_MODES
        if args.integrity not in INTEGRITY_MODES:
            raise BadInput(f"unknown --integrity {args.integrity!r} "
                           f"(have {', '.join(sorted(INTEGRITY_MODES))})")
    if not args.verbose:   # every detection stops a guest: the PSP's warning is expected here
        import logging
        logging.getLogger("psp").setLevel(logging.ERROR)
    attacks.load_guest_scenarios(args.driver)
    if args.list:
        _list(attacks.SCENARIOS, args.protect, args.json)
        return 0
    names = _select(args.names, args.all)
    from hv.machine.boot import resolve_accel
    accel = resolve_accel(args.accel)
    cfg = attacks.AttackConfig(backend=args.backend, host_mem=args.host_mem,
                               host_mem_path=args.host_mem_file, integrity=args.integrity,
                               psp=getattr(args, "psp", None), protect=args.protect,
                               psp_timeout=getattr(args, "psp_timeout", 5.0), driver=args.driver,
                               accel=accel)
    # bad --host-mem / --host-mem-file / --psp-timeout is the user's input,
    # not an `error` outcome of every scenario: try the configuration once
    cfg.new_vmm().close()
    if args.check_insns is not None:
        cfg.check_every = args.check_insns
        cfg.guest_check_insns = args.check_insns
    if args.check_ms is not None:
        cfg.wall_ms = args.check_ms
    results = attacks.run_scenarios(names, cfg)
    failed = [r for r in results if not r.ok]
    if args.json:
        emit_json({
            "scenarios": [r.to_json() for r in results],
            "summary": attacks.summarize(results),
            "protect": args.protect,
            "design": cfg.design,
            "differs": [r.name for r in failed],
            "integrity": args.integrity or _default_integrity(),
            "backend": args.backend or "default",
            "accel": accel,
        })
    else:
        _table(results, args.verbose)
    return 1 if failed else 0


def _default_integrity():
    from psp_firmware import DEFAULT_INTEGRITY
    return DEFAULT_INTEGRITY


def description(sc):
    """A scenario's description: the first paragraph of its docstring, whole
    (the registry keeps only its first line)."""
    doc = getattr(sc.func, "__doc__", None) or sc.doc or ""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


def _list(scenarios, protect, as_json):
    """hv attack --list: every scenario with its class, expected outcome (for
    --protect) and whole description (--json: as one JSON object)."""
    rows = [{"name": n, "category": s.category, "expected": s.expected_for(protect),
             "driver": s.driver, "description": description(s)} for n, s in scenarios.items()]
    if as_json:
        emit_json({"protect": protect, "scenarios": rows})
        return
    from rich.table import Table
    t = Table(box=None, show_header=True, pad_edge=False)
    t.add_column("scenario", no_wrap=True)
    t.add_column("class", no_wrap=True)
    t.add_column("expect", no_wrap=True)
    t.add_column("description", overflow="fold")      # wraps between words
    for r in rows:
        t.add_row(r["name"], r["category"], r["expected"], r["description"])
    _console().print(t)


def _console():
    """A console as wide as the terminal, and at least 140 columns (a pipe
    or a narrow terminal still gets whole words in every column)."""
    from rich.console import Console
    return Console(width=max(Console().width, 140))


def _status_token(tok):
    """A scenario's status record for the table: 'label:STATUS' -> STATUS,
    'what:N' -> 'N what'."""
    from psp_firmware import Status
    head, _, tail = tok.rpartition(":")
    if tail in Status.__members__:
        return tail
    if head and tail.isdigit():
        return f"{tail} {head}"
    return tok.replace(":", " ")


_STYLE = {"refused": "green", "prevented": "green", "detected": "green", "not_flagged": "green",
          "skipped": "yellow", "undetected": "bold red", "false_positive": "bold red",
          "error": "bold red"}


def _table(results, verbose=0):
    from rich.console import Console
    from rich.table import Table

    from hv.attacks import summarize
    design = results[0].design if results else "digest"
    t = Table(title=f"hv attack --protect {design}", show_lines=bool(verbose))
    t.add_column("scenario", no_wrap=True)
    t.add_column("class", no_wrap=True)
    t.add_column("outcome", no_wrap=True)
    t.add_column("expected", no_wrap=True)
    t.add_column("exposure", justify="right", no_wrap=True)
    t.add_column("caught by", no_wrap=True)
    t.add_column("detail (-v)" if not verbose else "detail", overflow="fold")
    for r in results:
        exp = "-" if r.exposure_insns is None else f"{r.exposure_insns} {r.exposure_unit}"
        if r.exposure_ms is not None:
            exp = f"{r.exposure_ms:g} ms, {r.exposure_exits} exits"
        # red: differs from the expectation; an expected undetected (none) is plain
        style = "bold red" if not r.ok else ("" if r.outcome == "undetected"
                                             else _STYLE.get(r.outcome, ""))
        if verbose or not r.ok or r.outcome not in ("refused", "detected", "not_flagged"):
            detail = r.detail
        elif r.where and "entry_index" in r.where:
            detail = f"entry {r.where['entry_index']} of {r.where['page_hpa']}"
        elif r.where:
            detail = ", ".join(f"{k} {v}" for k, v in r.where.items())
        else:
            detail = ", ".join(_status_token(s) for s in r.statuses[:3]) + (
                f", +{len(r.statuses) - 3} more" if len(r.statuses) > 3 else "")
        t.add_row(r.name, r.category, f"[{style}]{r.outcome}[/]" if style else r.outcome,
                  r.expected + ("" if r.ok else " (differs)"), exp, r.detected_by or "", detail)
    # a pipe or a narrow terminal still gets every column whole
    c = Console(width=max(Console().width, 140))
    c.print(t)
    s = summarize(results)
    c.print(" ".join(f"{k}={v}" for k, v in s.items()))
