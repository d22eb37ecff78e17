"""What every subcommand shares: the parser class, option types and the
options common to boot/replay/attack, JSON output, logging, the progress bar,
the VMM built from options, output-path checks, exit codes.

Imported by the subcommand modules of hv/cli only; it imports the VMM lazily."""
import argparse
import json
import logging
import os
import sys

from hv.errors import BadInput

EXIT_OK, EXIT_GUEST, EXIT_INPUT, EXIT_TAMPER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # main() prints "hv: " first: name the subcommand, not "hv" twice
        raise BadInput(message if self.prog == "hv" else f"{self.prog}: {message}")


def size_arg(text):
    """A size option (--host-mem, --mem): a positive multiple of 4 KiB."""
    from hv.vmm.hostmem import PAGE, parse_size
    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n % PAGE:
        raise argparse.ArgumentTypeError(f"size must be a multiple of 4 KiB: {text!r}")
    return n


def bytes_arg(text):
    """A byte count (--max-trace-bytes): positive, with an optional unit (512M, 4G)."""
    from hv.vmm.hostmem import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def timeout_arg(text):
    """--psp-timeout: seconds, > 0 (inf: never declare the PSP dead)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0:       # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0 seconds: {text!r}")
    return v


class _JsonState:
    printed = False      # the command's one JSON object went to stdout already


json_state = _JsonState()


class _Outputs:
    """Files this run writes (main() names those left half-written when it
    is interrupted) and files it created that a refused command removes."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._writing = {}           # path -> option, while being written
        self._created = []           # (path, (st_dev, st_ino)) made by this run

    def writing(self, path, option):
        self._writing[path] = option

    def done(self, path):
        self._writing.pop(path, None)

    def partial(self):
        return [(p, o) for p, o in self._writing.items() if os.path.exists(p)]

    def created(self, path):
        try:
            st = os.stat(path)
        except OSError:
            return
        self._created.append((path, (st.st_dev, st.st_ino)))

    def remove_created(self):
        """Remove the files this run created (still the same file), for a
        command refused after it made them."""
        for path, key in self._created:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == key:
                    os.unlink(path)
            except OSError:
                pass
        self._created = []


outputs = _Outputs()


def emit_json(obj, **kw):
    """Print the command's one JSON object on stdout (and remember that it was)."""
    print(json.dumps(obj, **kw))
    json_state.printed = True


def add_common_options(p, psp=True):
    from nptcore import available_backends
    p.add_argument("--backend", choices=["c", "python"], default=None,
                   help="NPT engine backend (default: c when built; available: %s)"
                   % ",".join(available_backends()))
    p.add_argument("--host-mem", type=size_arg, default=1 << 30, metavar="SIZE",
                   help="host memory size (default 1G; untouched pages cost nothing)")
    p.add_argument("--host-mem-file", default=None, metavar="FILE",
                   help="back host memory with this file instead of anonymous memory "
                        "(a new or empty file; it starts zero-filled and is kept)")
    p.add_argument("--host-mem-file-overwrite", action="store_true",
                   help="let --host-mem-file overwrite an existing non-empty file")
    from psp_firmware import DESIGNS, INTEGRITY_MODES
    p.add_argument("--protect", default="digest", choices=DESIGNS,
                   help="protection design (docs/designs.md): digest (the patent: the PSP "
                        "writes the NPT and keeps its digest; the default), isolated (the NPT "
                        "in PSP memory the VMM cannot write; needs --psp process), rmp (the VMM "
                        "writes the NPT, every translation is checked against the PSP's reverse "
                        "map), none (the VMM writes it, nothing checks)")
    p.add_argument("--integrity", default=None, choices=sorted(INTEGRITY_MODES),
                   help="--protect digest's integrity mode: full (patent-literal: re-hash the "
                        "whole table on every update) or merkle (hash tree; the default)")
    if psp:
        p.add_argument("--psp", choices=["inprocess", "process"], default=None,
                       help="where the PSP firmware runs (default: process for --protect "
                            "isolated, which needs it; else inprocess)")
        p.add_argument("--psp-timeout", type=timeout_arg, default=5.0, metavar="S",
                       help="seconds before a silent PSP process is declared dead")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log every NPF (-v) and PSP command (-vv) to stderr")


