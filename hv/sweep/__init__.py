"""Sweeps: grids of `hv replay` / `hv boot` runs over inputs and option values.

    spec.py      the SPEC (TOML): inputs, [axes], the points they make
    worker.py    one point on a worker: Task, run_task (runs the CLI's runner)
    local.py     LocalExecutor: worker processes on this machine
    rayexec.py   RayExecutor: Ray tasks, inputs shipped by content
    results.py   results.jsonl / results.csv, written as points finish; --resume
    run.py       run_sweep: the points not yet done, rows as they come, progress
    plot.py      --plot

The command (`hv sweep`) is hv/cli/sweep.py; it hands the executors its
point runner.  Imports hv.errors only (Ray and matplotlib lazily, where
asked for); never hv.cli.
"""
from .local import LocalExecutor, default_jobs
from .results import Results, make_row, row_failed
from .run import run_sweep, task_for
from .spec import Input, Point, Spec, expand, load_spec, parse_spec, point_key
from .worker import Task, run_task

__all__ = ["LocalExecutor", "default_jobs", "Results", "make_row", "row_failed", "run_sweep",
           "task_for", "Input", "Point", "Spec", "expand", "load_spec", "parse_spec",
           "point_key", "Task", "run_task"]
