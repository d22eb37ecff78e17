"""``perf script`` (and tracefs) text of page-fault tracepoints: the
pure-Python parser of the ``perf`` format.

Two events, each on a line of its own, wherever the line's prefix (comm,
pid, cpu, timestamp, flags) puts it:

- ``exceptions:page_fault_user`` (``perf record -e
  exceptions:page_fault_user``; tracefs ``page_fault_user:``): ``address=%ps
  ip=%ps error_code=0x%lx``: a user-space page fault of the traced program:
  the faulting (virtual) address, the instruction pointer (the ``rip``
  column) and the x86 page-fault error code;
- ``kvm:kvm_page_fault`` in any of the forms the ``ftrace`` format reads
  (a guest's NPT/EPT fault: its guest-physical address, and vcpu/rip).

Every other line (other events, perf's ``#`` header) is skipped.  The
access kind comes from the error code as for ``ftrace``: bit 4 (fetch) x,
else bit 1 (write) w, else r; ``size`` is 1.  csrc/trace.c
(``trace_parse_perf``) gives identical results.
"""
import array
import re

from hv.trace.files import _Fail
from hv.trace.model import ACC_R, ACC_W, ACC_X, E_ADDR, E_RANGE, E_SYNTAX, E_VCPU, GPA_LIMIT, Trace
from hv.trace.text import (_FTRACE_BODY, _FT_TOKEN, _PFU_TOKEN, _dec, _ft_token_at, _hex,
                           _meaningful, _parsed, _pfu_token_at)

_PFU_BODY = re.compile(
    rb"[ \t\r]*address=(?:0[xX])?([0-9a-fA-F]+)[ \t\r]+ip=(?:0[xX])?([0-9a-fA-F]+)[ \t\r]+"
    rb"error_code=(?:0[xX])?([0-9a-fA-F]+)[ \t\r]*")


def _event(no, line, perf):
    """(access, gpa, rip, vcpu, has_rip, has_vcpu) of the event on line, or
    None for a line without one; _Fail for a malformed one."""
    i = _ft_token_at(line)
    if i >= 0:
        m = _FTRACE_BODY.fullmatch(line, i + len(_FT_TOKEN))
        if m is None:
            raise _Fail(no, E_SYNTAX)
        sv, sr, sa, se = m.groups()
    elif perf and (i := _pfu_token_at(line)) >= 0:
        m = _PFU_BODY.fullmatch(line, i + len(_PFU_TOKEN))
        if m is None:
            raise _Fail(no, E_SYNTAX)
        sv = None
        sa, sr, se = m.groups()
    else:
        return None
    v = r = 0
    if sv is not None:
        v = _dec(sv)
        if v is None:
            raise _Fail(no, E_RANGE, 0)
    if sr is not None:
        r = _hex(sr)
        if r is None:
            raise _Fail(no, E_RANGE, 1)
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
    return (ACC_X if ec & 16 else ACC_W if ec & 2 else ACC_R), g, r, v, sr is not None, \
        sv is not None


def _py_events(data, first_line, perf, start=0, skipped=None):
    """The ``ftrace`` (perf False: kvm_page_fault only) and ``perf`` parsers.
    ``skipped``: a list to collect the _Fail of each bad line in, going on
    with the next line (None: the first bad line raises)."""
    acc = array.array("B")
    gpa = array.array("Q")
    size = array.array("I")
    rip = array.array("Q")
    vcpu = array.array("H")
    has_r = has_v = False
    def parse(no, line):
        return _event(no, line, perf) if _meaningful(line) else None

    for no, ev in _parsed(data, first_line, start, parse, skipped):
        a, g, r, v, hr, hv_ = ev
        acc.append(a)
        gpa.append(g)
        size.append(1)
        rip.append(r)
        vcpu.append(v)
        has_r |= hr
        has_v |= hv_
    return Trace(acc, gpa, size, rip if has_r else None, vcpu if has_v else None,
                 format="perf" if perf else "ftrace")


def _py_perf(data, first_line, start=0, skipped=None):
    return _py_events(data, first_line, True, start, skipped)
