"""Reading a trace file: size caps, gzip with a decompression cap, pipes,
binary data refused."""
import codecs
import os
import stat
import zlib

from hv.errors import TraceError
from hv.trace.model import MAX_TRACE_BYTES, SKIPPED_KEPT, _GZ_CHUNK, _GZ_MAGIC, _READ_CHUNK


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


class _Skips:
    """Bad lines a parser skipped (skip_bad_lines): how many, and the first
    SKIPPED_KEPT of them (their _Fail)."""

    def __init__(self):
        self.count = 0
        self.first = []

    def append(self, fail):
        self.count += 1
        if len(self.first) < SKIPPED_KEPT:
            self.first.append(fail)


class _TextCheck:
    """Refuses binary data (a NUL byte, invalid UTF-8) a chunk at a time, as
    it is read or decompressed: the first bad chunk stops the read, whatever
    follows it.  The error names the line and says which came first."""

    def __init__(self, path):
        self.path = path
        self.lines = 0              # newlines before the current chunk
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    def feed(self, chunk, final=False):
        """Check the next chunk (bytes or bytearray); final: it is the last."""
        bad = chunk.find(b"\0")
        what = "NUL byte"
        pending = self._utf8.getstate()[0]
        if pending or final or not chunk.isascii():
            try:
                self._utf8.decode(chunk, final)     # the text itself is not kept
            except UnicodeDecodeError as e:
                at = e.start - len(pending)         # < 0: in the previous chunk's tail
                if bad < 0 or at < bad:
                    bad, what = at, "invalid UTF-8"
        if bad >= 0 or (bad < 0 and what == "invalid UTF-8"):
            line = self.lines + chunk.count(b"\n", 0, max(bad, 0)) + 1
            raise TraceError(self.path, line, f"binary data ({what}): not a text trace file")
        self.lines += chunk.count(b"\n")


def _check_text(data, path, start=0):
    """Refuse binary data in ``data[start:]`` (see _TextCheck)."""
    check = _TextCheck(path)
    mv = memoryview(data)
    n = len(data)
    pos = start
    while True:
        end = min(n, pos + _READ_CHUNK)
        check.feed(bytes(mv[pos:end]), final=end >= n)
        if end >= n:
            return
        pos = end


def _gunzip(src, path, max_bytes, check=True):
    """Decompress gzip data (one or more members, NUL padding between them
    allowed, as ``gzip.decompress``) into a bytearray, stopping with a
    TraceError as soon as the output passes ``max_bytes`` (None: no cap) or,
    with ``check``, holds binary data (checked a chunk at a time: a bomb of
    zeros stops at its first chunk).  ``src``: the compressed bytes, or a
    binary file read a chunk at a time.  Output that is itself gzip data
    (nested) is not checked here: decompressing it again checks it."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        mv = memoryview(src)
        chunks = (bytes(mv[i:i + _READ_CHUNK]) for i in range(0, len(mv), _READ_CHUNK))
    else:
        chunks = iter(lambda: src.read(_READ_CHUNK), b"")
    out = bytearray()
    total = 0
    text = None
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)     # gzip header and trailer (CRC, length)
    buf = next(chunks, b"")
    more = True                                     # compressed input may follow
    try:
        while True:
            want = _GZ_CHUNK if max_bytes is None else min(_GZ_CHUNK, max_bytes + 1 - total)
            chunk = d.decompress(buf, want)
            if chunk:
                if text is None:
                    text = _TextCheck(path) if check and (total or chunk[:2] != _GZ_MAGIC) \
                        else False
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise _too_big(path, "gzip data decompresses to more than", max_bytes)
                if text:
                    text.feed(chunk)
                out += chunk
            if d.eof:
                rest = d.unused_data.lstrip(b"\0")
                while not rest and more:
                    nxt = next(chunks, None)
                    if nxt is None:
                        more = False
                    else:
                        rest = nxt.lstrip(b"\0")
                if not rest:
                    break
                if rest[:2] != _GZ_MAGIC:
                    raise TraceError(path, None, "corrupt gzip data: trailing bytes after "
                                                 "the compressed stream")
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                buf = rest
                continue
            buf = d.unconsumed_tail
            if not buf and len(chunk) < want:       # it needs more input
                nxt = next(chunks, None) if more else None
                if nxt is None:
                    raise TraceError(path, None, "corrupt gzip data: compressed file ended "
                                                 "before the end-of-stream marker was reached")
                buf = nxt
    except zlib.error as e:
        raise TraceError(path, None, f"corrupt gzip data: {e}") from None
    if text:
        text.feed(b"", final=True)
    return out


def _read_stream(f, path, max_bytes, head=b"", what="input is larger than"):
    """Read a file or pipe to its end into a bytearray (grown in place, no
    second copy), refusing more than ``max_bytes`` and binary data, both as
    soon as a chunk shows them."""
    check = _TextCheck(path)
    out = bytearray(head)
    total = len(head)
    if head:
        check.feed(head)
    while True:
        b = f.read(_READ_CHUNK)
        if not b:
            check.feed(b"", final=True)
            return out
        total += len(b)
        if max_bytes is not None and total > max_bytes:
            raise _too_big(path, what, max_bytes)
        check.feed(b)
        out += b


def _read_file(path, max_bytes=MAX_TRACE_BYTES):
    """The text of a trace file as a bytearray: decompressed if it is gzip
    data, capped, and checked for binary data as it is read."""
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
            if stat.S_ISREG(st.st_mode) and max_bytes is not None and st.st_size > max_bytes:
                raise _too_big(path, f"file ({st.st_size} bytes) is larger than", max_bytes)
            head = f.read(2)
            while len(head) < 2:        # a pipe may hand over one byte first
                b = f.read(2 - len(head))
                if not b:
                    break
                head += b
            if head == _GZ_MAGIC:
                return _gunzip(_Prefixed(head, f), path, max_bytes)
            return _read_stream(f, path, max_bytes, head, "file is larger than"
                                if stat.S_ISREG(st.st_mode) else "input is larger than")
    except FileNotFoundError:
        raise TraceError(path, None, "no such file") from None
    except IsADirectoryError:
        raise TraceError(path, None, "is a directory, not a trace file") from None
    except PermissionError:
        raise TraceError(path, None, "permission denied") from None
    except OSError as e:
        raise TraceError(path, None, f"cannot read: {e.strerror or e}") from None


class _Prefixed:
    """A binary file whose first bytes were already read (``head``)."""

    def __init__(self, head, f):
        self.head, self.f = head, f

    def read(self, n):
        if self.head:
            b, self.head = self.head + self.f.read(max(0, n - len(self.head))), b""
            return b
        return self.f.read(n)
