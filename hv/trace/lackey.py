"""valgrind lackey output (`I`/`L`/`S`/`M` lines): the pure-Python parser."""
import array
from hv.trace.text import _LACKEY_RE, _check_addr, _dec, _hex, _meaningful, _split_lines
from hv.trace.files import _Fail
from hv.trace.model import ACC_R, ACC_W, ACC_X, E_RANGE, E_SYNTAX, Trace



def _py_lackey(data, first_line, start=0, skipped=None):
    """``skipped``: a list collecting the _Fail of each bad line, going on
    with the next (None: the first bad line raises)."""
    acc = array.array("B")
    gpa = array.array("Q")
    size = array.array("I")
    rip = array.array("Q")
    a_app, g_app, s_app, r_app = acc.append, gpa.append, size.append, rip.append
    match = _LACKEY_RE.fullmatch
    cur = 0
    for no, line in enumerate(_split_lines(data, start=start), first_line):
        m = match(line)
        try:
            if m is None:
                if line[:2] in (b"==", b"--", b"**") or not _meaningful(line):
                    continue
                raise _Fail(no, E_SYNTAX)
            kind, a, s = m.groups()
            g = _hex(a)
            if g is None:
                raise _Fail(no, E_RANGE, 0)
            sz = _dec(s)
            if sz is None:
                raise _Fail(no, E_RANGE, 1)
            _check_addr(no, g, sz)
        except _Fail as f:
            if skipped is None:
                raise
            skipped.append(f)
            continue
        if kind == b"I":
            cur = g
            a_app(ACC_X)
        elif kind == b"L":
            a_app(ACC_R)
        elif kind == b"S":
            a_app(ACC_W)
        else:  # M: read, then write
            a_app(ACC_R)
            g_app(g)
            s_app(sz)
            r_app(cur)
            a_app(ACC_W)
        g_app(g)
        s_app(sz)
        r_app(cur)
    return Trace(acc, gpa, size, rip, format="lackey")
