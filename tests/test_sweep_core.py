"""hv.sweep without the command line: SPEC parsing, points, results files,
and the executors (local processes and Ray) with the test runners of
tests/sweep_runners.py."""
import csv
import hashlib
import itertools
import json
import os
import sys

import pytest

from hv.errors import BadInput
from hv.sweep import (LocalExecutor, Results, expand, load_spec, make_row, parse_spec,
                      run_sweep, task_for)
from hv.sweep.spec import option_args, point_key

import sweep_runners

TESTS = os.path.dirname(os.path.abspath(__file__))


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path


def _all(command, option):
    return True


@pytest.fixture
def corpus(tmp_path):
    """Three small input files in tmp/corpus/, different contents."""
    for i, name in enumerate(["b.csv", "a.csv", "c.lackey"]):
        _write(str(tmp_path / "corpus" / name), f"access,gpa\nr,{0x1000 * (i + 1)}\n" * (i + 1))
    return tmp_path


# --------------------------------------------------------------------- SPEC

def test_spec_globs_are_relative_to_the_spec_folder_and_sorted(corpus, tmp_path, monkeypatch):
    _write(str(tmp_path / "specs" / "s.toml"),
           'inputs = ["../corpus/*.csv", "../corpus/c.lackey", "guest:memtouch"]\n'
           '[axes]\nintegrity = ["full", "merkle"]\nfault-around = [1, 16]\n')
    monkeypatch.chdir("/")
    spec = load_spec(str(tmp_path / "specs" / "s.toml"))
    labels = [i.label for i in spec.inputs]
    assert labels == ["../corpus/a.csv", "../corpus/b.csv", "../corpus/c.lackey", "guest:memtouch"]
    assert [i.command for i in spec.inputs] == ["replay"] * 3 + ["boot"]
    assert spec.inputs[0].path == str(tmp_path / "corpus" / "a.csv")
    assert spec.inputs[3].path is None and spec.inputs[3].guest == "memtouch"
    assert spec.axes == {"integrity": ["full", "merkle"], "fault-around": [1, 16]}


def test_an_elf_input_is_booted(tmp_path):
    _write(str(tmp_path / "k.elf"), b"\x7fELF\x02\x01\x01" + bytes(60))
    _write(str(tmp_path / "t.csv"), "access,gpa\nr,0\n")
    spec = parse_spec('inputs = ["*"]', str(tmp_path / "s.toml"))
    assert {i.label: i.command for i in spec.inputs} == {"k.elf": "boot", "t.csv": "replay"}


def test_the_same_file_twice_is_one_input(corpus):
    spec = parse_spec('inputs = ["corpus/a.csv", "corpus/*.csv"]', str(corpus / "s.toml"))
    assert [i.label for i in spec.inputs] == ["corpus/a.csv", "corpus/b.csv"]


@pytest.mark.parametrize("text, words", [
    ("inputs = [", "not valid TOML"),
    ("[axes]\nx = [1]", "no inputs"),
    ("inputs = []", "non-empty list"),
    ("inputs = [1]", "non-empty list"),
    ('inputs = ["corpus/*.nothing"]', "matches no file"),
    ('inputs = ["corpus/missing.csv"]', "no such file"),
    ('inputs = ["corpus"]', "is a directory"),
    ('inputs = ["guest:"]', "no guest name"),
    ('inputs = ["corpus/a.csv"]\noptions = 1', "unknown key 'options'"),
    ('inputs = ["corpus/a.csv"]\naxes = 3', "axes must be a table"),
    ('inputs = ["corpus/a.csv"]\n[axes]\nfault-around = []', "no values"),
    ('inputs = ["corpus/a.csv"]\n[axes]\nfault-around = [1, 1]', "value 1 given twice"),
    ('inputs = ["corpus/a.csv"]\n[axes]\n"--huge" = [true]', "not an option name"),
    ('inputs = ["corpus/a.csv"]\n[axes]\nhuge = [[1]]', "not a string, number or boolean"),
])
def test_bad_spec_is_one_line_of_bad_input(corpus, text, words):
    with pytest.raises(BadInput) as ei:
        parse_spec(text, str(corpus / "s.toml"))
    msg = str(ei.value)
    assert words in msg and "\n" not in msg and str(corpus / "s.toml") in msg


