"""Fault traces: load them into compact columns, and write them.

A trace is a sequence of guest-physical accesses.  ``load_trace(path)``
returns a :class:`Trace` whose columns are arrays:

- ``access`` ``array('B')``: 0 read, 1 write, 2 execute (``ACC_R/W/X``)
- ``gpa``    ``array('Q')``: guest-physical address, always < 2**48
- ``size``   ``array('I')``: bytes accessed, 1..4096 (default 1);
  ``gpa + size <= 2**48``
- ``rip``    ``array('Q')`` or None, ``vcpu`` ``array('H')`` or None,
  ``insn`` list of ``bytes`` (0..15 bytes each) or None.

Formats (``fmt``; ``None`` detects it from the first meaningful lines):

``csv`` (what ``hv boot --record`` writes)
    The first line that is neither blank nor a comment is the header: column
    names separated by commas, in any order, case-insensitive.  ``access`` and
    ``gpa`` are required; ``size``, ``rip``, ``vcpu`` and ``insn`` optional;
    any other name is an error.  Each data line has exactly one field per
    column (no quoting); spaces/tabs around a field are ignored.  ``access``
    is ``r``, ``w`` or ``x`` (either case); numbers are ``0x``-prefixed hex or
    decimal; ``insn`` is the instruction as contiguous hex (``0f01d9``).  An
    empty optional field takes the default (size 1, rip 0, vcpu 0, insn
    ``b""``).

``lackey`` (``valgrind --tool=lackey --trace-mem=yes``)
    ``I  ADDR,SIZE`` instruction fetch (x); `` L ADDR,SIZE`` load (r);
    `` S ADDR,SIZE`` store (w); `` M ADDR,SIZE`` modify, which is a
    read-modify-write of the same bytes and becomes two accesses: a read,
    then a write.  ADDR is hex without ``0x``, SIZE decimal.  Lines starting
    with ``==``, ``--`` or ``**`` (valgrind's own messages, ``==PID== ...``)
    are skipped; any other unrecognised line is an error.  ``rip`` is filled
    with the address of the current instruction (the last ``I`` record).

``ftrace`` (``kvm_page_fault`` events from tracefs/trace-cmd/perf output)
    Every line containing ``kvm_page_fault:`` (at the start of the line or
    after a space, tab or colon) is an event; every other line is skipped.
    The event body is one of the four historical forms::

        address %lx error_code %x
        address %lx error_code %lx
        vcpu %u rip 0x%lx address 0x%lx error_code %x
        vcpu %u rip 0x%lx address 0x%016llx error_code 0x%llx

    (hex fields may carry ``0x`` or not).  The access kind comes from the
    x86 page-fault error code: bit 4 (fetch) -> x, else bit 1 (write) -> w,
    else r.  ``size`` is 1.  ``rip``/``vcpu`` columns exist when some event
    carries them (events without them get 0).

In every format blank lines and lines whose first non-blank character is
``#`` are skipped; lines end at ``\\n`` (a ``\\r`` before it is ignored).
Gzip-compressed files are accepted (also several concatenated members).

Size cap (``max_bytes``, default :data:`MAX_TRACE_BYTES` = 4 GiB; the CLI's
``hv replay --max-trace-bytes SIZE``): a file larger than the cap, or gzip
data that decompresses to more than it (a decompression bomb), is refused
with a :class:`TraceError` naming the limit.  Decompression stops as soon as
the cap is passed (nested gzip too), so the text in memory stays bounded by
it; both parser backends parse only text that passed the cap.  The cap
applies to uncompressed files (and pipes) too: parsing needs memory in
proportion to the text (the columns take up to ~6x a text of short
dense lines; lines that give no access, such as blank lines, take none), so a
plain file above the cap is as much a problem as a bomb.  ``max_bytes=None``:
no cap.

Errors are :class:`hv.errors.TraceError` (``PATH:LINE: what``), raised for the
first bad line; nothing is returned half-parsed.  Refused: missing or
unreadable file, binary data (NUL bytes, invalid UTF-8), unknown format,
empty trace (no accesses), CSV without header / with a missing required,
unknown or duplicate column, wrong number of fields, bad numbers, unknown
access kind, numbers that do not fit 64 bits, addresses >= 2**48 (the 48-bit
guest-physical space) or accesses running past it, size 0 or > 4096, vcpu
> 65535, malformed or > 15-byte instructions, malformed lackey records or
kvm_page_fault events.

Two parser backends give identical results: ``"c"`` (``hv._trace_c``, built
with cffi from ``csrc/trace.c``) and ``"python"``.  ``backend=None`` picks C
when it is built.
"""

import array
import gzip
import io
import os
import re
import stat
import zlib
from typing import NamedTuple, Optional

from hv.errors import TraceError

try:  # the C fast path, built with cffi from csrc/trace.c
    from hv import _trace_c
except ImportError:  # pragma: no cover - depends on the build
    _trace_c = None

__all__ = [
    "ACC_R", "ACC_W", "ACC_X", "GPA_LIMIT", "MAX_ACCESS_SIZE", "MAX_INSN_LEN",
    "PAGE_SHIFT", "FORMATS", "CSV_COLUMNS", "MAX_TRACE_BYTES", "Access", "Trace", "TraceError",
    "load_trace", "parse_trace", "detect_format", "available_backends",
    "write_csv", "CsvTraceWriter",
]

