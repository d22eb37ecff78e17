"""What runs on a worker: one point, through the command line's own runner.

A *runner* is a module-level function ``runner(argv) -> (exit_code, report)``
that runs ``hv COMMAND ...`` exactly as the command line does and returns its
exit code and the JSON object ``--json`` would print (the CLI passes
``hv.cli.sweep.run_point``; this package never imports the CLI).
:func:`run_task` times it and names the host; the executors call it in
their workers.
"""
import os
import socket
import tempfile
import time
from dataclasses import dataclass

__all__ = ["Task", "run_task", "run_task_on_content", "failed_result"]


@dataclass(frozen=True)
class Task:
    """One point to run: ``hv COMMAND PATH OPTIONS...``.  ``key`` names the
    point in the results; ``path`` is the input file on the machine that
    made the task (executors whose workers cannot see it ship its content)."""
    key: str
    command: str
    path: str
    options: tuple

    def argv(self, path=None):
        return [self.command, self.path if path is None else path, *self.options]


def failed_result(error, exit_code=1, wall_s=None, host=None):
    """The result of a point that produced no report of its own."""
    return {"exit_code": exit_code, "report": {}, "error": error, "wall_s": wall_s,
            "host": host}


def run_task(runner, task, path=None):
    """Run ``task`` with ``runner`` (on ``path``, a copy of the input, when
    given) -> ``{"exit_code", "report", "wall_s", "host"}`` and ``"error"``
    when the point produced no report of its own (the runner's report says
    ``error``, or the runner raised)."""
    host = socket.gethostname()
    t0 = time.perf_counter()
    try:
        code, report = runner(task.argv(path))
    except Exception as e:     # noqa: BLE001 - a point that fails is a row, not the end
        msg = " ".join(f"{type(e).__name__}: {e}".splitlines())
        return failed_result(f"internal error: {msg}", 1, time.perf_counter() - t0, host)
    wall = time.perf_counter() - t0
    report = dict(report or {})
    if path is not None and path != task.path:
        # the report names the input file as the machine that made the task
        # knows it, not as the worker's copy
        for k, v in report.items():
            if v == path:
                report[k] = task.path
    res = {"exit_code": code, "report": report, "wall_s": wall, "host": host}
    if report.get("error"):
        res["error"] = str(report["error"])
    return res


def run_task_on_content(runner, task, data):
    """run_task on a private copy of the input, written from ``data`` (its
    bytes) under the input's file name (so a name-dependent reader sees the
    same name) in a temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="hv-sweep-") as d:
        copy = os.path.join(d, os.path.basename(task.path) or "input")
        with open(copy, "wb") as f:
            f.write(data)
        return run_task(runner, task, copy)