def test_unreadable_spec_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="cannot read sweep spec"):
        load_spec(str(tmp_path / "nope.toml"))
    _write(str(tmp_path / "bin.toml"), b"\xff\xfe\x00")
    with pytest.raises(BadInput, match="not UTF-8"):
        load_spec(str(tmp_path / "bin.toml"))


# ------------------------------------------------------------------- points

def test_points_are_the_product_of_the_axes_per_input(corpus):
    spec = parse_spec('inputs = ["corpus/*"]\n[axes]\na = [1, 2, 3]\nb = ["x", "y"]\nc = [true]',
                      str(corpus / "s.toml"))
    points = expand(spec, _all)
    assert len(points) == 3 * 3 * 2 * 1
    want = [(i.label, {"a": a, "b": b, "c": True}) for i in spec.inputs
            for a, b in itertools.product([1, 2, 3], ["x", "y"])]
    assert [(p.input.label, p.axes) for p in points] == want
    assert len({p.key for p in points}) == len(points)


def test_an_axis_only_some_commands_take_is_left_out_of_the_others(corpus):
    _write(str(corpus / "corpus" / "g.elf"), b"\x7fELF" + bytes(60))
    spec = parse_spec('inputs = ["corpus/a.csv", "corpus/g.elf"]\n'
                      '[axes]\nfault-around = [1, 16]\nintegrity = ["full", "merkle"]',
                      str(corpus / "s.toml"))
    points = expand(spec, lambda cmd, opt: not (cmd == "boot" and opt == "fault-around"))
    assert [(p.input.label, p.axes) for p in points] == [
        ("corpus/a.csv", {"fault-around": 1, "integrity": "full"}),
        ("corpus/a.csv", {"fault-around": 1, "integrity": "merkle"}),
        ("corpus/a.csv", {"fault-around": 16, "integrity": "full"}),
        ("corpus/a.csv", {"fault-around": 16, "integrity": "merkle"}),
        ("corpus/g.elf", {"integrity": "full"}),
        ("corpus/g.elf", {"integrity": "merkle"}),
    ]
    with pytest.raises(BadInput, match="fault-around: not an option of hv boot or hv replay"):
        expand(spec, lambda cmd, opt: opt != "fault-around")


def test_options_and_point_names():
    axes = {"integrity": "full", "fault-around": -4, "huge": True, "accel": False}
    assert option_args(axes) == ["--integrity=full", "--fault-around=-4", "--huge"]
    # the name does not depend on the order of the axes in the SPEC
    assert point_key("t.gz", axes) == point_key("t.gz", dict(reversed(list(axes.items()))))
    assert point_key("t.gz", axes) == \
        "t.gz --accel=false --fault-around=-4 --huge=true --integrity=full"


# ------------------------------------------------------------------ results

def _fake_point(corpus, **axes):
    spec = parse_spec('inputs = ["corpus/a.csv"]', str(corpus / "s.toml"))
    from hv.sweep.spec import Point
    return Point(spec.inputs[0], axes)


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_are_in_both_files_as_each_row_arrives(corpus, tmp_path):
    out = tmp_path / "out"
    res = Results(out, axes=["x"])
    p1, p2 = _fake_point(corpus, x=1), _fake_point(corpus, x=2)
    res.add(make_row(p1, {"exit_code": 0, "report": {"npf": 5, "d": {"k": [1]}}, "wall_s": 0.5,
                          "host": "h"}))
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(ln)["npf"] for ln in lines] == [5]
    assert _csv_rows(out / "results.csv")[0]["npf"] == "5"
    # a row with a new column widens the CSV's header; the old row keeps its values
    res.add(make_row(p2, {"exit_code": 1, "report": {"npf": 6, "stopped": None, "ok": False},
                          "wall_s": 0.25, "host": "h"}))
    res.close()
    rows = _csv_rows(out / "results.csv")
    assert list(rows[0])[:5] == ["point", "input", "command", "x", "exit_code"]
    assert [(r["x"], r["npf"], r["exit_code"], r["ok"], r["d"]) for r in rows] == \
        [("1", "5", "0", "", '{"k":[1]}'), ("2", "6", "1", "false", "")]
    assert [json.loads(ln)["point"] for ln in (out / "results.jsonl").read_text().splitlines()] \
        == [p1.key, p2.key]


