"""Fault traces: load them into compact columns, and write them.

A trace is a sequence of guest-physical accesses.  ``load_trace(path)``
returns a :class:`Trace` whose columns are arrays:

- ``access`` ``array('B')``: 0 read, 1 write, 2 execute (``ACC_R/W/X``)
- ``gpa``    ``array('Q')``: guest-physical address, always < 2**48
- ``size``   ``array('I')``: bytes accessed, 1..4096 (default 1);
  ``gpa + size <= 2**48``
- ``rip``    ``array('Q')`` or None, ``vcpu`` ``array('H')`` or None,
  ``insn`` list of ``bytes`` (0..15 bytes each) or None.

Formats (``fmt``; ``None`` detects it from the first meaningful lines):

``csv`` (what ``hv boot --record`` writes)
    The first line that is neither blank nor a comment is the header: column
    names separated by commas, in any order, case-insensitive.  ``access`` and
    ``gpa`` are required; ``size``, ``rip``, ``vcpu`` and ``insn`` optional;
    any other name is an error.  Each data line has exactly one field per
    column (no quoting); spaces/tabs around a field are ignored.  ``access``
    is ``r``, ``w`` or ``x`` (either case); numbers are ``0x``-prefixed hex or
    decimal; ``insn`` is the instruction as contiguous hex (``0f01d9``).  An
    empty optional field takes the default (size 1, rip 0, vcpu 0, insn
    ``b""``).

``lackey`` (``valgrind --tool=lackey --trace-mem=yes``)
    ``I  ADDR,SIZE`` instruction fetch (x); `` L ADDR,SIZE`` load (r);
    `` S ADDR,SIZE`` store (w); `` M ADDR,SIZE`` modify, which is a
    read-modify-write of the same bytes and becomes two accesses: a read,
    then a write.  ADDR is hex without ``0x``, SIZE decimal.  Lines starting
    with ``==``, ``--`` or ``**`` (valgrind's own messages, ``==PID== ...``)
    are skipped; any other unrecognised line is an error.  ``rip`` is filled
    with the address of the current instruction (the last ``I`` record).

``ftrace`` (``kvm_page_fault`` events from tracefs/trace-cmd/perf output)
    Every line containing ``kvm_page_fault:`` (at the start of the line or
    after a space, tab or colon) is an event; every other line is skipped.
    The event body is one of the four historical forms::

        address %lx error_code %x
        address %lx error_code %lx
        vcpu %u rip 0x%lx address 0x%lx error_code %x
        vcpu %u rip 0x%lx address 0x%016llx error_code 0x%llx

    (hex fields may carry ``0x`` or not).  The access kind comes from the
    x86 page-fault error code: bit 4 (fetch) -> x, else bit 1 (write) -> w,
    else r.  ``size`` is 1.  ``rip``/``vcpu`` columns exist when some event
    carries them (events without them get 0).

In every format blank lines and lines whose first non-blank character is
``#`` are skipped; lines end at ``\\n`` (a ``\\r`` before it is ignored).
Gzip-compressed files are accepted (also several concatenated members).

Size cap (``max_bytes``, default :data:`MAX_TRACE_BYTES` = 4 GiB; the CLI's
``hv replay --max-trace-bytes SIZE``): a file larger than the cap, or gzip
data that decompresses to more than it (a decompression bomb), is refused
with a :class:`TraceError` naming the limit.  Decompression stops as soon as
the cap is passed (nested gzip too), so the text in memory stays bounded by
it; both parser backends parse only text that passed the cap.  The cap
applies to uncompressed files (and pipes) too: parsing needs memory in
proportion to the text (the columns take up to ~6x a text of short
dense lines; lines that give no access, such as blank lines, take none), so a
plain file above the cap is as much a problem as a bomb.  ``max_bytes=None``:
no cap.

Errors are :class:`hv.errors.TraceError` (``PATH:LINE: what``), raised for the
first bad line; nothing is returned half-parsed.  Refused: missing or
unreadable file, binary data (NUL bytes, invalid UTF-8), unknown format,
empty trace (no accesses), CSV without header / with a missing required,
unknown or duplicate column, wrong number of fields, bad numbers, unknown
access kind, numbers that do not fit 64 bits, addresses >= 2**48 (the 48-bit
guest-physical space) or accesses running past it, size 0 or > 4096, vcpu
> 65535, malformed or > 15-byte instructions, malformed lackey records or
kvm_page_fault events.

Two parser backends give identical results: ``"c"`` (``hv._trace_c``, built
with cffi from ``csrc/trace.c``) and ``"python"``.  ``backend=None`` picks C
when it is built.

Modules: model.py (Trace, Access, limits), files.py (reading a file: caps,
gzip, pipes), text.py (format detection and the helpers every parser shares),
one module per format (csv_format.py with the writer, lackey.py, ftrace.py),
cparse.py (the C parsers), reader.py (entry points), replay.py (a trace
through the VMM's NPF path) and inspect.py (a saved table: snapshot, analysis).
Imports hv.errors and, for replay/inspect, hv.vmm and nptcore; never hv.cli,
hv.machine or the tools.
"""
from hv.errors import TraceError
from hv.trace.csv_format import CsvTraceWriter, write_csv
from hv.trace.model import (ACC_R, ACC_W, ACC_X, CSV_COLUMNS, FORMATS, GPA_LIMIT, MAX_ACCESS_SIZE,
                            MAX_INSN_LEN, MAX_TRACE_BYTES, PAGE_SHIFT, Access, Trace,
                            available_backends)
from hv.trace.reader import load_trace, parse_trace
from hv.trace.text import detect_format

__all__ = [
    "ACC_R", "ACC_W", "ACC_X", "GPA_LIMIT", "MAX_ACCESS_SIZE", "MAX_INSN_LEN",
    "PAGE_SHIFT", "FORMATS", "CSV_COLUMNS", "MAX_TRACE_BYTES", "Access", "Trace", "TraceError",
    "load_trace", "parse_trace", "detect_format", "available_backends",
    "write_csv", "CsvTraceWriter",
]