def error_outcome(e):
    """What a subcommand's exception means -> (exit code, the JSON object for
    it, the line for stderr): BadInput and MemoryError are exit 2; a dead PSP process and any
    other exception are exit 1 (an internal error names its type).  main()
    prints these; `hv sweep` records them as a point's failed row."""
    msg = " ".join(str(e).splitlines())
    if isinstance(e, BadInput):
        return EXIT_INPUT, {"exit_reason": "bad_input", "exit_code": EXIT_INPUT,
                            "error": msg}, f"hv: {msg}"
    if isinstance(e, MemoryError):      # too big an input or --host-mem for this machine
        msg = "not enough memory for this run (a smaller --host-mem, --mem or input may fit)"
        return EXIT_INPUT, {"exit_reason": "bad_input", "exit_code": EXIT_INPUT,
                            "error": msg}, f"hv: {msg}"
    if getattr(e, "exit_reason", None) == "psp_dead":
        return EXIT_GUEST, {"exit_reason": "psp_dead", "exit_code": EXIT_GUEST,
                            "error": str(e)}, f"hv: PSP dead: {msg}"
    msg = " ".join(f"{e.__class__.__name__}: {e}".splitlines())
    return EXIT_GUEST, {"exit_reason": "error", "exit_code": EXIT_GUEST,
                        "error": f"internal error: {msg}"}, \
        f"hv: internal error: {msg} (run with HV_DEBUG=1 for a traceback)"


def setup_logging(verbose):
    level = logging.WARNING
    if verbose >= 1:
        level = logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level, format="%(name)s: %(message)s")
    # the PSP's own log (tamper reports, -vv: every command) is reported by
    # the commands themselves; show it raw only when asked
    logging.getLogger("psp").setLevel(logging.INFO if verbose >= 2 else logging.ERROR)


def progress_bar(enabled):
    if not enabled or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    prog = Progress(TextColumn("replay"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeRemainingColumn(), transient=True, console=stderr_console())
    task = prog.add_task("replay", total=None)

    def cb(done, total):
        prog.update(task, completed=done, total=total)
    return prog, cb


def stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def add_accel_option(p):
    p.add_argument("--accel", choices=["unicorn", "kvm", "auto"], default="unicorn",
                   help="where guests run: unicorn (the emulator, default), kvm (/dev/kvm: one "
                        "memslot filled page by page from the PSP's table; exit 2 where KVM "
                        "is not available), auto (kvm where it works)")


def check_backend(args):
    """--backend c without the C extension: bad usage, not an internal error."""
    if getattr(args, "backend", None) == "c":
        import nptcore
        if "c" not in nptcore.available_backends():
            raise BadInput(f"the C extension is not built ({nptcore.c_build_error()}): use "
                           f"--backend python, or install a C compiler and the Python headers "
                           f"and reinstall hv")


def make_vmm(args):
    """The Vmm the options ask for.  A --host-mem-file it creates is
    remembered (`outputs`): a command refused later removes it again."""
    from hv.vmm.vmm import Vmm
    check_backend(args)
    path = args.host_mem_file
    existed = path is None or os.path.lexists(path)
    try:
        return Vmm(host_mem=args.host_mem, host_mem_path=path, backend=args.backend,
                   integrity=args.integrity, psp=getattr(args, "psp", None),
                   psp_timeout=getattr(args, "psp_timeout", 5.0),
                   shared_mem=getattr(args, "accel", None) == "kvm",
                   protect=getattr(args, "protect", "digest"))
    finally:
        if not existed:
            outputs.created(path)


def check_output_path(path, option):
    """Refuse an output file that cannot be created, before the work is done."""
    if os.path.isdir(path):
        raise BadInput(f"cannot write {path} ({option}): is a directory")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise BadInput(f"cannot write {path} ({option}): no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                     and not os.access(path, os.W_OK)):
        raise BadInput(f"cannot write {path} ({option}): permission denied")


def check_plot_dir(path, cmd):
    """Refuse an unusable --plot DIR now, not after the whole run (made if missing)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{cmd}: cannot create --plot directory {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"{cmd}: cannot write into --plot directory {path}: permission denied")


def check_host_mem_file(args, files=None):
    """Refuse --host-mem-file naming a non-empty file before any work is done
    (HostMemory refuses it too; with --host-mem-file-overwrite it is allowed
    for every host memory this run sets up), and naming one of the command's
    own input or output files (``files``: ``[(path, what)]``; by default the
    ones every command has), whatever --host-mem-file-overwrite says: host
    memory starts zero-filled, it would destroy that file before it is read."""
    path = getattr(args, "host_mem_file", None)
    overwrite = getattr(args, "host_mem_file_overwrite", False)
    if overwrite and path is None:
        raise BadInput("--host-mem-file-overwrite needs --host-mem-file FILE")
    if path is None:
        return
    if files is None:
        files = [(getattr(args, "trace", None), "the trace to replay"),
                 (getattr(args, "image", None), "the guest image"),
                 (getattr(args, "save", None), "the --save file"),
                 (getattr(args, "record", None), "the --record file"),
                 (getattr(args, "serial", None), "the --serial file")]
    for other, what in files:
        if other is not None and _same_file(path, other):
            raise BadInput(f"--host-mem-file {path} is {what}: host memory would overwrite it "
                           f"(pick another file)")
    from hv.vmm.hostmem import check_file
    check_file(path, overwrite=overwrite)


def _same_file(a, b):
    """Whether paths a and b name one file (existing: same inode; else the
    same resolved path)."""
    a, b = os.fspath(a), os.fspath(b)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
