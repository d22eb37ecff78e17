"""`hv boot IMAGE`: run a guest image on the emulated vCPU (or on KVM,
--accel kvm) through the PSP-managed NPT.

Without --json the guest's serial output streams to stdout as it is
written, and the report (exit reason, NPFs, launch measurement, ...) goes
to stderr.  With --json one object is printed on stdout.  Exit code: the
guest's own (port 0xF4; 0 for hlt), 1 when the guest failed (triple fault,
access outside its RAM, emulator error) or did not finish within
--max-insns / --max-ms (exit_reason insn_limit / time_limit; 0 instead
with --insn-limit-ok), 2 for
bad input, 3 when the PSP stopped the VM (tamper detected).  The report's
exit_code is always the process's.
"""
import argparse
import os
import sys

from hv.cli.common import (add_accel_option, check_host_mem_file, check_output_path, emit_json,
                           make_vmm, outputs, size_arg)
from hv.errors import BadInput

EXIT_OK, EXIT_GUEST = 0, 1


def _size(text):
    return size_arg(text)


def _mem_size(text):
    """--mem: guest RAM, a multiple of 4 KiB up to 4 GiB."""
    from hv.machine.loader import MAX_RAM
    n = _size(text)
    if n > MAX_RAM:
        raise argparse.ArgumentTypeError(f"guest RAM above the 4 GiB maximum: {text!r}")
    return n


def _pos_int(text):
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def add_parser(sub, common):
    from hv.machine.unicorn_vcpu import available_hooks
    p = sub.add_parser("boot", help="boot a guest image (ELF64 toy or Multiboot) through the PSP-managed NPT")
    p.add_argument("image", help="ELF64 toy guest or Multiboot v1 kernel, or the name of a bundled "
                                 "guest (hello, memtouch, compute, paging, jump_unmapped, "
                                 "triple_fault, mb_hello), built from source on first use")
    p.add_argument("--mem", type=_mem_size, default=256 << 20, metavar="SIZE",
                   help="guest RAM (default 256M)")
    p.add_argument("--vga", action="store_true", help="dump the VGA text screen (0xB8000) at exit")
    p.add_argument("--record", metavar="TRACE.csv",
                   help="write the fault trace (one row per NPF, with rip and instruction bytes)")
    p.add_argument("--max-insns", type=_pos_int, default=None, metavar="N",
                   help="stop after N instructions (exit_reason insn_limit, exit code 1)")
    p.add_argument("--max-ms", type=_pos_int, default=None, metavar="MS",
                   help="stop after MS milliseconds of wall time (exit_reason time_limit, "
                        "exit code 1); on KVM, which counts no instructions, the only budget")
    p.add_argument("--insn-limit-ok", action="store_true",
                   help="a run stopped by --max-insns or --max-ms exits 0 (a guest that runs "
                        "forever by design)")
    p.add_argument("--serial", metavar="FILE", help="also write the serial output to FILE")
    p.add_argument("--check-insns", type=_pos_int, default=None, metavar="N",
                   help="PSP integrity check (CHECK_ALL) every N instructions (emulator only)")
    p.add_argument("--check-ms", type=_pos_int, default=None, metavar="MS",
                   help="PSP integrity check (CHECK_ALL) every MS milliseconds of wall time")
    hooks = available_hooks()
    p.add_argument("--hook", choices=["c", "python"], default=hooks[0],
                   help="vCPU TLB-fill hook (default %s; available: %s)" % (hooks[0], ",".join(hooks)))
    add_accel_option(p)
    common(p)
    p.set_defaults(func=cmd_boot)
    return p


def resolve_image(name):
    """A path as given, or a bundled guest's name -> its built image."""
    if os.path.exists(name) or os.sep in name:
        return name
    try:
        from guests.build import DEFAULT_OUT, GUESTS, BuildError, build_one
    except ImportError:
        return name
    if name not in GUESTS:
        return name
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "hv-guests")
    for out_dir in (DEFAULT_OUT, cache):
        try:
            return str(build_one(name, out_dir))
        except BuildError as e:
            raise BadInput(f"cannot build bundled guest {name!r}: {e}") from None
        except OSError:
            continue     # read-only install: build into the user's cache
    raise BadInput(f"cannot build bundled guest {name!r}: no writable output directory")


