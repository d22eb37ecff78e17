"""The CSV trace format: the pure-Python parser and the writer (`hv boot
--record`)."""
import array
import gzip
import io
import os
from hv.trace.text import _INSN_RE, _WS, _meaningful, _num, _parsed
from hv.trace.files import _Fail
from hv.trace.model import (ACCESS_CHARS, CSV_COLUMNS, E_ACCESS, E_ADDR, E_ADDR_END, E_EMPTY,
                            E_INSN, E_INSN_LONG, E_NFIELDS, E_SIZE0, E_SIZEBIG, E_VCPU, GPA_LIMIT,
                            MAX_ACCESS_SIZE, MAX_INSN_LEN, Trace, _REQUIRED, _U64)



_ACC_CODES = {b"r": 0, b"R": 0, b"w": 1, b"W": 1, b"x": 2, b"X": 2}


def _csv_row(no, line, names, ncols):
    """(access, gpa, size, rip, vcpu, insn) of a data line, None for a blank
    or comment line; _Fail for a bad one."""
    if not _meaningful(line):
        return None
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
    return a, g, sz, r, v, ins


def _py_csv(data, first_line, names, start=0, skipped=None):
    """``skipped``: a list collecting the _Fail of each bad line, going on
    with the next (None: the first bad line raises)."""
    ncols = len(names)
    idx = {nm: i for i, nm in enumerate(names)}
    acc = array.array("B")
    gpa = array.array("Q")
    size = array.array("I")
    rip = array.array("Q") if "rip" in idx else None
    vcpu = array.array("H") if "vcpu" in idx else None
    insn = [] if "insn" in idx else None
    for no, row in _parsed(data, first_line, start,
                           lambda no, line: _csv_row(no, line, names, ncols), skipped):
        a, g, sz, r, v, ins = row
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
