"""Trace files in memory: read and decompressed a chunk at a time into one
buffer, so the text is held once (not chunks plus their join: twice), binary
data is refused at the first chunk that holds it (a gzip bomb of zeros never
inflates), and running out of memory is bad input (exit 2, one line).

Peaks are measured with tracemalloc (every Python allocation, bytearray
growth included), on inputs of a few tens of MiB."""
import gzip
import os
import subprocess
import sys
import tracemalloc

import pytest

from hv.errors import TraceError
from hv.trace import available_backends, load_trace

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENV.pop("HV_DEBUG", None)
BACKEND = available_backends()[0]
TEXT_MIB = 40


def _comments(n):
    """n bytes of CSV trace: a header, comment lines, one access."""
    head, tail = b"access,gpa\n", b"r,0x1000\n"
    line = b"#" + b"x" * 62 + b"\n"
    body = line * ((n - len(head) - len(tail)) // len(line))
    return head + body + tail


def _peak(fn):
    tracemalloc.start()
    try:
        try:
            res = fn()
        except TraceError as e:
            res = e
        return res, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    text = _comments(TEXT_MIB * MiB)
    (d / "text.csv.gz").write_bytes(gzip.compress(text, 1))
    (d / "zeros.gz").write_bytes(gzip.compress(bytes(TEXT_MIB * MiB), 1))
    (d / "zeros.bin").write_bytes(b"access,gpa\n" + bytes(TEXT_MIB * MiB))
    return d, len(text)


def test_gzip_text_is_held_once(files):
    d, n = files
    t, peak = _peak(lambda: load_trace(d / "text.csv.gz", backend=BACKEND))
    assert len(t) == 1 and list(t.gpa) == [0x1000]
    # the text (grown in place, at most 1/8 over) and one decompressed chunk;
    # chunks kept in a list and then joined took 2x the text
    assert peak < 1.5 * n, (peak / MiB, n / MiB)


def test_gzip_bomb_of_zeros_stops_at_its_first_chunk(files):
    d, n = files
    e, peak = _peak(lambda: load_trace(d / "zeros.gz", backend=BACKEND))
    assert isinstance(e, TraceError) and e.line == 1 and "binary data (NUL byte)" in e.msg
    assert peak < n / 2, peak / MiB


def test_binary_file_stops_at_its_first_chunk(files):
    d, n = files
    e, peak = _peak(lambda: load_trace(d / "zeros.bin", backend=BACKEND))
    assert isinstance(e, TraceError) and e.line == 2 and "NUL byte" in e.msg
    assert peak < n / 2, peak / MiB


def test_invalid_utf8_across_a_chunk_boundary(tmp_path):
    from hv.trace.model import _READ_CHUNK
    # a 2-byte sequence cut by the chunk boundary is fine; a lone lead byte
    # at the end of a chunk followed by ASCII is not
    head = b"access,gpa\n#" + b"x" * (_READ_CHUNK - 13)
    good = tmp_path / "good.csv"
    good.write_bytes(head + "é\nr,0x1\n".encode())
    assert len(load_trace(good)) == 1
    bad = tmp_path / "bad.csv"
    bad.write_bytes(head + b"\xc3\nr,0x1\n")
    with pytest.raises(TraceError, match="invalid UTF-8") as ei:
        load_trace(bad)
    assert ei.value.line == 2


def test_bomb_over_the_cap_is_refused_with_little_memory(files):
    d, n = files
    e, peak = _peak(lambda: load_trace(d / "text.csv.gz", max_bytes=4 * MiB))
    assert isinstance(e, TraceError) and "decompresses to more than the 4 MiB" in e.msg
    assert peak < 16 * MiB


def test_out_of_memory_is_bad_input(tmp_path):
    """Under an address-space limit that the text does not fit in, the
    command says so in one line and exits 2."""
    bomb = tmp_path / "bomb.csv.gz"
    block = _comments(MiB)[len(b"access,gpa\n"):-len(b"r,0x1000\n")]
    with gzip.open(bomb, "wb", 1) as f:          # 320 MiB of text, written a block at a time
        f.write(b"access,gpa\n")
        for _ in range(320):
            f.write(block)
        f.write(b"r,0x1000\n")
    code = ("import resource, sys\n"
            "from hv.cli.main import main\n"
            "vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0]"
            ".split()[1]) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (128 << 20),) * 2)\n"
            f"sys.exit(main(['replay', {str(bomb)!r}, '--max-trace-bytes', '2G', '--json']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "not enough memory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
