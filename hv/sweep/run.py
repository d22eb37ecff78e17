"""Run a sweep: the points not yet in the results, on an executor, each row
recorded as it finishes, with a progress bar (on a terminal)."""
import sys
import time

from .results import make_row, row_failed
from .worker import Task

__all__ = ["run_sweep", "task_for", "SweepProgress"]


def task_for(point):
    """The task of a point whose input has a file (a bundled guest's image
    is built, and its path set, before the sweep runs)."""
    if point.input.path is None:
        raise ValueError(f"input {point.input.label} has no file yet")
    return Task(point.key, point.input.command, point.input.path, tuple(point.options))


class SweepProgress:
    """A progress bar with the ETA on stderr, when stderr is a terminal."""

    def __init__(self, total, enabled=None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._prog = None
        self.failed = 0
        if enabled and total:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._prog = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=Console(stderr=True),
                                  transient=True)
            self._task = self._prog.add_task("sweep", total=total)

    def __enter__(self):
        if self._prog:
            self._prog.start()
        return self

    def advance(self, failed=False):
        if failed:
            self.failed += 1
        if self._prog:
            desc = f"sweep ({self.failed} failed)" if self.failed else "sweep"
            self._prog.update(self._task, advance=1, description=desc)

    def __exit__(self, *exc):
        if self._prog:
            self._prog.stop()


def run_sweep(points, results, executor, runner, progress=None):
    """Run the ``points`` (spec.Point, inputs with files) that have no row
    in ``results`` yet on ``executor`` with ``runner``.  Returns
    ``{"rows", "ran", "skipped", "failed", "points", "out", "wall_s", ...}``:
    ``rows`` holds every point's row in the SPEC's order (those run now and
    those found in the results), ``ran`` counts the points run now (failed
    ones included), ``skipped`` those whose row was already there, and
    ``failed`` the points run now that produced no report (their row has an
    ``error``).  ``progress``: show the bar (default: when stderr is a
    terminal).  A KeyboardInterrupt leaves every finished row in the files."""
    by_key = {p.key: p for p in points}
    todo = [p for p in points if p.key not in results.rows]
    counts = {"ran": 0, "failed": 0}
    t0 = time.perf_counter()

    with SweepProgress(len(todo), progress) as bar:
        def on_result(task, result):
            row = make_row(by_key[task.key], result)
            results.add(row)
            counts["ran"] += 1
            failed = row_failed(row)
            counts["failed"] += failed
            bar.advance(failed)

        if todo:
            executor.run([task_for(p) for p in todo], runner, on_result)
    return {
        "rows": [results.rows[p.key] for p in points if p.key in results.rows],
        "ran": counts["ran"],
        "skipped": len(points) - len(todo),
        "failed": counts["failed"],
        "points": len(points),
        "out": results.dir,
        "wall_s": round(time.perf_counter() - t0, 3),
        **executor.describe(),
    }
