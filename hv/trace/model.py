"""The in-memory trace (struct-of-arrays `Trace`, `Access` rows) and the
limits and reason codes every format shares."""
import array
from typing import NamedTuple, Optional



try:  # the C fast path, built with cffi from csrc/trace.c
    from hv import _trace_c
except ImportError:  # pragma: no cover - depends on the build
    _trace_c = None

ACC_R, ACC_W, ACC_X = 0, 1, 2
ACCESS_CHARS = "rwx"
GPA_LIMIT = 1 << 48
MAX_ACCESS_SIZE = 4096
MAX_INSN_LEN = 15
PAGE_SHIFT = 12
FORMATS = ("csv", "lackey", "ftrace", "perf")
CSV_COLUMNS = ("access", "gpa", "size", "rip", "vcpu", "insn")
_REQUIRED = ("access", "gpa")
_U64 = 1 << 64
MAX_TRACE_BYTES = 4 << 30   # default cap on a trace file and on its decompressed text
_GZ_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 8 << 20       # reading a file or pipe: checked for binary data a chunk at a time
_GZ_CHUNK = 8 << 20         # output per decompression step (checked the same way)
_SPLIT_BLOCK = 1 << 20      # the pure-Python parsers split lines a block at a time

# reason codes shared with csrc/trace.c
(E_OK, E_SYNTAX, E_NFIELDS, E_ACCESS, E_NUMBER, E_RANGE, E_EMPTY, E_ADDR,
 E_ADDR_END, E_SIZE0, E_SIZEBIG, E_VCPU, E_INSN, E_INSN_LONG,
 E_INTERNAL) = range(15)

_LACKEY_FIELDS = ("address", "size")
_FTRACE_FIELDS = ("vcpu", "rip", "address", "error_code")   # also perf's (ip is rip)
SKIPPED_KEPT = 10           # skip_bad_lines: the first bad lines a Trace names


class Access(NamedTuple):
    access: int
    gpa: int
    size: int = 1
    rip: Optional[int] = None
    vcpu: Optional[int] = None
    insn: Optional[bytes] = None


class Trace:
    """Columns of a fault trace (see the module docstring)."""

    __slots__ = ("access", "gpa", "size", "rip", "vcpu", "insn", "format", "path", "skipped",
                 "skipped_lines")

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
        # bad lines left out (parse_trace/load_trace skip_bad_lines=True): how
        # many, and the first SKIPPED_KEPT of them as (line number, message)
        self.skipped = 0
        self.skipped_lines = []
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