def _check_fits(args):
    """--mem against --host-mem, before anything is created (Boot checks it
    again against the Vmm it is given)."""
    from hv.vmm.vmm import DEFAULT_FW_SIZE
    usable = args.host_mem - DEFAULT_FW_SIZE - (1 << 20)
    if args.mem > usable:
        raise BadInput(f"--mem {args.mem >> 20} MiB does not fit in host memory "
                       f"({args.host_mem >> 20} MiB, {max(usable, 0) >> 20} MiB usable); "
                       f"raise --host-mem")


def run_boot(args, serial_sink=None, warn=None):
    """`hv boot` on parsed options, printing nothing -> (exit code, the JSON
    object `--json` prints).  `serial_sink(bytes)`: called as the guest
    writes to COM1 (cmd_boot streams it to stdout).  `warn(line)`: called
    before the guest starts for each request of the image that is not met
    (they are in the JSON's `warnings` too).  Used by cmd_boot and by each
    point of `hv sweep`."""
    from hv.machine.boot import Boot, resolve_accel
    from hv.machine.loader import load_image
    from hv.machine.unicorn_vcpu import available_hooks

    if args.insn_limit_ok and args.max_insns is None and args.max_ms is None:
        raise BadInput("boot: --insn-limit-ok needs --max-insns N or --max-ms MS")
    args.accel = resolve_accel(args.accel)
    if args.accel == "kvm":
        for opt, v in (("--max-insns", args.max_insns), ("--check-insns", args.check_insns)):
            if v is not None:
                raise BadInput(f"boot: {opt} counts guest instructions, which KVM does not "
                               f"(--accel kvm: use {opt.replace('insns', 'ms')})")
    args.image = resolve_image(args.image)
    check_host_mem_file(args)          # again: a bundled guest's name is a path now
    # every argument is checked before any output file or host memory is made
    image = load_image(args.image, args.mem)
    _check_fits(args)
    if args.accel != "kvm" and args.hook not in available_hooks():
        raise BadInput("the C vCPU hook is not built (hv._vcpu_c): use --hook python")
    for path, option in ((args.record, "--record"), (args.serial, "--serial")):
        if path is not None:
            check_output_path(path, option)
    for w in image.warnings:        # optional requests not met (as QEMU warns)
        if warn is not None:
            warn(f"hv: warning: {args.image}: {w}")

    serial_file = None
    if args.serial:
        new = not os.path.lexists(args.serial)
        try:
            serial_file = open(args.serial, "wb")
        except OSError as e:
            raise BadInput(f"cannot write serial output to {args.serial} (--serial): "
                           f"{e.strerror or e}") from None
        if new:
            outputs.created(args.serial)
        outputs.writing(args.serial, "--serial")

    def sink(b):
        if serial_file is not None:
            serial_file.write(b)
        if serial_sink is not None:
            serial_sink(b)

    vmm = make_vmm(args)
    boot = None
    try:
        record_new = args.record is not None and not os.path.lexists(args.record)
        boot = Boot(vmm, args.image, mem=args.mem, hook=args.hook, check_insns=args.check_insns,
                    check_ms=args.check_ms, record=args.record, serial_sink=sink, vga=args.vga,
                    accel=args.accel)
        if args.record is not None:
            if record_new:
                outputs.created(args.record)
            outputs.writing(args.record, "--record")
        res = boot.run(args.max_insns, args.max_ms)
        for path in (args.record, args.serial):
            outputs.done(path)
        if res.exit_reason in ("insn_limit", "time_limit"):
            # cut short is not a clean guest exit, unless the user said so
            res.exit_code = EXIT_OK if args.insn_limit_ok else EXIT_GUEST
        d = res.to_dict()
        if not args.vga:
            d.pop("vga", None)
        if image.warnings:
            d["warnings"] = list(image.warnings)
        return res.exit_code, d
    finally:
        if serial_file is not None:
            serial_file.close()
        if boot is not None:
            boot.close()
        vmm.close()


def cmd_boot(args):
    from hv.machine.boot import BootResult, format_report

    out = sys.stdout

    def stream(b):
        out.write(b.decode("latin-1"))
        if b == b"\n":
            out.flush()

    code, d = run_boot(args, None if args.json else stream,
                       lambda line: print(line, file=sys.stderr))
    if args.json:
        emit_json(d)
    else:
        out.flush()
        if d["serial"] and not d["serial"].endswith("\n"):
            out.write("\n")
            out.flush()
        print(format_report(BootResult(**{k: v for k, v in d.items() if k != "warnings"})),
              file=sys.stderr)
    return code