ACC_R, ACC_W, ACC_X = 0, 1, 2
ACCESS_CHARS = "rwx"
GPA_LIMIT = 1 << 48
MAX_ACCESS_SIZE = 4096
MAX_INSN_LEN = 15
PAGE_SHIFT = 12
FORMATS = ("csv", "lackey", "ftrace")
CSV_COLUMNS = ("access", "gpa", "size", "rip", "vcpu", "insn")
_REQUIRED = ("access", "gpa")
_U64 = 1 << 64
MAX_TRACE_BYTES = 4 << 30   # default cap on a trace file and on its decompressed text
_GZ_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1 << 20       # reading a pipe
_GZ_CHUNK = 64 << 20        # output per decompression step
_SPLIT_BLOCK = 1 << 20      # the pure-Python parsers split lines a block at a time

# reason codes shared with csrc/trace.c
(E_OK, E_SYNTAX, E_NFIELDS, E_ACCESS, E_NUMBER, E_RANGE, E_EMPTY, E_ADDR,
 E_ADDR_END, E_SIZE0, E_SIZEBIG, E_VCPU, E_INSN, E_INSN_LONG,
 E_INTERNAL) = range(15)

_LACKEY_FIELDS = ("address", "size")
_FTRACE_FIELDS = ("vcpu", "rip", "address", "error_code")


class Access(NamedTuple):
    access: int
    gpa: int
    size: int = 1
    rip: Optional[int] = None
    vcpu: Optional[int] = None
    insn: Optional[bytes] = None


class Trace:
    """Columns of a fault trace (see the module docstring)."""

    __slots__ = ("access", "gpa", "size", "rip", "vcpu", "insn", "format", "path")

    def __init__(self, access, gpa, size=None, rip=None, vcpu=None, insn=None,
                 format=None, path=None):
        self.access = access if isinstance(access, array.array) else array.array("B", access)
        self.gpa = gpa if isinstance(gpa, array.array) else array.array("Q", gpa)
        n = len(self.gpa)
        if size is None:
            size = array.array("I", [1]) * n
        self.size = size if isinstance(size, array.array) else array.array("I", size)
        if rip is not None and not isinstance(rip, array.array):
            rip = array.array("Q", rip)
        if vcpu is not None and not isinstance(vcpu, array.array):
            vcpu = array.array("H", vcpu)
        if insn is not None:
            insn = [bytes(b) for b in insn]
        self.rip, self.vcpu, self.insn = rip, vcpu, insn
        self.format = format
        self.path = path
        for name in ("access", "size", "rip", "vcpu", "insn"):
            col = getattr(self, name)
            if col is not None and len(col) != n:
                raise ValueError(f"trace column {name!r} has {len(col)} entries, gpa has {n}")

    def __len__(self):
        return len(self.gpa)

    def columns(self):
        """Names of the columns present, in CSV order."""
        return tuple(c for c in CSV_COLUMNS if getattr(self, c) is not None)

    def __getitem__(self, i):
        if isinstance(i, slice):
            def cut(col):
                return None if col is None else col[i]
            return Trace(self.access[i], self.gpa[i], self.size[i], cut(self.rip),
                         cut(self.vcpu), cut(self.insn), self.format, self.path)
        return Access(self.access[i], self.gpa[i], self.size[i],
                      None if self.rip is None else self.rip[i],
                      None if self.vcpu is None else self.vcpu[i],
                      None if self.insn is None else self.insn[i])

    def __iter__(self):
        n = len(self)
        none = [None] * n
        return map(Access, self.access, self.gpa, self.size,
                   none if self.rip is None else self.rip,
                   none if self.vcpu is None else self.vcpu,
                   none if self.insn is None else self.insn)

    def __eq__(self, other):
        if not isinstance(other, Trace):
            return NotImplemented
        return all(getattr(self, c) == getattr(other, c) for c in CSV_COLUMNS)

    __hash__ = None

    def __repr__(self):
        return (f"<Trace {self.format or '?'} {len(self)} accesses"
                f" columns={','.join(self.columns())} path={self.path!r}>")

    def pages(self):
        """Sorted ``array('Q')`` of the distinct 4 KiB page numbers touched.

        An access covers ``gpa .. gpa+size-1``, so one straddling a page
        boundary touches both pages.
        """
        n = len(self)
        if (_trace_c is not None and n and self.gpa.typecode == "Q"
                and self.size.typecode == "I"):
            ffi, lib = _trace_c.ffi, _trace_c.lib
            cap = 2 * n
            out = array.array("Q", [0]) * cap
            k = lib.trace_pages(ffi.from_buffer("uint64_t[]", self.gpa),
                                ffi.from_buffer("uint32_t[]", self.size), n,
                                ffi.from_buffer("uint64_t[]", out), cap)
            if k >= 0:
                del out[k:]
                return out
        return _pages_py(self.gpa, self.size)


