"""kvm_page_fault ftrace lines (all four historical kernel formats): the
pure-Python parser (shared with the perf format: hv/trace/perf.py)."""
from hv.trace.perf import _py_events


def _py_ftrace(data, first_line, start=0, skipped=None):
    return _py_events(data, first_line, False, start, skipped)
