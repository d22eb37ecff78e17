"""kvm_page_fault ftrace lines (all four historical kernel formats): the
pure-Python parser."""
import array
from hv.trace.files import _Fail
from hv.trace.text import (_FTRACE_BODY, _FT_TOKEN, _dec, _ft_token_at, _hex, _meaningful,
                           _split_lines)
from hv.trace.model import ACC_R, ACC_W, ACC_X, E_ADDR, E_RANGE, E_SYNTAX, E_VCPU, GPA_LIMIT, Trace



def _py_ftrace(data, first_line):
    acc = array.array("B")
    gpa = array.array("Q")
    size = array.array("I")
    rip = array.array("Q")
    vcpu = array.array("H")
    has_v = False
    body = _FTRACE_BODY.fullmatch
    for no, line in enumerate(_split_lines(data), first_line):
        if not _meaningful(line):
            continue
        i = _ft_token_at(line)
        if i < 0:
            continue
        m = body(line, i + len(_FT_TOKEN))
        if m is None:
            raise _Fail(no, E_SYNTAX)
        sv, sr, sa, se = m.groups()
        v = r = 0
        if sv is not None:
            v = _dec(sv)
            if v is None:
                raise _Fail(no, E_RANGE, 0)
            r = _hex(sr)
            if r is None:
                raise _Fail(no, E_RANGE, 1)
            has_v = True
        g = _hex(sa)
        if g is None:
            raise _Fail(no, E_RANGE, 2)
        ec = _hex(se)
        if ec is None:
            raise _Fail(no, E_RANGE, 3)
        if v > 0xFFFF:
            raise _Fail(no, E_VCPU, -1, v)
        if g >= GPA_LIMIT:
            raise _Fail(no, E_ADDR, -1, g)
        acc.append(ACC_X if ec & 16 else ACC_W if ec & 2 else ACC_R)
        gpa.append(g)
        size.append(1)
        rip.append(r)
        vcpu.append(v)
    if not has_v:
        rip = vcpu = None
    return Trace(acc, gpa, size, rip, vcpu, format="ftrace")
