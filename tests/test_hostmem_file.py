"""--host-mem-file: allocated up front (a full file system is exit 2 with one
line before the guest starts, not a SIGBUS later), created only once every
argument is valid (and removed again when the command is refused after
all), never one of the command's own input or output files."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from hv.vmm.hostmem import HostMemory, HostMemoryError
from test_cli_badinput import assert_bad_input, hv, hv_many

MiB = 1 << 20


def test_file_is_allocated_not_sparse(tmp_path):
    f = tmp_path / "hm.bin"
    m = HostMemory(64 * MiB, path=f)
    try:
        st = os.stat(f)
        assert st.st_size == 64 * MiB
        # every block is reserved (a sparse file has next to none)
        assert st.st_blocks * 512 >= 64 * MiB
        assert m.created
    finally:
        m.close()
    m = HostMemory(64 * MiB, path=f)        # this process set it up: reused
    assert not m.created
    m.close()


@pytest.fixture
def tiny_fs():
    """A 1 MiB tmpfs (needs root and mount(2); skipped where not allowed)."""
    d = tempfile.mkdtemp(prefix="hv-tiny-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d],
                       capture_output=True, text=True)
    if r.returncode:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", d], capture_output=True)
        os.rmdir(d)


def test_full_file_system_is_bad_input(tiny_fs):
    f = os.path.join(tiny_fs, "hm.bin")
    with pytest.raises(HostMemoryError, match="No space left on device"):
        HostMemory(64 * MiB, path=f)
    assert not os.path.exists(f)            # made for nothing: removed
    for psp in ("inprocess", "process"):
        r = hv("boot", "memtouch", "--mem", "32M", "--host-mem", "64M", "--host-mem-file", f,
               "--psp", psp, "--json")
        assert_bad_input(r, f, "No space left on device", where=psp)
        assert not os.path.exists(f)


def test_no_file_is_left_by_a_refused_command(tmp_path):
    f = tmp_path / "hm.bin"
    serial = tmp_path / "serial.txt"
    # --mem larger than host memory: refused before host memory is made
    r = hv("boot", "hello", "--mem", "200M", "--host-mem", "64M", "--host-mem-file", f,
           "--serial", serial)
    assert_bad_input(r, "--mem", "--host-mem")
    assert not f.exists() and not serial.exists()
    # a bad trace: refused before host memory is made
    bad = tmp_path / "bad.csv"
    bad.write_text("access,gpa\nq,1\n")
    assert_bad_input(hv("replay", bad, "--host-mem", "64M", "--host-mem-file", f), "bad.csv")
    assert not f.exists()


def test_input_and_output_files_are_never_host_memory(tmp_path):
    from guests.build import DEFAULT_OUT, build_one
    t = tmp_path / "t.csv"
    t.write_text("access,gpa\nr,0x1000\n")
    before = t.read_bytes()
    link = tmp_path / "link.csv"                # the same file under another name
    os.symlink(t, link)
    img = tmp_path / "hello.elf"
    img.write_bytes(build_one("hello", DEFAULT_OUT).read_bytes())
    blob = img.read_bytes()
    out = tmp_path / "out.csv"
    over = ["--host-mem", "64M", "--host-mem-file-overwrite"]
    rs = hv_many([("replay", t, "--host-mem-file", t, *over),
                  ("replay", link, "--host-mem-file", t, *over),
                  ("boot", img, "--mem", "2M", "--host-mem-file", img, *over),
                  ("boot", img, "--mem", "2M", "--host-mem", "64M", "--host-mem-file", out,
                   "--record", out)])
    assert_bad_input(rs[0], str(t), "the trace to replay")
    assert_bad_input(rs[1], "the trace to replay")
    assert_bad_input(rs[2], "the guest image")
    assert_bad_input(rs[3], "the --record file")
    assert t.read_bytes() == before and img.read_bytes() == blob
    assert not out.exists()


def test_host_mem_file_of_a_good_run_is_kept(tmp_path):
    f = tmp_path / "hm.bin"
    r = hv("boot", "hello", "--mem", "2M", "--host-mem", "64M", "--host-mem-file", f, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exit_code"] == 0
    assert f.stat().st_size == 64 * MiB
