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
_PFU_TOKEN = b"page_fault_user:"       # exceptions:page_fault_user (the perf format)
_WS = b" \t\r"
_DETECT_LINES = 1000
_DETECT_BYTES = 1 << 20


def _meaningful(line):
    s = line.lstrip(_WS)
    return bool(s) and s[:1] != b"#"


def detect_format(data, start=0):
    """Guess the format of trace text (bytes).

    The first line that is neither blank nor a comment decides: a CSV header
    naming ``access`` or ``gpa``, a lackey record or valgrind message, or a
    tracepoint event line.  Event output (tracefs, trace-cmd, ``perf
    script``) may start with other lines (``cpus=2``, other events ...), so
    an event within the first 1000 lines (1 MiB) also counts: a
    ``page_fault_user:`` event says ``perf`` (which reads kvm_page_fault
    events too); else a ``kvm_page_fault:`` event, an ftrace line prefix or
    a ``# tracer:`` header says ``ftrace``.  Returns ``(fmt, None)`` or ``(None, line_no)`` with the
    first line that fits no format (``(None, None)``: nothing but blanks and
    comments).  ``start``: where the text begins in data (after a byte order
    mark).
    """
    first_unknown = None
    events = False              # ftrace-style output seen, no fault event yet
    window = bytes(data[start:start + _DETECT_BYTES]).split(b"\n")[:_DETECT_LINES]
    for no, line in enumerate(window, 1):
        stripped = line.strip(_WS)
        if not stripped:
            continue
        if not events and _CHATTER.match(line):
            return "lackey", None
        if stripped[:1] == b"#":
            if _FTRACE_TRACER.match(stripped):
                events = True
            continue
        if _ft_token_at(line) >= 0:
            events = True       # ftrace, unless page_fault_user events follow
        elif _pfu_token_at(line) >= 0:
            return "perf", None
        elif _FTRACE_PREFIX.match(line[:512]):
            events = True
        if events or first_unknown is not None:
            continue  # only event output may hold other lines before its events
        if _LACKEY_RE.fullmatch(line):
            return "lackey", None
        names = [f.strip(_WS).lower() for f in line.split(b",")]
        if b"access" in names or b"gpa" in names:
            return "csv", None
        first_unknown = no
    if events:
        return "ftrace", None
    return None, first_unknown


def _ft_token_at(line, token=_FT_TOKEN):
    """Index of the event token in line (its first occurrence, at the start
    or after ' ', tab or ':'), or -1."""
    i = line.find(token)
    if i > 0 and line[i - 1] not in b" \t:":
        return -1
    return i


def _pfu_token_at(line):
    return _ft_token_at(line, _PFU_TOKEN)


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
        if fmt == "perf" and _ft_token_at(line) < 0:
            return ("malformed page_fault_user event (expected"
                    f" 'address=0xA ip=0xI error_code=0xE'): {_snippet(line)}")
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


def _parsed(data, first_line, start, parse, skipped):
    """(line number, parse(no, line)) for each line of data[start:] whose
    parse is not None. A bad line raises _Fail; with `skipped` (a list) its
    _Fail is collected there instead and the next line follows (the pure-
    Python parsers' --skip-bad-lines)."""
    for no, line in enumerate(_split_lines(data, start=start), first_line):
        try:
            r = parse(no, line)
        except _Fail as f:
            if skipped is None:
                raise
            skipped.append(f)
            continue
        if r is not None:
            yield no, r


def _split_lines(data, block=_SPLIT_BLOCK, start=0):
    """The items of ``data[start:].split(b"\\n")`` (as bytes, also when data
    is a bytearray), a block of about ``block`` bytes at a time: a trace of
    millions of blank lines does not become one list of millions of lines,
    and a large trace is not copied whole."""
    n = len(data)
    mv = memoryview(data)
    while n - start > block:
        cut = data.rfind(b"\n", start, start + block)
        if cut < 0:                         # a line longer than a block
            cut = data.find(b"\n", start + block)
            if cut < 0:
                break
        yield from bytes(mv[start:cut]).split(b"\n")
        start = cut + 1
    yield from bytes(mv[start:]).split(b"\n")


def _line_of(data, lineno, block=1 << 20, start=0):
    """Line `lineno` (1-based) of data[start:], without its newline. Whole
    blocks of lines are skipped by bytes.count (a malformed line near the end
    of a multi-GB trace is named in well under a second), the last by index."""
    left = lineno - 1
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


def _csv_header(data, path, start=0):
    """Find and check the header in data[start:].  Returns (column names,
    offset of the line after it, its line number)."""
    pos, no = start, 0
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