def _pages_py(gpa, size):
    pages = set()
    add = pages.add
    for g, s in zip(gpa, size):
        first = g >> PAGE_SHIFT
        last = (g + max(s, 1) - 1) >> PAGE_SHIFT
        add(first)
        while first < last:
            first += 1
            add(first)
    return array.array("Q", sorted(pages))


def available_backends():
    """Parser backends usable here, fastest first."""
    return ("c", "python") if _trace_c is not None else ("python",)


# ---------------------------------------------------------------------------
# reading


class _Fail(Exception):
    """Internal: first bad line, as the C parsers report it."""

    def __init__(self, line, code, col=-1, val=0, val2=0):
        super().__init__(line, code, col, val, val2)
        self.line, self.code, self.col, self.val, self.val2 = line, code, col, val, val2


def _fmt_bytes(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and not n % (1 << shift):
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _check_max_bytes(max_bytes):
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int or None, not {max_bytes!r}")


def _too_big(path, what, max_bytes):
    return TraceError(path, None, f"{what} the {_fmt_bytes(max_bytes)} trace size limit "
                                  f"(--max-trace-bytes SIZE raises it)")


def _gunzip(data, path, max_bytes):
    """Decompress gzip ``data`` (one or more members, NUL padding between them
    allowed, as ``gzip.decompress``), stopping with a TraceError as soon as
    the output passes ``max_bytes`` (None: no cap)."""
    out = []
    total = 0
    buf = data
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)     # gzip header and trailer (CRC, length)
    try:
        while True:
            want = _GZ_CHUNK if max_bytes is None else min(_GZ_CHUNK, max_bytes + 1 - total)
            chunk = d.decompress(buf, want)
            if chunk:
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise _too_big(path, "gzip data decompresses to more than", max_bytes)
                out.append(chunk)
            if d.eof:
                rest = d.unused_data.lstrip(b"\0")
                if not rest:
                    break
                if rest[:2] != _GZ_MAGIC:
                    raise TraceError(path, None, "corrupt gzip data: trailing bytes after "
                                                 "the compressed stream")
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                buf = rest
                continue
            buf = d.unconsumed_tail
            if not buf and len(chunk) < want:
                raise TraceError(path, None, "corrupt gzip data: compressed file ended before "
                                             "the end-of-stream marker was reached")
    except zlib.error as e:
        raise TraceError(path, None, f"corrupt gzip data: {e}") from None
    return out[0] if len(out) == 1 else b"".join(out)


def _read_capped(f, path, max_bytes):
    """Read a pipe to its end, refusing more than ``max_bytes``."""
    chunks = []
    total = 0
    while True:
        b = f.read(_READ_CHUNK)
        if not b:
            return b"".join(chunks)
        total += len(b)
        if max_bytes is not None and total > max_bytes:
            raise _too_big(path, "input is larger than", max_bytes)
        chunks.append(b)


def _read_file(path, max_bytes=MAX_TRACE_BYTES):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None             # open() below says what is wrong
    # a device (/dev/zero, a tty) or socket never ends or is not a file;
    # pipes and FIFOs are read (hv replay <(zcat t.csv.gz))
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)):
        raise TraceError(path, None, "is a device or socket, not a trace file")
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode):
                if max_bytes is not None and st.st_size > max_bytes:
                    raise _too_big(path, f"file ({st.st_size} bytes) is larger than", max_bytes)
                data = f.read()
                if max_bytes is not None and len(data) > max_bytes:    # it grew meanwhile
                    raise _too_big(path, "file is larger than", max_bytes)
            else:
                data = _read_capped(f, path, max_bytes)
    except FileNotFoundError:
        raise TraceError(path, None, "no such file") from None
    except IsADirectoryError:
        raise TraceError(path, None, "is a directory, not a trace file") from None
    except PermissionError:
        raise TraceError(path, None, "permission denied") from None
    except OSError as e:
        raise TraceError(path, None, f"cannot read: {e.strerror or e}") from None
    if data[:2] == _GZ_MAGIC:
        data = _gunzip(data, path, max_bytes)
    return data


def _check_text(data, path):
    """Refuse binary data: NUL bytes or invalid UTF-8 (first one wins)."""
    bad = data.find(b"\0")
    what = "NUL byte"
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            if bad < 0 or e.start < bad:
                bad, what = e.start, "invalid UTF-8"
    if bad >= 0:
        line = data.count(b"\n", 0, bad) + 1
        raise TraceError(path, line, f"binary data ({what}): not a text trace file")


_CHATTER = re.compile(rb"(==|--|\*\*)[0-9]+(==|--|\*\*)")
_LACKEY_RE = re.compile(rb"[ \t\r]*([ILSM])[ \t]+([0-9a-fA-F]+),([0-9]+)[ \t\r]*")
_FTRACE_PREFIX = re.compile(
    rb"[ \t]*\S.*-[0-9]+[ \t]+(?:\([ \t]*\S+\)[ \t]+)?\[[0-9]+\][ \t]+(?:\S+[ \t]+)?[0-9]+\.[0-9]+:[ \t]")
