"""The C parsers (csrc/trace.c through cffi) behind the same interface as the
pure-Python ones."""
import array
from hv.trace.files import _Fail
from hv.trace.text import _FT_TOKEN, _PFU_TOKEN
from hv.trace.model import CSV_COLUMNS, E_INTERNAL, E_OK, MAX_INSN_LEN, Trace



try:  # the C fast path, built with cffi from csrc/trace.c
    from hv import _trace_c
except ImportError:  # pragma: no cover - depends on the build
    _trace_c = None

# --- C backend -------------------------------------------------------------


def _zeros(typecode, n):
    return array.array(typecode, bytearray(n * array.array(typecode).itemsize))


def _c_parse(fmt, data, first_line, names, start=0, skipped=None):
    """Parse ``data[start:]`` (no copy is made).  ``skipped``: a list
    collecting the _Fail of each bad line; parsing resumes after it (the C
    parser reports where the next line starts).  None: the first raises."""
    ffi, lib = _trace_c.ffi, _trace_c.lib
    # output capacity: an upper bound on the accesses, from what every
    # accepted line must contain, so that blank lines, comments or other
    # lines that give no access (a cheap way to blow up a small gzip file)
    # cost no column memory
    nlines = data.count(b"\n", start) + 1
    if fmt == "lackey":
        # one comma per record; an M record gives two accesses and has an 'M'
        rec = min(nlines, data.count(b",", start))
        cap = rec + min(rec, data.count(b"M", start))
    elif fmt == "ftrace":
        cap = min(nlines, data.count(_FT_TOKEN, start))
    elif fmt == "perf":
        cap = min(nlines, data.count(_FT_TOKEN, start) + data.count(_PFU_TOKEN, start))
    else:
        # every data line has exactly len(names) - 1 commas (>= 1: access, gpa)
        cap = min(nlines, data.count(b",", start) // max(len(names) - 1, 1))
    res = ffi.new("trace_result *")
    buf = ffi.from_buffer("char[]", data)
    acc, gpa, size = _zeros("B", cap), _zeros("Q", cap), _zeros("I", cap)
    rip = vcpu = insn = insn_len = None
    if fmt in ("lackey", "ftrace", "perf"):
        rip = _zeros("Q", cap)
    if fmt in ("ftrace", "perf"):
        vcpu = _zeros("H", cap)
    if fmt == "csv":
        types = ffi.from_buffer("uint8_t[]", bytes(CSV_COLUMNS.index(nm) for nm in names))
        if "rip" in names:
            rip = _zeros("Q", cap)
        if "vcpu" in names:
            vcpu = _zeros("H", cap)
        if "insn" in names:
            insn = bytearray(cap * MAX_INSN_LEN)
            insn_len = bytearray(cap)

    def p(arr, ctype, n, width=1):
        return (ffi.from_buffer(ctype + "[]", arr) + n * width) if arr is not None else ffi.NULL

    n, has_rip, has_vcpu = 0, False, False
    pos, line = start, first_line
    while True:
        args = (buf + pos, len(data) - pos, line, p(acc, "uint8_t", n), p(gpa, "uint64_t", n),
                p(size, "uint32_t", n))
        if fmt == "lackey":
            rc = lib.trace_parse_lackey(*args, p(rip, "uint64_t", n), cap - n, res,
                                        rip[n - 1] if n else 0)
        elif fmt in ("ftrace", "perf"):
            parse = lib.trace_parse_ftrace if fmt == "ftrace" else lib.trace_parse_perf
            rc = parse(*args, p(rip, "uint64_t", n), p(vcpu, "uint16_t", n), cap - n, res)
        else:
            rc = lib.trace_parse_csv(*args[:3], types, len(names), *args[3:],
                                     p(rip, "uint64_t", n), p(vcpu, "uint16_t", n),
                                     p(insn, "uint8_t", n, MAX_INSN_LEN),
                                     p(insn_len, "uint8_t", n), cap - n, res)
        n += res.n
        has_rip |= bool(res.has_rip)
        has_vcpu |= bool(res.has_vcpu)
        if rc == E_OK:
            break
        fail = _Fail(res.line, res.code, res.col, res.val, res.val2)
        if skipped is None or res.code == E_INTERNAL:
            raise fail
        skipped.append(fail)
        pos += res.next
        line = res.line + 1
        if pos >= len(data):
            break
    for arr in (acc, gpa, size, rip, vcpu):
        if arr is not None:
            del arr[n:]
    if fmt in ("ftrace", "perf"):
        rip = rip if has_rip else None
        vcpu = vcpu if has_vcpu else None
    ins_list = None
    if insn is not None and insn_len.count(0, 0, n) == n:
        ins_list = [b""] * n
    elif insn is not None:
        mv = memoryview(insn)
        ins_list = [bytes(mv[i * MAX_INSN_LEN:i * MAX_INSN_LEN + insn_len[i]]) for i in range(n)]
    return Trace(acc, gpa, size, rip, vcpu, ins_list, format=fmt)
