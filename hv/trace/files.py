"""Reading a trace file: size caps, gzip with a decompression cap, pipes,
binary data refused."""
import os
import stat
import zlib

from hv.errors import TraceError
from hv.trace.model import MAX_TRACE_BYTES, _GZ_CHUNK, _GZ_MAGIC, _READ_CHUNK


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