_FTRACE_TRACER = re.compile(rb"#[ \t]*tracer:")
_FT_TOKEN = b"kvm_page_fault:"
_WS = b" \t\r"
_DETECT_LINES = 1000
_DETECT_BYTES = 1 << 20


def _meaningful(line):
    s = line.lstrip(_WS)
    return bool(s) and s[:1] != b"#"


def detect_format(data):
    """Guess the format of trace text (bytes).

    The first line that is neither blank nor a comment decides: a CSV header
    naming ``access`` or ``gpa``, a lackey record or valgrind message, or an
    ftrace line.  ftrace output may start with other lines (``cpus=2`` ...),
    so an ftrace event or ``# tracer:`` header within the first 1000 lines
    also counts.  Returns ``(fmt, None)`` or ``(None, line_no)`` with the
    first line that fits no format (``(None, None)``: nothing but blanks and
    comments).
    """
    first_unknown = None
    for no, line in enumerate(data[:_DETECT_BYTES].split(b"\n")[:_DETECT_LINES], 1):
        stripped = line.strip(_WS)
        if not stripped:
            continue
        if _CHATTER.match(line):
            return "lackey", None
        if stripped[:1] == b"#":
            if _FTRACE_TRACER.match(stripped):
                return "ftrace", None
            continue
        if _ft_token_at(line) >= 0 or _FTRACE_PREFIX.match(line[:512]):
            return "ftrace", None
        if first_unknown is not None:
            continue  # only ftrace output may hold other lines before its events
        if _LACKEY_RE.fullmatch(line):
            return "lackey", None
        names = [f.strip(_WS).lower() for f in line.split(b",")]
        if b"access" in names or b"gpa" in names:
            return "csv", None
        first_unknown = no
    return None, first_unknown


def _ft_token_at(line):
    i = line.find(_FT_TOKEN)
    if i > 0 and line[i - 1] not in b" \t:":
        return -1
    return i


def _snippet(line, limit=60):
    s = line.decode("utf-8", "replace").strip(" \t\r")
    return repr(s if len(s) <= limit else s[:limit] + "...")


def _csv_field(line, col):
    fields = line.split(b",")
    f = fields[col] if 0 <= col < len(fields) else b""
    return _snippet(f)


def _message(fmt, fail, line, colnames):
    code, col, val, val2 = fail.code, fail.col, fail.val, fail.val2
    name = colnames[col] if colnames and 0 <= col < len(colnames) else "?"
    if code == E_SYNTAX:
        if fmt == "lackey":
            return ("not a valgrind lackey record (expected 'I  ADDR,SIZE' or"
                    f" ' L|S|M ADDR,SIZE' with hex ADDR): {_snippet(line)}")
        return ("malformed kvm_page_fault event (expected 'address A error_code E' or"
                f" 'vcpu N rip 0xR address 0xA error_code 0xE'): {_snippet(line)}")
    if code == E_NFIELDS:
        return (f"expected {val2} comma-separated fields ({','.join(colnames)}),"
                f" found {val}")
    if code == E_ACCESS:
        return (f"unknown access kind {_csv_field(line, col)} in column 'access'"
                " (expected r, w or x)")
    if code == E_NUMBER:
        return (f"bad number {_csv_field(line, col)} in column '{name}'"
                " (expected 0x-prefixed hex or decimal)")
    if code == E_RANGE:
        what = f"column '{name}'" if fmt == "csv" else f"field '{name}'"
        return f"number too large in {what} (must fit in 64 bits)"
    if code == E_EMPTY:
        return f"empty value in required column '{name}'"
    if code == E_ADDR:
        return (f"address {val:#x} is outside the 48-bit guest-physical address"
                f" space (must be below {GPA_LIMIT:#x})")
    if code == E_ADDR_END:
        return (f"access of {val2} bytes at {val:#x} runs past the end of the"
                f" 48-bit guest-physical address space ({GPA_LIMIT:#x})")
    if code == E_SIZE0:
        return f"access size 0 (must be 1..{MAX_ACCESS_SIZE})"
    if code == E_SIZEBIG:
        return f"access size {val} too large (must be 1..{MAX_ACCESS_SIZE})"
    if code == E_VCPU:
        return f"vcpu {val} out of range (must be 0..65535)"
    if code == E_INSN:
        return (f"bad instruction bytes {_csv_field(line, col)} in column 'insn'"
                " (expected an even number of hex digits)")
    if code == E_INSN_LONG:
        return (f"instruction of {val} bytes is too long"
                f" (x86 instructions are at most {MAX_INSN_LEN} bytes)")
    return f"internal parser error (code {code})"


def _split_lines(data, block=_SPLIT_BLOCK):
    """The items of ``data.split(b"\\n")``, a block of about ``block`` bytes
    at a time: a trace of millions of blank lines does not become one list
    of millions of lines."""
    n = len(data)
    start = 0
    while n - start > block:
        cut = data.rfind(b"\n", start, start + block)
        if cut < 0:                         # a line longer than a block
            cut = data.find(b"\n", start + block)
            if cut < 0:
                break
        yield from data[start:cut].split(b"\n")
        start = cut + 1
    yield from data[start:].split(b"\n")


