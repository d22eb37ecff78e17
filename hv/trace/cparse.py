"""The C parsers (csrc/trace.c through cffi) behind the same interface as the
pure-Python ones."""
import array
from hv.trace.files import _Fail
from hv.trace.text import _FT_TOKEN
from hv.trace.model import CSV_COLUMNS, E_OK, MAX_INSN_LEN, Trace



try:  # the C fast path, built with cffi from csrc/trace.c
    from hv import _trace_c
except ImportError:  # pragma: no cover - depends on the build
    _trace_c = None

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
