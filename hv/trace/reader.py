"""Entry points: parse trace bytes or load a trace file, in any format,
with either parser backend."""
import os

from hv.errors import TraceError
from hv.trace.lackey import _py_lackey
from hv.trace.ftrace import _py_ftrace
from hv.trace.csv_format import _py_csv
from hv.trace.text import _csv_header, _line_of, _message, _snippet, detect_format
from hv.trace.cparse import _c_parse
from hv.trace.files import _Fail, _check_max_bytes, _check_text, _gunzip, _read_file, _too_big
from hv.trace.model import (FORMATS, MAX_TRACE_BYTES, _FTRACE_FIELDS, _GZ_MAGIC, _LACKEY_FIELDS,
                            _trace_c)


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