def _line_of(data, lineno, block=1 << 20):
    """Line `lineno` (1-based) of data, without its newline. Whole blocks of
    lines are skipped by bytes.count (a malformed line near the end of a
    multi-GB trace is named in well under a second), the last by index."""
    start, left = 0, lineno - 1
    n = len(data)
    while left and start < n:
        k = data.count(b"\n", start, start + block)
        if k >= left:
            break
        left -= k
        start += block
    for _ in range(left):
        start = data.index(b"\n", start) + 1
    end = data.find(b"\n", start)
    return data[start:] if end < 0 else data[start:end]


def _csv_header(data, path):
    """Find and check the header.  Returns (column names, offset, next line no)."""
    pos, no = 0, 0
    n = len(data)
    while pos <= n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl
        line = data[pos:end]
        no += 1
        nxt = end + 1
        if _meaningful(line):
            names = [f.strip(_WS).decode("utf-8").lower() for f in line.split(b",")]
            if not any(nm in CSV_COLUMNS for nm in names):
                raise TraceError(path, no, "no CSV header: the first line must name the"
                                 " columns, e.g. 'access,gpa,size'"
                                 f" (found {_snippet(line)})")
            seen = set()
            for nm in names:
                if not nm:
                    raise TraceError(path, no, "empty column name in CSV header")
                if nm not in CSV_COLUMNS:
                    raise TraceError(path, no, f"unknown column {nm!r} in CSV header"
                                     f" (known: {', '.join(CSV_COLUMNS)})")
                if nm in seen:
                    raise TraceError(path, no, f"duplicate column {nm!r} in CSV header")
                seen.add(nm)
            for req in _REQUIRED:
                if req not in seen:
                    raise TraceError(path, no, f"missing required column {req!r} in CSV"
                                     f" header (required: {', '.join(_REQUIRED)})")
            return names, min(nxt, n), no + 1
        if nl < 0:
            break
        pos = nxt
    raise TraceError(path, None, "empty trace: no CSV header and no accesses")


# --- pure-Python parsers (the reference; csrc/trace.c must agree) ----------

_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
_NUM_RE = re.compile(rb"0[xX]([0-9a-fA-F]+)|([0-9]+)")
_INSN_RE = re.compile(rb"(?:[0-9a-fA-F]{2})*")
_FTRACE_BODY = re.compile(
    rb"[ \t\r]*(?:vcpu[ \t\r]+([0-9]+)[ \t\r]+rip[ \t\r]+(?:0[xX])?([0-9a-fA-F]+)[ \t\r]+)?"
    rb"address[ \t\r]+(?:0[xX])?([0-9a-fA-F]+)[ \t\r]+"
    rb"error_code[ \t\r]+(?:0[xX])?([0-9a-fA-F]+)[ \t\r]*")


def _dec(b):
    """Decimal digits -> int, or None if it does not fit 64 bits."""
    if len(b) > 20:
        b = b.lstrip(b"0")
        if len(b) > 20:
            return None
    v = int(b)
    return v if v < _U64 else None


def _hex(b):
    v = int(b, 16)
    return v if v < _U64 else None


def _num(b):
    m = _NUM_RE.fullmatch(b)
    if m is None:
        return E_NUMBER, 0
    v = _hex(m.group(1)) if m.group(1) is not None else _dec(m.group(2))
    return (E_RANGE, 0) if v is None else (E_OK, v)


def _check_addr(lineno, g, s, col=-1):
    if g >= GPA_LIMIT:
        raise _Fail(lineno, E_ADDR, col, g)
    if s == 0:
        raise _Fail(lineno, E_SIZE0, col)
    if s > MAX_ACCESS_SIZE:
        raise _Fail(lineno, E_SIZEBIG, col, s)
    if g + s > GPA_LIMIT:
        raise _Fail(lineno, E_ADDR_END, -1, g, s)


def _py_lackey(data, first_line):
    acc = array.array("B")
    gpa = array.array("Q")
    size = array.array("I")
    rip = array.array("Q")
    a_app, g_app, s_app, r_app = acc.append, gpa.append, size.append, rip.append
    match = _LACKEY_RE.fullmatch
    cur = 0
    for no, line in enumerate(_split_lines(data), first_line):
        m = match(line)
        if m is None:
            if line[:2] in (b"==", b"--", b"**") or not _meaningful(line):
                continue
            raise _Fail(no, E_SYNTAX)
        kind, a, s = m.groups()
        g = _hex(a)
        if g is None:
            raise _Fail(no, E_RANGE, 0)
        sz = _dec(s)
        if sz is None:
            raise _Fail(no, E_RANGE, 1)
        _check_addr(no, g, sz)
        if kind == b"I":
            cur = g
            a_app(ACC_X)
        elif kind == b"L":
            a_app(ACC_R)
        elif kind == b"S":
            a_app(ACC_W)
        else:  # M: read, then write
            a_app(ACC_R)
            g_app(g)
            s_app(sz)
            r_app(cur)
            a_app(ACC_W)
        g_app(g)
        s_app(sz)
        r_app(cur)
    return Trace(acc, gpa, size, rip, format="lackey")