def test_results_refuse_an_existing_sweep_without_resume(corpus, tmp_path):
    out = tmp_path / "out"
    with Results(out) as res:
        res.add(make_row(_fake_point(corpus, x=1), {"exit_code": 0, "report": {"npf": 1}}))
    before = (out / "results.jsonl").read_bytes()
    with pytest.raises(BadInput, match="already holds a sweep's results.jsonl: --resume"):
        Results(out)
    assert (out / "results.jsonl").read_bytes() == before
    # an empty one (a sweep that wrote no row) is no sweep to keep
    _write(str(tmp_path / "empty" / "results.jsonl"), "")
    Results(tmp_path / "empty").close()
    _write(str(tmp_path / "file"), "x")
    with pytest.raises(BadInput, match="not a directory"):
        Results(tmp_path / "file")


def test_resume_keeps_good_rows_and_drops_failed_and_cut_rows(corpus, tmp_path):
    out = tmp_path / "out"
    pts = [_fake_point(corpus, x=i) for i in range(4)]
    with Results(out) as res:
        res.add(make_row(pts[0], {"exit_code": 0, "report": {"npf": 1}}))
        res.add(make_row(pts[1], {"exit_code": 1, "report": {}, "error": "boom"}))
        res.add(make_row(pts[2], {"exit_code": 0, "report": {"npf": 3}}))
    with open(out / "results.jsonl", "a") as f:
        f.write('{"point": "' + pts[3].key + '", "np')        # a kill in mid-row
    res = Results(out, resume=True)
    assert list(res.rows) == [pts[0].key, pts[2].key]
    res.close()
    assert [json.loads(ln)["point"] for ln in (out / "results.jsonl").read_text().splitlines()] \
        == [pts[0].key, pts[2].key]
    assert [r["point"] for r in _csv_rows(out / "results.csv")] == [pts[0].key, pts[2].key]
    with open(out / "results.jsonl", "a") as f:
        f.write("not json\n")
    with pytest.raises(BadInput, match=r"results.jsonl:3: not a results row"):
        Results(out, resume=True)


# ---------------------------------------------------------------- executors

def _spec_points(corpus, axes_toml):
    spec = parse_spec('inputs = ["corpus/*"]\n[axes]\n' + axes_toml, str(corpus / "s.toml"))
    return spec, expand(spec, _all)


def _expected(point):
    """What sweep_runners.echo reports, computed from the input file itself."""
    with open(point.input.path, "rb") as f:
        data = f.read()
    return {"sha256": hashlib.sha256(data).hexdigest(),
            "npf": len(data) * int(point.axes.get("mult", 1)) + (7 if point.axes.get("flag") else 0)}


def test_local_executor_runs_every_point_on_worker_processes(corpus, tmp_path):
    spec, points = _spec_points(corpus, "mult = [1, 3]\nflag = [true, false]")
    with Results(tmp_path / "out", axes=list(spec.axes)) as res:
        summary = run_sweep(points, res, LocalExecutor(jobs=2), sweep_runners.echo, progress=False)
    assert (summary["ran"], summary["skipped"], summary["failed"]) == (12, 0, 0)
    assert [r["point"] for r in summary["rows"]] == [p.key for p in points]
    for p, row in zip(points, summary["rows"]):
        assert {k: row[k] for k in ("sha256", "npf")} == _expected(p)
        assert row["path"] == p.input.path          # local workers read the file in place
        assert row["dir"] == os.path.dirname(p.input.path)
        assert row["mult"] == p.axes["mult"] and row["flag"] == p.axes["flag"]
        assert row["exit_code"] == 0 and row["host"] and row["wall_s"] >= 0
    pids = {r["pid"] for r in summary["rows"]}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_a_failing_point_is_a_row_and_the_sweep_goes_on(corpus, tmp_path):
    spec, points = _spec_points(corpus, 'mode = ["ok", "boom", "bad", "crash"]')
    with Results(tmp_path / "out", axes=["mode"]) as res:
        summary = run_sweep(points, res, LocalExecutor(jobs=2), sweep_runners.echo, progress=False)
    assert (summary["ran"], summary["skipped"], summary["failed"]) == (12, 0, 9)
    by_mode = {}
    for row in summary["rows"]:
        by_mode.setdefault(row["mode"], []).append(row)
    assert all("error" not in r and r["sha256"] for r in by_mode["ok"])
    assert all(r["error"] == "internal error: RuntimeError: boom second line"
               and r["exit_code"] == 1 for r in by_mode["boom"])
    assert all(r["error"].endswith("bad input") and r["exit_code"] == 2 for r in by_mode["bad"])
    assert all(r["error"] == "worker process died (SIGKILL) while running this point"
               for r in by_mode["crash"])
    # every row is in the file too, once
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(ln)["point"] for ln in lines) == sorted(p.key for p in points)


