"""A sweep SPEC (TOML): its inputs, its axes, and the points they make.

    inputs = ["traces/*.gz", "corpus/*.lackey", "guest:memtouch"]
    [axes]
    integrity = ["full", "merkle"]
    fault-around = [1, 16]

``inputs`` are trace files, image files and globs (relative to the SPEC's
folder; ``**`` reaches into subfolders), or ``guest:NAME`` for a bundled
guest.  A file whose first bytes are an ELF header is booted (``hv boot``),
anything else is replayed (``hv replay``).  ``[axes]`` maps long option
names without their dashes to lists of values; the sweep is the product of
the axes, for each input.

This module knows nothing of the command line's options: which axis an
input's command takes is asked of the ``applies(command, option)`` callable
that :func:`expand` is given (the CLI answers it from its own parser).
"""
import glob
import itertools
import os
import re
from dataclasses import dataclass, field

from ..errors import BadInput

try:                     # Python 3.11+
    import tomllib
except ImportError:      # pragma: no cover - Python < 3.11 (pyproject: tomli there)
    import tomli as tomllib

__all__ = ["Input", "Point", "Spec", "load_spec", "parse_spec", "expand", "option_args",
           "point_key"]

GUEST_PREFIX = "guest:"
ELF_MAGIC = b"\x7fELF"
_OPTION_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*\Z")
_GLOB_CHARS = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Input:
    """One input of a sweep.  ``label``: as the SPEC names it (a path relative
    to the SPEC's folder, or ``guest:NAME``); ``command``: ``replay`` or
    ``boot``; ``path``: the file (absolute), or ``None`` for a bundled guest
    (``guest``: its name), whose image the command line builds."""
    label: str
    command: str
    path: str = None
    guest: str = None


@dataclass(frozen=True)
class Point:
    """One run of a sweep: an input and one value of each axis that its
    command takes (``axes``, in the SPEC's order)."""
    input: Input
    axes: dict = field(hash=False)

    @property
    def key(self):
        return point_key(self.input.label, self.axes)

    @property
    def options(self):
        return option_args(self.axes)


@dataclass
class Spec:
    path: str
    inputs: list
    axes: dict          # option name -> list of values, in the SPEC's order


def _fmt_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def point_key(label, axes):
    """The point's name in results.jsonl (what --resume matches): the input
    and its axis values, e.g. ``traces/a.gz --fault-around=16 --integrity=full``
    (axes sorted by name, so reordering the SPEC's axes keeps the names)."""
    return " ".join([label] + [f"--{k}={_fmt_value(v)}" for k, v in sorted(axes.items())])


def option_args(axes):
    """The command-line options for these axis values: ``--name=value``; a
    boolean is a flag, given for true and left out for false."""
    out = []
    for k, v in axes.items():
        if v is True:
            out.append(f"--{k}")
        elif v is False:
            continue
        else:
            out.append(f"--{k}={_fmt_value(v)}")
    return out


def load_spec(path):
    """Read and check a SPEC file -> :class:`Spec` (BadInput on any problem)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadInput(f"cannot read sweep spec {path}: {e.strerror or e}") from None
    return parse_spec(data, path)


def parse_spec(data, path):
    """Parse SPEC text (bytes or str); ``path`` names it in errors and gives
    the folder its relative inputs are found in."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"{path}: not UTF-8 text (a sweep spec is TOML)") from None
    try:
        doc = tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"inputs", "axes"})
    if unknown:
        raise BadInput(f"{path}: unknown key {unknown[0]!r} (a sweep spec has inputs = [...] "
                       "and an [axes] table)")
    if "inputs" not in doc:
        raise BadInput(f"{path}: no inputs = [...] (trace files, globs, guest:NAME or images)")
    raw_inputs = doc["inputs"]
    if isinstance(raw_inputs, str):
        raw_inputs = [raw_inputs]
    if not isinstance(raw_inputs, list) or not raw_inputs or \
            not all(isinstance(s, str) and s.strip() for s in raw_inputs):
        raise BadInput(f"{path}: inputs must be a non-empty list of strings")
    axes = doc.get("axes", {})
    if not isinstance(axes, dict):
        raise BadInput(f"{path}: axes must be a table ([axes] with name = [values])")
    checked = {}
    for name, values in axes.items():
        if not _OPTION_NAME.match(name):
            raise BadInput(f"{path}: [axes] {name!r}: not an option name (the long option "
                           "without its dashes, e.g. fault-around)")
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise BadInput(f"{path}: [axes] {name}: no values")
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise BadInput(f"{path}: [axes] {name}: {v!r} is not a string, number or boolean")
        shown = [_fmt_value(v) for v in values]
        if len(set(shown)) != len(shown):
            dup = next(s for s in shown if shown.count(s) > 1)
            raise BadInput(f"{path}: [axes] {name}: value {dup} given twice")
        checked[name] = values
    base = os.path.dirname(os.path.abspath(path))
    return Spec(path=str(path), inputs=_resolve_inputs(raw_inputs, base, path), axes=checked)


def _resolve_inputs(patterns, base, spec_path):
    seen, out = set(), []
    for pat in patterns:
        pat = pat.strip()
        if pat.startswith(GUEST_PREFIX):
            name = pat[len(GUEST_PREFIX):].strip()
            if not name:
                raise BadInput(f"{spec_path}: input {pat!r}: no guest name after guest:")
            key = ("guest", name)
            if key not in seen:
                seen.add(key)
                out.append(Input(label=GUEST_PREFIX + name, command="boot", guest=name))
            continue
        full = os.path.join(base, os.path.expanduser(pat))
        if _GLOB_CHARS.search(pat):
            matches = sorted(m for m in glob.glob(full, recursive=True) if os.path.isfile(m))
            if not matches:
                raise BadInput(f"{spec_path}: input {pat!r} matches no file")
        else:
            if not os.path.exists(full):
                raise BadInput(f"{spec_path}: input {pat!r}: no such file")
            if os.path.isdir(full):
                raise BadInput(f"{spec_path}: input {pat!r} is a directory "
                               "(a glob such as dir/* takes its files)")
            matches = [full]
        for m in matches:
            real = os.path.realpath(m)
            if ("file", real) in seen:
                continue
            seen.add(("file", real))
            label = m if os.path.isabs(pat) else os.path.relpath(m, base)
            out.append(Input(label=label, command=_command_for(m, spec_path),
                             path=os.path.abspath(m)))
    return out


def _command_for(path, spec_path):
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise BadInput(f"{spec_path}: cannot read input {path}: {e.strerror or e}") from None
    return "boot" if head == ELF_MAGIC else "replay"


def expand(spec, applies):
    """The sweep's points, input by input, each the product of the axes its
    command takes (``applies(command, option) -> bool``); an axis no input's
    command takes is an error, and one that only some take is left out of
    the others' points (their rows leave it empty)."""
    commands = sorted({i.command for i in spec.inputs})
    for name in spec.axes:
        if not any(applies(c, name) for c in commands):
            raise BadInput(f"{spec.path}: [axes] {name}: not an option of "
                           + " or ".join(f"hv {c}" for c in commands) + " that a sweep can vary")
    points, seen = [], set()
    for inp in spec.inputs:
        names = [n for n in spec.axes if applies(inp.command, n)]
        for combo in itertools.product(*(spec.axes[n] for n in names)):
            p = Point(inp, dict(zip(names, combo)))
            if p.key not in seen:
                seen.add(p.key)
                points.append(p)
    return points