def _py_ftrace(data, first_line):
    acc = array.array("B")
    gpa = array.array("Q")
    size = array.array("I")
    rip = array.array("Q")
    vcpu = array.array("H")
    has_v = False
    body = _FTRACE_BODY.fullmatch
    for no, line in enumerate(_split_lines(data), first_line):
        if not _meaningful(line):
            continue
        i = _ft_token_at(line)
        if i < 0:
            continue
        m = body(line, i + len(_FT_TOKEN))
        if m is None:
            raise _Fail(no, E_SYNTAX)
        sv, sr, sa, se = m.groups()
        v = r = 0
        if sv is not None:
            v = _dec(sv)
            if v is None:
                raise _Fail(no, E_RANGE, 0)
            r = _hex(sr)
            if r is None:
                raise _Fail(no, E_RANGE, 1)
            has_v = True
        g = _hex(sa)
        if g is None:
            raise _Fail(no, E_RANGE, 2)
        ec = _hex(se)
        if ec is None:
            raise _Fail(no, E_RANGE, 3)
        if v > 0xFFFF:
            raise _Fail(no, E_VCPU, -1, v)
        if g >= GPA_LIMIT:
            raise _Fail(no, E_ADDR, -1, g)
        acc.append(ACC_X if ec & 16 else ACC_W if ec & 2 else ACC_R)
        gpa.append(g)
        size.append(1)
        rip.append(r)
        vcpu.append(v)
    if not has_v:
        rip = vcpu = None
    return Trace(acc, gpa, size, rip, vcpu, format="ftrace")


_ACC_CODES = {b"r": 0, b"R": 0, b"w": 1, b"W": 1, b"x": 2, b"X": 2}


