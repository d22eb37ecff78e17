"""Line-level helpers every format parser shares: format detection, line
splitting, numbers, addresses, error messages naming the bad line."""
import re

from hv.errors import TraceError
from hv.trace.files import _Fail
from hv.trace.model import (CSV_COLUMNS, E_ACCESS, E_ADDR, E_ADDR_END, E_EMPTY, E_INSN,
                            E_INSN_LONG, E_NFIELDS, E_NUMBER, E_OK, E_RANGE, E_SIZE0, E_SIZEBIG,
                            E_SYNTAX, E_VCPU, GPA_LIMIT, MAX_ACCESS_SIZE, MAX_INSN_LEN, _REQUIRED,
                            _SPLIT_BLOCK, _U64)


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
