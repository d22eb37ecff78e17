"""Entry points: parse trace bytes or load a trace file, in any format,
with either parser backend."""
import os

from hv.errors import TraceError
from hv.trace.lackey import _py_lackey
from hv.trace.ftrace import _py_ftrace
from hv.trace.perf import _py_perf
from hv.trace.csv_format import _py_csv
from hv.trace.text import _csv_header, _line_of, _message, _snippet, detect_format
from hv.trace.cparse import _c_parse
from hv.trace.files import (_Fail, _Skips, _check_max_bytes, _check_text, _fmt_bytes, _gunzip,
                            _read_file, _too_big)
from hv.trace.model import (FORMATS, MAX_TRACE_BYTES, _FTRACE_FIELDS, _GZ_MAGIC, _LACKEY_FIELDS,
                            _trace_c)

_BOM = b"\xef\xbb\xbf"


# --- entry points ------------------------------------------------------------


def parse_trace(data, fmt=None, path="<trace>", backend=None, max_bytes=MAX_TRACE_BYTES,
                skip_bad_lines=False):
    """Parse trace text (bytes) -> :class:`Trace`.  See :func:`load_trace`."""
    _check_max_bytes(max_bytes)
    if isinstance(data, str):
        data = data.encode("utf-8")
    backend = _backend(backend)
    _check_fmt(fmt, path)
    try:
        if data[:2] == _GZ_MAGIC:
            data = _gunzip(data, path, max_bytes)   # capped and checked: a bomb stops here
        else:
            if max_bytes is not None and len(data) > max_bytes:
                raise _too_big(path, f"trace text ({len(data)} bytes) is larger than", max_bytes)
            _check_text(data, path)
        return _parse(data, fmt, path, backend, skip_bad_lines)
    except MemoryError:
        raise _no_memory(path, len(data)) from None


def load_trace(path, fmt=None, backend=None, max_bytes=MAX_TRACE_BYTES, skip_bad_lines=False):
    """Load a fault trace file (optionally gzip-compressed) -> :class:`Trace`.

    ``fmt``: ``"csv"``, ``"lackey"``, ``"ftrace"``, ``"perf"`` or ``None``
    (detect from the content).  ``backend``: ``"c"``, ``"python"`` or
    ``None`` (C if built).  ``max_bytes``: the size cap on the file and on
    its decompressed text (default 4 GiB; ``None``: none).  The file is read
    (and decompressed) a chunk at a time into one buffer: binary data is
    refused at the first chunk that holds it, and the text is in memory
    once.  ``skip_bad_lines``: leave out each line that would be refused
    (a malformed record, a bad number, an address out of range ...) and go
    on; the Trace says how many (``skipped``) and names the first ones
    (``skipped_lines``: ``(line, message)``).  Problems with the file as a
    whole (binary data, unknown format, a bad CSV header, no accesses left)
    are still refused.  Raises :class:`TraceError` on any problem with the
    file, also when there is not enough memory for it.
    """
    _check_max_bytes(max_bytes)
    path = os.fspath(path)
    backend = _backend(backend)
    _check_fmt(fmt, path)
    try:
        data = _read_file(path, max_bytes)
        if data[:2] == _GZ_MAGIC:                   # gzip inside gzip
            data = _gunzip(data, path, max_bytes)
        return _parse(data, fmt, path, backend, skip_bad_lines)
    except MemoryError:
        raise _no_memory(path, None) from None


def _backend(backend):
    if backend is None:
        return "c" if _trace_c is not None else "python"
    if backend not in ("c", "python"):
        raise ValueError(f"unknown trace parser backend {backend!r}")
    if backend == "c" and _trace_c is None:
        raise RuntimeError("the C trace parser (hv._trace_c) is not built")
    return backend


def _check_fmt(fmt, path):
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(path, None, f"unknown trace format {fmt!r}"
                         f" (expected one of: {', '.join(FORMATS)})")


def _no_memory(path, size):
    what = f" ({_fmt_bytes(size)} of text)" if size else ""
    return TraceError(path, None, f"not enough memory to load the trace{what}: use a smaller "
                                  f"trace or a lower --max-trace-bytes")


def _parse(data, fmt, path, backend, skip_bad_lines):
    """Checked text (bytes or a bytearray, not copied) -> Trace."""
    start = bom = 3 if data[:3] == _BOM else 0    # a UTF-8 byte order mark
    if fmt is None:
        fmt, unknown = detect_format(data, start)
        if fmt is None:
            if unknown is None:
                raise TraceError(path, None, "empty trace: no accesses")
            raise TraceError(path, unknown, "unknown trace format: "
                             f"{_snippet(_line_of(data, unknown, start=start))} is not a CSV"
                             " header naming access,gpa columns, a valgrind lackey record, a"
                             " kvm_page_fault ftrace line or a page_fault_user perf line")
    names = None
    first_line = 1
    if fmt == "csv":
        names, start, first_line = _csv_header(data, path, start)
    skipped = _Skips() if skip_bad_lines else None
    try:
        if backend == "c":
            tr = _c_parse(fmt, data, first_line, names, start, skipped)
        elif fmt == "lackey":
            tr = _py_lackey(data, first_line, start, skipped)
        elif fmt == "ftrace":
            tr = _py_ftrace(data, first_line, start, skipped)
        elif fmt == "perf":
            tr = _py_perf(data, first_line, start, skipped)
        else:
            tr = _py_csv(data, first_line, names, start, skipped)
    except _Fail as f:
        raise TraceError(path, f.line, _fail_message(fmt, f, data, names, bom)) from None
    if skipped is not None and skipped.count:
        tr.skipped = skipped.count
        tr.skipped_lines = [(f.line, _fail_message(fmt, f, data, names, bom))
                            for f in skipped.first]
    if not len(tr):
        if tr.skipped:
            line, msg = tr.skipped_lines[0]
            raise TraceError(path, None, f"no accesses left after skipping {tr.skipped} bad "
                                         f"lines (the first: line {line}: {msg})")
        raise TraceError(path, None, f"empty trace: no accesses ({fmt} format)")
    tr.path = path
    return tr


def _fail_message(fmt, f, data, names, bom):
    line = _line_of(data, f.line, start=bom)
    colnames = (names if fmt == "csv" else
                _LACKEY_FIELDS if fmt == "lackey" else _FTRACE_FIELDS)
    return _message(fmt, f, line, colnames)