def _py_csv(data, first_line, names):
    ncols = len(names)
    idx = {nm: i for i, nm in enumerate(names)}
    acc = array.array("B")
    gpa = array.array("Q")
    size = array.array("I")
    rip = array.array("Q") if "rip" in idx else None
    vcpu = array.array("H") if "vcpu" in idx else None
    insn = [] if "insn" in idx else None
    for no, line in enumerate(_split_lines(data), first_line):
        if not _meaningful(line):
            continue
        fields = line.split(b",")
        if len(fields) != ncols:
            raise _Fail(no, E_NFIELDS, -1, len(fields), ncols)
        a = 0
        g = 0
        sz = 1
        r = v = 0
        ins = b""
        for c, (nm, f) in enumerate(zip(names, fields)):
            f = f.strip(_WS)
            if nm == "access":
                if not f:
                    raise _Fail(no, E_EMPTY, c)
                a = _ACC_CODES.get(f)
                if a is None:
                    raise _Fail(no, E_ACCESS, c)
            elif nm == "insn":
                if not _INSN_RE.fullmatch(f):
                    raise _Fail(no, E_INSN, c)
                if len(f) // 2 > MAX_INSN_LEN:
                    raise _Fail(no, E_INSN_LONG, c, len(f) // 2)
                ins = bytes.fromhex(f.decode("ascii"))
            else:
                if not f:
                    if nm == "gpa":
                        raise _Fail(no, E_EMPTY, c)
                    continue  # defaults
                rc, val = _num(f)
                if rc:
                    raise _Fail(no, rc, c)
                if nm == "gpa":
                    if val >= GPA_LIMIT:
                        raise _Fail(no, E_ADDR, c, val)
                    g = val
                elif nm == "size":
                    if val == 0:
                        raise _Fail(no, E_SIZE0, c)
                    if val > MAX_ACCESS_SIZE:
                        raise _Fail(no, E_SIZEBIG, c, val)
                    sz = val
                elif nm == "rip":
                    r = val
                else:  # vcpu
                    if val > 0xFFFF:
                        raise _Fail(no, E_VCPU, c, val)
                    v = val
        if g + sz > GPA_LIMIT:
            raise _Fail(no, E_ADDR_END, -1, g, sz)
        acc.append(a)
        gpa.append(g)
        size.append(sz)
        if rip is not None:
            rip.append(r)
        if vcpu is not None:
            vcpu.append(v)
        if insn is not None:
            insn.append(ins)
    return Trace(acc, gpa, size, rip, vcpu, insn, format="csv")


# --- C backend -------------------------------------------------------------


def _zeros(typecode, n):
    return array.array(typecode, bytearray(n * array.array(typecode).itemsize))


def _c_parse(fmt, data, first_line, names):
    ffi, lib = _trace_c.ffi, _trace_c.lib
    # output capacity: an upper bound on the accesses, from what every
    # accepted line must contain, so that blank lines, comments or other
    # lines that give no access (a cheap way to blow up a small gzip file)
    # cost no column memory
    nlines = data.count(b"\n") + 1
    if fmt == "lackey":
        # one comma per record; an M record gives two accesses and has an 'M'
        rec = min(nlines, data.count(b","))
        cap = rec + min(rec, data.count(b"M"))
    elif fmt == "ftrace":
        cap = min(nlines, data.count(_FT_TOKEN))
    else:
        # every data line has exactly len(names) - 1 commas (>= 1: access, gpa)
        cap = min(nlines, data.count(b",") // max(len(names) - 1, 1))
    res = ffi.new("trace_result *")
    buf = ffi.from_buffer("char[]", data)
    acc, gpa, size = _zeros("B", cap), _zeros("Q", cap), _zeros("I", cap)

    def p(arr, ctype):
        return ffi.from_buffer(ctype + "[]", arr) if arr is not None else ffi.NULL

    rip = vcpu = insn = insn_len = None
    if fmt == "lackey":
        rip = _zeros("Q", cap)
        rc = lib.trace_parse_lackey(buf, len(data), first_line, p(acc, "uint8_t"),
                                    p(gpa, "uint64_t"), p(size, "uint32_t"),
                                    p(rip, "uint64_t"), cap, res)
    elif fmt == "ftrace":
        rip, vcpu = _zeros("Q", cap), _zeros("H", cap)
        rc = lib.trace_parse_ftrace(buf, len(data), first_line, p(acc, "uint8_t"),
                                    p(gpa, "uint64_t"), p(size, "uint32_t"),
                                    p(rip, "uint64_t"), p(vcpu, "uint16_t"), cap, res)
    else:
        types = bytes(CSV_COLUMNS.index(nm) for nm in names)
        if "rip" in names:
            rip = _zeros("Q", cap)
        if "vcpu" in names:
            vcpu = _zeros("H", cap)
        if "insn" in names:
            insn = bytearray(cap * MAX_INSN_LEN)
            insn_len = bytearray(cap)
        rc = lib.trace_parse_csv(buf, len(data), first_line,
                                 ffi.from_buffer("uint8_t[]", types), len(names),
                                 p(acc, "uint8_t"), p(gpa, "uint64_t"),
                                 p(size, "uint32_t"), p(rip, "uint64_t"),
                                 p(vcpu, "uint16_t"), p(insn, "uint8_t"),
                                 p(insn_len, "uint8_t"), cap, res)
    if rc != E_OK:
        raise _Fail(res.line, res.code, res.col, res.val, res.val2)
    n = res.n
    for arr in (acc, gpa, size, rip, vcpu):
        if arr is not None:
            del arr[n:]
    if fmt == "ftrace" and not res.has_rip:
        rip = vcpu = None
    ins_list = None
    if insn is not None and insn_len.count(0, 0, n) == n:
        ins_list = [b""] * n
    elif insn is not None:
        mv = memoryview(insn)
        ins_list = [bytes(mv[i * MAX_INSN_LEN:i * MAX_INSN_LEN + insn_len[i]]) for i in range(n)]
    return Trace(acc, gpa, size, rip, vcpu, ins_list, format=fmt)


# --- entry points ------------------------------------------------------------


def parse_trace(data, fmt=None, path="<trace>", backend=None, max_bytes=MAX_TRACE_BYTES):
    """Parse trace text (bytes) -> :class:`Trace`.  See :func:`load_trace`."""
    _check_max_bytes(max_bytes)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if backend is None:
        backend = "c" if _trace_c is not None else "python"
    elif backend not in ("c", "python"):
        raise ValueError(f"unknown trace parser backend {backend!r}")
    elif backend == "c" and _trace_c is None:
        raise RuntimeError("the C trace parser (hv._trace_c) is not built")
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(path, None, f"unknown trace format {fmt!r}"
                         f" (expected one of: {', '.join(FORMATS)})")
    if data[:2] == _GZ_MAGIC:
        data = _gunzip(data, path, max_bytes)   # capped: a gzip bomb stops here
    elif max_bytes is not None and len(data) > max_bytes:
        raise _too_big(path, f"trace text ({len(data)} bytes) is larger than", max_bytes)
    _check_text(data, path)
    if data[:3] == b"\xef\xbb\xbf":  # UTF-8 byte order mark
        data = b"   " + data[3:]
    if fmt is None:
        fmt, unknown = detect_format(data)
        if fmt is None:
            if unknown is None:
                raise TraceError(path, None, "empty trace: no accesses")
            raise TraceError(path, unknown, "unknown trace format: "
                             f"{_snippet(_line_of(data, unknown))} is not a CSV header"
                             " naming access,gpa columns, a valgrind lackey record or a"
                             " kvm_page_fault ftrace line")
    names = None
    body, first_line = data, 1
    if fmt == "csv":
        names, off, first_line = _csv_header(data, path)
        body = data[off:]
    try:
        if backend == "c":
            tr = _c_parse(fmt, body, first_line, names)
        elif fmt == "lackey":
            tr = _py_lackey(body, first_line)
        elif fmt == "ftrace":
            tr = _py_ftrace(body, first_line)
        else:
            tr = _py_csv(body, first_line, names)
    except _Fail as f:
        line = _line_of(data, f.line)
        colnames = (names if fmt == "csv" else
                    _LACKEY_FIELDS if fmt == "lackey" else _FTRACE_FIELDS)
        raise TraceError(path, f.line, _message(fmt, f, line, colnames)) from None
    if not len(tr):
        raise TraceError(path, None, f"empty trace: no accesses ({fmt} format)")
    tr.path = path
    return tr


def load_trace(path, fmt=None, backend=None, max_bytes=MAX_TRACE_BYTES):
    """Load a fault trace file (optionally gzip-compressed) -> :class:`Trace`.

    ``fmt``: ``"csv"``, ``"lackey"``, ``"ftrace"`` or ``None`` (detect from
    the content).  ``backend``: ``"c"``, ``"python"`` or ``None`` (C if
    built).  ``max_bytes``: the size cap on the file and on its decompressed
    text (default 4 GiB; ``None``: none).  Raises :class:`TraceError` on any
    problem with the file.
    """
    _check_max_bytes(max_bytes)
    path = os.fspath(path)
    return parse_trace(_read_file(path, max_bytes), fmt, path, backend, max_bytes)


# ---------------------------------------------------------------------------
# writing


def _access_code(a):
    if isinstance(a, str):
        k = ACCESS_CHARS.find(a.lower()) if len(a) == 1 else -1
        if k < 0:
            raise ValueError(f"bad access kind {a!r} (expected r, w or x)")
        return k
    if a not in (0, 1, 2):
        raise ValueError(f"bad access kind {a!r} (expected 0, 1 or 2)")
    return int(a)


class CsvTraceWriter:
    """Write a CSV fault trace, one access at a time (``hv boot --record``).

    ``columns`` is a subset of ``CSV_COLUMNS`` including access and gpa (all
    six by default).  ``gpa`` and ``rip`` are written as 0x hex, ``insn`` as
    hex bytes; a ``None`` optional value is written as an empty field (which
    reads back as the default).  A path ending in ``.gz`` is gzip-compressed.
    Values the reader would refuse raise ``ValueError``.  Use as a context
    manager, or call ``close()``.
    """

    def __init__(self, path, columns=CSV_COLUMNS, comment=None):
        cols = tuple(columns)
        unknown = [c for c in cols if c not in CSV_COLUMNS]
        if unknown or len(set(cols)) != len(cols) or not all(r in cols for r in _REQUIRED):
            raise ValueError(f"bad CSV trace columns {cols!r}")
        self.columns = tuple(c for c in CSV_COLUMNS if c in cols)
        self.path = os.fspath(path) if not hasattr(path, "write") else None
        self.count = 0
        if self.path is None:
            self._f, self._own = path, False
        elif self.path.endswith(".gz"):
            self._f = io.TextIOWrapper(gzip.open(self.path, "wb"), encoding="ascii", newline="\n")
            self._own = True
        else:
            self._f = open(self.path, "w", encoding="ascii", newline="\n")
            self._own = True
        if comment:
            for ln in str(comment).splitlines():
                self._f.write(f"# {ln}\n")
        self._f.write(",".join(self.columns) + "\n")

    def write(self, access, gpa, size=1, rip=None, vcpu=None, insn=None):
        a = _access_code(access)
        gpa = int(gpa)
        size = 1 if size is None else int(size)
        if not 0 <= gpa < GPA_LIMIT:
            raise ValueError(f"gpa {gpa:#x} outside the 48-bit guest-physical space")
        if not 1 <= size <= MAX_ACCESS_SIZE or gpa + size > GPA_LIMIT:
            raise ValueError(f"bad access size {size} at {gpa:#x}")
        out = []
        for c in self.columns:
            if c == "access":
                out.append(ACCESS_CHARS[a])
            elif c == "gpa":
                out.append(f"{gpa:#x}")
            elif c == "size":
                out.append(str(size))
            elif c == "rip":
                if rip is None:
                    out.append("")
                else:
                    if not 0 <= int(rip) < _U64:
                        raise ValueError(f"rip {rip:#x} does not fit in 64 bits")
                    out.append(f"{int(rip):#x}")
            elif c == "vcpu":
                if vcpu is None:
                    out.append("")
                else:
                    if not 0 <= int(vcpu) <= 0xFFFF:
                        raise ValueError(f"vcpu {vcpu} out of range 0..65535")
                    out.append(str(int(vcpu)))
            else:  # insn
                b = b"" if insn is None else bytes(insn)
                if len(b) > MAX_INSN_LEN:
                    raise ValueError(f"instruction of {len(b)} bytes (max {MAX_INSN_LEN})")
                out.append(b.hex())
        self._f.write(",".join(out) + "\n")
        self.count += 1

    def write_access(self, acc):
        """Write an :class:`Access` (or any object/tuple in CSV column order)."""
        self.write(*acc)

    def flush(self):
        self._f.flush()

    def close(self):
        if self._f is not None:
            if self._own:
                self._f.close()
            else:
                self._f.flush()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_csv(path, rows, columns=None, comment=None):
    """Write ``rows`` as a CSV fault trace; returns the number of rows.

    ``rows``: a :class:`Trace` (its columns are written), or an iterable of
    :class:`Access` / tuples ``(access, gpa[, size[, rip[, vcpu[, insn]]]])``
    / dicts with those keys.  ``access`` may be 0/1/2 or 'r'/'w'/'x'.
    """
    if columns is None:
        columns = rows.columns() if isinstance(rows, Trace) else CSV_COLUMNS
    with CsvTraceWriter(path, columns, comment) as w:
        for row in rows:
            if isinstance(row, dict):
                w.write(**row)
            else:
                w.write(*row)
        return w.count