def test_resume_runs_only_the_points_without_a_good_row(corpus, tmp_path):
    spec, points = _spec_points(corpus, "mult = [1, 2]\nflag = [true, false]")
    out = tmp_path / "out"
    with Results(out, axes=list(spec.axes)) as res:
        first = run_sweep(points, res, LocalExecutor(jobs=2), sweep_runners.echo, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = lines[::2]
    (out / "results.jsonl").write_text("".join(ln + "\n" for ln in kept))
    with Results(out, resume=True, axes=list(spec.axes)) as res:
        again = run_sweep(points, res, LocalExecutor(jobs=2), sweep_runners.echo, progress=False)
    assert (again["ran"], again["skipped"], again["failed"]) == (6, 6, 0)
    strip = ("wall_s", "host", "pid", "dir")
    assert [{k: v for k, v in r.items() if k not in strip} for r in again["rows"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in first["rows"]]
    assert len((out / "results.jsonl").read_text().splitlines()) == 12


def test_task_names_the_file_and_options(corpus):
    spec, points = _spec_points(corpus, "mult = [2]\nflag = [false]")
    t = task_for(points[0])
    assert t.argv() == ["replay", points[0].input.path, "--mult=2"]
    assert t.argv("/elsewhere") == ["replay", "/elsewhere", "--mult=2"]


def test_ray_executor_ships_content_and_gives_the_local_rows(corpus, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from hv.sweep.rayexec import RayExecutor
    # the Ray workers import the test runners by name, as they would hv's
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    spec, points = _spec_points(corpus, "mult = [1, 3]\nflag = [true, false]")
    with Results(tmp_path / "local", axes=list(spec.axes)) as res:
        local = run_sweep(points, res, LocalExecutor(jobs=2), sweep_runners.echo, progress=False)
    ex = RayExecutor("local", jobs=2)
    with Results(tmp_path / "ray", axes=list(spec.axes)) as res:
        summary = run_sweep(points, res, ex, sweep_runners.echo, progress=False)
    assert not ex.ray.is_initialized()          # the Ray it started is stopped
    assert (summary["ran"], summary["skipped"], summary["failed"]) == (12, 0, 0)
    assert summary["executor"] == "ray"
    for p, row, lrow in zip(points, summary["rows"], local["rows"]):
        assert row["point"] == p.key
        assert {k: row[k] for k in ("sha256", "npf")} == _expected(p)
        # it read a copy made on the worker from the shipped bytes, in a
        # folder of its own; the row names the input as this machine knows it
        assert os.path.basename(row["dir"]).startswith("hv-sweep-")
        assert row["dir"] != os.path.dirname(p.input.path)
        assert row["path"] == p.input.path and row["size"] == os.path.getsize(p.input.path)
        strip = ("wall_s", "host", "pid", "dir")
        assert {k: v for k, v in row.items() if k not in strip} == \
            {k: v for k, v in lrow.items() if k not in strip}
    assert os.getpid() not in {r["pid"] for r in summary["rows"]}


def test_progress_bar_counts_points_and_failures():
    from hv.sweep.run import SweepProgress
    from rich.progress import TimeRemainingColumn
    with SweepProgress(5, enabled=True) as bar:
        prog = bar._prog
        assert any(isinstance(c, TimeRemainingColumn) for c in prog.columns)    # the ETA
        bar.advance()
        bar.advance(failed=True)
        task = prog.tasks[0]
        assert (task.completed, task.total) == (2, 5)
        assert task.description == "sweep (1 failed)"
    assert SweepProgress(5, enabled=False)._prog is None


def test_a_local_ray_stays_on_the_loopback_address():
    """The Ray `--ray-address local` starts talks over 127.0.0.1 only (Ray's
    default is the machine's network address)."""
    pytest.importorskip("ray")
    from hv.sweep.rayexec import RayExecutor
    ex = RayExecutor("local", jobs=1)
    ex.start()
    try:
        nodes = ex.ray.nodes()
        assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
        assert ex.ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        ex.close()
    assert not ex.ray.is_initialized()
