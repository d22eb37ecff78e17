"""What a user may rely on (issue 13): `hv --version`, JSON from every
command's --json (errors included), `hv attack --list` whole and as JSON,
tables that never split a word, raw() answering any object with a status,
absurd numbers in a snapshot, --backend c without the C extension, and
docs that stay inside the project."""
import json
import os
import re
import subprocess
import sys

import pytest

from hv.cli.main import main
from test_cli_badinput import assert_bad_input, hv, hv_many, one_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENV.pop("HV_DEBUG", None)


def _pyproject_version():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    return re.search(r'(?m)^version = "([^"]+)"', text).group(1)


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out == f"hv {_pyproject_version()}\n"
    import hv as hvpkg
    assert hvpkg.__version__ == _pyproject_version()


def test_every_command_answers_json_errors_too(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("access,gpa\nr,0x1000\n")
    snap = tmp_path / "nosnap.json"
    cases = [("replay", tmp_path / "missing.csv", "--json"),
             ("replay", t, "--json", "--fault-around", "x"),
             ("inspect", snap, "--json"),
             ("boot", tmp_path / "missing.elf", "--json"),
             ("attack", "no_such_scenario", "--json"),
             ("bench", "--json", "--only", "nosuchsection"),
             ("boot", "--json", "--mem", "1", "hello")]
    for argv, r in zip(cases, hv_many(cases)):
        assert_bad_input(r, where=" ".join(map(str, argv)))     # JSON checked there


def test_attack_list_json_and_text():
    rs = hv_many([("attack", "--list", "--json"), ("attack", "--list")])
    d = one_json(rs[0])
    from hv.attacks import SCENARIOS, load_guest_scenarios
    load_guest_scenarios("auto")
    assert [s["name"] for s in d["scenarios"]] == list(SCENARIOS)
    for s in d["scenarios"]:
        doc = " ".join(SCENARIOS[s["name"]].func.__doc__.strip().split("\n\n")[0].split())
        assert s["description"] == doc
        assert s["expected"] == SCENARIOS[s["name"]].expected_for(d["protect"])
    # the text table: every word of every description is there, unbroken
    text_words = set(rs[1].stdout.split())
    for s in d["scenarios"]:
        assert set(s["description"].split()) <= text_words, s["name"]
    # descriptions whose first docstring line ends mid-sentence are whole
    cut = [s for s in d["scenarios"] if not s["description"].endswith((".", ")"))]
    assert not cut, cut


def test_attack_table_never_breaks_words(capsys):
    from hv.attacks.registry import AttackResult
    from hv.cli.attack import _table
    statuses = ["fw_first_page:FIRMWARE_PAGE", "own_root:TABLE_PAGE", "refused:60",
                "x:RANGE_OVERFLOW"]
    results = [AttackResult("map_psp_memory", "refused", exposure_insns=0, statuses=statuses,
                            detail="d"),
               AttackResult("race_concurrent_commands", "refused", exposure_insns=0,
                            statuses=["refused:60"], detail="d")]
    for r in results:
        r.category, r.expected = "bad_hpa", "refused"
    _table(results)
    out = capsys.readouterr().out
    words = set(re.findall(r"[A-Za-z_0-9]+", out))
    assert {"FIRMWARE_PAGE", "TABLE_PAGE"} <= words          # whole, not FIRMWA|RE_PAGE
    assert "60 refused" in out and "+1 more" in out


# --------------------------------------------------------------------------
# raw(): any object in, a status out


@pytest.mark.parametrize("psp", ["inprocess", "process"])
def test_raw_answers_any_object(psp):
    from hv import Status, Vmm
    vmm = Vmm(host_mem=64 << 20, psp=psp)
    try:
        before = vmm.psp.commands, vmm.psp.refused
        bad_cmd = ["x", None, "2", 1.5, True, -1, 1 << 32, object(), [2]]
        for cmd in bad_cmd:
            assert vmm.psp.raw(cmd, b"") == (Status.INVALID_COMMAND, b""), cmd
        for buf in (None, "x", 5, 1.0, object()):
            assert vmm.psp.raw(int(Status.SUCCESS) + 2, buf) == (Status.INVALID_PARAM, b""), buf
        n = len(bad_cmd) + 5
        assert (vmm.psp.commands, vmm.psp.refused) == (before[0] + n, before[1] + n)
        # well-formed: any int-like command and bytes-like buffer reach the PSP
        from psp_firmware import Cmd
        st, out = vmm.psp.raw(Cmd.PLATFORM_STATUS, bytearray())
        assert st == Status.SUCCESS and len(out) > 0
        assert vmm.psp.raw(0x20, memoryview(b"\0" * 5))[0] == Status.INVALID_LENGTH
        assert vmm.psp.raw(0x7777, b"")[0] == Status.INVALID_COMMAND   # no such command
    finally:
        vmm.close()


# --------------------------------------------------------------------------
# snapshots with absurd numbers


@pytest.mark.parametrize("number", ["9" * 5000, "-" + "9" * 5000, "9" * 41, "NaN", "Infinity"])
def test_inspect_absurd_numbers(tmp_path, number):
    p = tmp_path / "snap.json"
    p.write_text('{"version": 1, "host_size": %s, "root": 0, "tables": []}' % number)
    for argv in (["inspect", p], ["inspect", p, "--json"]):
        r = hv(*argv)
        assert_bad_input(r, "snap.json", "malformed snapshot")


# --------------------------------------------------------------------------
# installed without a compiler: the C extension missing


def test_backend_c_without_the_extension(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("access,gpa\nr,0x1000\n")
    code = ("import sys\n"
            "sys.modules['nptcore._npt_c'] = None     # as if it was never built\n"
            "from hv.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")

    def run(*argv):
        return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=60)
    r = run("replay", t, "--host-mem", "64M", "--backend", "c", "--json")
    assert_bad_input(r, "the C extension is not built", "--backend python")
    r = run("replay", t, "--host-mem", "64M", "--json")       # the default falls back, says so
    assert r.returncode == 0 and json.loads(r.stdout)["backend"] == "python"
    assert "warning: the C extension is not built" in r.stderr


# --------------------------------------------------------------------------
# the docs a user reads stay inside the project


def test_user_docs_do_not_point_outside_the_project():
    docs = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "traces", "README.md")] + \
        [os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
         if f.endswith(".md")]
    for path in docs:
        text = open(path).read()
        assert "shared/DESIGN.md" not in text and "DESIGN.md" not in text, path
        for target in re.findall(r"\]\(([^)#]+)", text):       # markdown links
            if "://" in target:
                continue
            full = os.path.normpath(os.path.join(os.path.dirname(path), target))
            assert full.startswith(ROOT + os.sep), (path, target)
            assert os.path.exists(full), (path, target)


def test_docs_name_exit_codes_and_the_default_integrity_mode():
    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    for code in ("0", "1", "2", "3", "130"):
        assert re.search(rf"\| `{code}` \|", usage), code
    from psp_firmware import DEFAULT_INTEGRITY
    assert f"default `{DEFAULT_INTEGRITY}`" in usage
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "130" in readme and "docs/usage.md" in readme and "docs/formats.md" in readme
