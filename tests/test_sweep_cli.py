"""`hv sweep` end to end: the Must-show of issue 16 (3 traces x 2 integrity
modes x 2 fault-around values = 12 rows; the same rows on Ray; --resume after
6 rows are removed), rows equal to what `hv replay` / `hv boot` print, failed
points as rows, bad SPECs, Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hv.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("elapsed_s", "accesses_per_s", "insns_per_s", "wall_s", "host")

# three traces, each touching a known set of pages (no access straddles a page)
PAGE_SETS = {
    "a.csv": [0x10, 0x11, 0x12, 0x30, 0x31, 0x200],
    "b.csv": list(range(0x100, 0x140)) + [0x7000],
    "c.csv": [0x5, 0x25, 0x45, 0x65, 0x85, 0xA5, 0xC5],
}


def _write_traces(folder):
    os.makedirs(folder, exist_ok=True)
    for name, pages in PAGE_SETS.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write("access,gpa,size\n")
            for i, p in enumerate(pages):
                # each page read, written, read again, at offsets inside the page
                for acc, off in (("r", 0x10), ("w", 0x800), ("r", 0xFF0)):
                    f.write(f"{acc},{hex((p << 12) + off + (i % 8))},4\n")


def _expected_npf(pages, fault_around):
    """From the definition of fault-around: a fault maps the aligned block of
    N pages around the faulting page, so each distinct block faults once and
    maps N pages."""
    blocks = {p // fault_around for p in pages}
    return len(blocks), len(blocks) * fault_around


@pytest.fixture
def spec(tmp_path):
    _write_traces(str(tmp_path / "traces"))
    path = tmp_path / "spec.toml"
    path.write_text('inputs = ["traces/*.csv"]\n'
                    '[axes]\nintegrity = ["full", "merkle"]\nfault-around = [1, 16]\n')
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _sweep_json(capsys, *argv):
    code, out, err = _run(capsys, "sweep", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f]


def test_must_show_12_rows_local_and_ray_and_resume(spec, tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    res = _sweep_json(capsys, spec, "--out", out)
    assert (res["ran"], res["skipped"], res["failed"]) == (12, 0, 0)
    rows = res["rows"]
    assert len(rows) == 12
    seen = set()
    for row in rows:
        name = os.path.basename(row["input"])
        seen.add((name, row["integrity"], row["fault-around"]))
        assert row["input"] == f"traces/{name}" and row["command"] == "replay"
        # the replay JSON's keys are all there
        for key in ("trace", "format", "accesses", "npf", "pages_mapped", "psp_commands",
                    "refused", "tamper_detected", "digest", "backend", "psp", "elapsed_s"):
            assert key in row, key
        assert (row["npf"], row["pages_mapped"]) == \
            _expected_npf(PAGE_SETS[name], row["fault-around"])
        assert row["accesses"] == 3 * len(PAGE_SETS[name]) and row["exit_code"] == 0
        assert row["tamper_detected"] is False and len(row["digest"]) == 64
    assert seen == {(n, i, f) for n in PAGE_SETS for i in ("full", "merkle") for f in (1, 16)}
    # the digests differ by integrity mode and table, as they should
    assert len({r["digest"] for r in rows}) == 12
    assert len(_jsonl(out / "results.jsonl")) == 12

    # one code path: each row holds what `hv replay ... --json` prints
    for row in rows[:4]:
        code, text, _ = _run(capsys, "replay", row["trace"], "--integrity", row["integrity"],
                             "--fault-around", row["fault-around"], "--json")
        direct = json.loads(text)
        assert code == row["exit_code"] == 0
        for k, v in direct.items():
            if k not in TIMING:
                assert row[k] == v, k

    # Ray, with a local instance started for the run: the same rows
    ray_res = _sweep_json(capsys, spec, "--out", tmp_path / "ray", "--executor", "ray",
                          "--ray-address", "local", "-j", "2")
    assert (ray_res["ran"], ray_res["skipped"], ray_res["failed"]) == (12, 0, 0)
    assert ray_res["executor"] == "ray"
    key = ("point", "npf", "pages_mapped", "digest")
    assert [tuple(r[k] for k in key) for r in ray_res["rows"]] == \
        [tuple(r[k] for k in key) for r in rows]
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert [strip(r) for r in ray_res["rows"]] == [strip(r) for r in rows]

    # 6 rows removed from results.jsonl: --resume runs those 6
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("".join(ln + "\n" for ln in lines[1::2]))
    again = _sweep_json(capsys, spec, "--out", out, "--resume")
    assert (again["ran"], again["skipped"], again["failed"]) == (6, 6, 0)
    assert [strip(r) for r in again["rows"]] == [strip(r) for r in rows]
    assert sorted(r["point"] for r in _jsonl(out / "results.jsonl")) == \
        sorted(r["point"] for r in rows)
    # and nothing left to do
    done = _sweep_json(capsys, spec, "--out", out, "--resume")
    assert (done["ran"], done["skipped"], done["failed"]) == (0, 12, 0)


def test_a_sweep_over_a_guest_and_a_trace(tmp_path, capsys):
    _write_traces(str(tmp_path / "traces"))
    path = tmp_path / "mixed.toml"
    path.write_text('inputs = ["traces/a.csv", "guest:hello"]\n'
                    '[axes]\nintegrity = ["full", "merkle"]\nfault-around = [1, 4]\n')
    res = _sweep_json(capsys, path, "--out", tmp_path / "o", "-j", "2")
    # fault-around is not an option of hv boot: the guest's points do not vary it
    assert [(r["input"], r["integrity"], r.get("fault-around")) for r in res["rows"]] == [
        ("traces/a.csv", "full", 1), ("traces/a.csv", "full", 4),
        ("traces/a.csv", "merkle", 1), ("traces/a.csv", "merkle", 4),
        ("guest:hello", "full", None), ("guest:hello", "merkle", None)]
    boots = [r for r in res["rows"] if r["command"] == "boot"]
    code, text, _ = _run(capsys, "boot", boots[0]["image"], "--integrity", "full", "--json")
    direct = json.loads(text)
    assert code == boots[0]["exit_code"] == 0
    for k, v in direct.items():
        if k not in TIMING:
            assert boots[0][k] == v, k
    assert "hello" in boots[0]["serial"].lower()
    # the CSV leaves the guest's fault-around empty
    import csv
    with open(tmp_path / "o" / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["fault-around"] for r in csv_rows if r["command"] == "boot"] == ["", ""]


def test_a_failing_point_is_a_row_and_exit_1(spec, tmp_path, capsys):
    (tmp_path / "traces" / "d.csv").write_text("access,gpa\nq,0x1000\n")
    code, out, err = _run(capsys, "sweep", spec, "--out", tmp_path / "o", "--json")
    assert code == 1
    res = json.loads(out)
    assert (res["ran"], res["failed"]) == (16, 4)
    bad = [r for r in res["rows"] if r.get("error")]
    assert {r["input"] for r in bad} == {"traces/d.csv"}
    assert all(r["exit_code"] == 2 and "d.csv:2:" in r["error"] for r in bad)
    assert "Traceback" not in err
    # --resume runs the failed points again (and only those)
    again = _sweep_json_rc(capsys, 1, spec, "--out", tmp_path / "o", "--resume")
    assert (again["ran"], again["skipped"], again["failed"]) == (4, 12, 4)


def _sweep_json_rc(capsys, want, *argv):
    code, out, err = _run(capsys, "sweep", *argv, "--json")
    assert code == want, err
    return json.loads(out)


@pytest.mark.parametrize("axes, words", [
    ('integrity = ["fast"]', "point traces/a.csv --integrity=fast: hv replay: argument "
                             "--integrity: invalid choice"),
    ('save = ["x.json"]', "[axes] save: not an option of hv replay that a sweep can vary"),
    ('no-such = [1]', "[axes] no-such: not an option"),
    ('huge = [1]', "--huge=1: hv replay: argument --huge: ignored explicit argument '1'"),
])
def test_a_point_the_command_refuses_is_exit_2_before_anything_runs(spec, tmp_path, capsys,
                                                                     axes, words):
    spec.write_text('inputs = ["traces/*.csv"]\n[axes]\n' + axes + "\n")
    code, out, err = _run(capsys, "sweep", spec, "--out", tmp_path / "o")
    assert code == 2 and out == ""
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_sweep_usage_is_exit_2(spec, tmp_path, capsys, monkeypatch):
    cases = [
        (["--executor", "local", "--ray-address", "x"], "--ray-address needs --executor ray"),
        (["-j", "0"], "must be at least 1"),
    ]
    for extra, words in cases:
        code, out, err = _run(capsys, "sweep", spec, "--out", tmp_path / "o", *extra)
        assert code == 2 and words in err, err
    spec.write_text('inputs = ["guest:no_such_guest"]\n')
    code, out, err = _run(capsys, "sweep", spec, "--out", tmp_path / "o")
    assert code == 2 and "no bundled guest named 'no_such_guest'" in err
    # without Ray installed: exit 2 with the install hint, nothing written
    spec.write_text('inputs = ["traces/*.csv"]\n')
    monkeypatch.setitem(sys.modules, "ray", None)
    code, out, err = _run(capsys, "sweep", spec, "--out", tmp_path / "o", "--executor", "ray")
    assert code == 2 and "pip install 'hv[cluster]'" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_existing_results_are_never_overwritten(spec, tmp_path, capsys):
    out = tmp_path / "o"
    _sweep_json(capsys, spec, "--out", out)
    before = (out / "results.jsonl").read_bytes()
    code, _, err = _run(capsys, "sweep", spec, "--out", out)
    assert code == 2 and "--resume" in err
    assert (out / "results.jsonl").read_bytes() == before


def test_plot_and_summary(spec, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "o"
    code, text, err = _run(capsys, "sweep", spec, "--out", out, "--plot")
    assert code == 0, err
    assert "12 points: ran 12 (0 failed), skipped 0" in text
    png = out / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table's npf column holds the rows' values
    lines = text.splitlines()
    head = lines[0].split()
    assert head[:3] == ["input", "integrity", "fault-around"] and "npf" in head
    first = lines[1].split()
    assert first[0] == "traces/a.csv" and int(first[head.index("npf")]) == \
        _expected_npf(PAGE_SETS["a.csv"], int(first[2]))[0]


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_ctrl_c_exits_130_and_keeps_the_finished_rows(tmp_path, executor):
    """Three quick points and one slow one (integrity full over 8000 pages
    spread over many tables); SIGINT once the quick rows are in."""
    if executor == "ray":
        pytest.importorskip("ray")
    tr = tmp_path / "traces"
    _write_traces(str(tr))
    with open(tr / "z_slow.csv", "w") as f:
        f.write("access,gpa\n")
        for i in range(8000):
            f.write(f"r,{hex(i * 0x7000)}\n")
    spec = tmp_path / "spec.toml"
    spec.write_text('inputs = ["traces/a.csv", "traces/z_slow.csv"]\n'
                    '[axes]\nintegrity = ["merkle", "full"]\n')
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "hv", "sweep", str(spec), "--out", str(out), "-j", "2", "--json"]
    if executor == "ray":
        cmd += ["--ray-address", "local"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    jsonl = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    workers = _children(proc.pid)
    assert workers
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    err = stderr.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "--resume" in err
    # --json: the interrupt is the one JSON object on stdout (issue 13)
    report = json.loads(stdout)
    assert report["exit_code"] == 130 and report["exit_reason"] == "interrupted"
    print(f"Ctrl-C to exit ({executor}): {took:.2f} s")
    deadline = time.monotonic() + 10
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(w) for w in workers)
    rows = _jsonl(jsonl)
    assert sorted(r["input"] + " " + r["integrity"] for r in rows) == \
        ["traces/a.csv full", "traces/a.csv merkle", "traces/z_slow.csv merkle"]
    if executor == "ray":
        return                    # (resuming on Ray is the Must-show test's)
    # --resume runs the one left
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    res = json.loads(proc.stdout)
    assert (res["ran"], res["skipped"], res["failed"]) == (1, 3, 0)
    assert res["rows"][-1]["npf"] == 8000


def test_a_ray_cluster_that_cannot_be_reached_is_exit_2_and_writes_nothing(spec, tmp_path,
                                                                            capsys, monkeypatch):
    pytest.importorskip("ray")
    if os.path.exists("/tmp/ray/ray_current_cluster"):
        pytest.skip("a Ray cluster runs on this machine: auto would find it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out, err = _run(capsys, "sweep", spec, "--out", tmp_path / "o", "--executor", "ray")
    assert code == 2 and out == ""
    assert "--ray-address auto: cannot start or reach Ray" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_ray_address_where_nothing_answers_is_exit_2_at_once(spec, tmp_path, capsys):
    pytest.importorskip("ray")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                     # nothing listens there now
    code, out, err = _run(capsys, "sweep", spec, "--out", tmp_path / "o",
                          "--ray-address", f"127.0.0.1:{port}")
    assert code == 2 and out == ""
    assert f"nothing answers at 127.0.0.1:{port}" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
