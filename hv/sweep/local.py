"""The local executor: a pool of worker processes on this machine.

Why not concurrent.futures or multiprocessing.Pool: a point whose worker
dies (a crash in C code, the OOM killer) must become that point's failed
row while the sweep goes on, and Ctrl-C must end every worker at once.
ProcessPoolExecutor fails every running point when one worker dies and has
no public way to end its workers; Pool loses the task and waits forever.
So each worker here is a ``multiprocessing`` process (spawned, not forked:
the parent may have threads) with its own pipe: the parent knows which
point each one runs, sees it die through its sentinel, and starts another.

Workers ignore SIGINT (a Ctrl-C at the terminal reaches the whole process
group); the parent, on KeyboardInterrupt, terminates them and re-raises.
The input files are read where they are: the workers share this machine.
"""
import multiprocessing as mp
import os
import signal
from collections import deque
from multiprocessing.connection import wait

from .worker import failed_result, run_task

__all__ = ["LocalExecutor", "default_jobs"]


def default_jobs():
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:      # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _worker_main(conn, runner):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(run_task(runner, task))


class _Worker:
    __slots__ = ("proc", "conn", "task")

    def __init__(self, ctx, runner):
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, runner), daemon=True,
                                name="hv-sweep-worker")
        self.proc.start()
        child.close()
        self.conn = parent
        self.task = None


def _death(exitcode):
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker process died ({name}) while running this point"
    return f"worker process died (exit code {exitcode}) while running this point"


class LocalExecutor:
    """Run tasks on ``jobs`` worker processes (default: the CPUs this
    process may run on)."""
    name = "local"

    def __init__(self, jobs=None):
        if jobs is not None and jobs < 1:
            raise ValueError("jobs must be >= 1")
        self.jobs = jobs or default_jobs()

    def describe(self):
        return {"executor": "local", "jobs": self.jobs}

    def start(self):
        """Nothing to set up: workers start with the first points."""

    def close(self):
        """Nothing left running between runs."""

    def run(self, tasks, runner, on_result):
        """Run every task; ``on_result(task, result)`` is called in this
        thread as each finishes (result: see worker.run_task)."""
        ctx = mp.get_context("spawn")
        pending = deque(tasks)
        jobs = min(self.jobs, len(pending)) or 1
        idle, busy = [], []
        ok = False
        try:
            while pending or busy:
                while pending and len(busy) < jobs:
                    w = idle.pop() if idle else _Worker(ctx, runner)
                    w.task = pending.popleft()
                    try:
                        w.conn.send(w.task)
                    except (BrokenPipeError, OSError):
                        # it died idle: put the task back, start another
                        pending.appendleft(w.task)
                        self._stop(w, force=True)
                        continue
                    busy.append(w)
                wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
                for w in list(busy):
                    res = None
                    if w.conn.poll():
                        try:
                            res = w.conn.recv()
                        except (EOFError, OSError):
                            res = None
                    if res is None and w.proc.is_alive():
                        continue
                    busy.remove(w)
                    task, w.task = w.task, None
                    if res is None:
                        w.proc.join(1)
                        res = failed_result(_death(w.proc.exitcode))
                        self._stop(w, force=True)
                    else:
                        idle.append(w)
                    on_result(task, res)
            ok = True
        finally:
            for w in idle + busy:
                self._stop(w, force=not ok)

    @staticmethod
    def _stop(w, force):
        if not force:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(5)
        if w.proc.is_alive():
            w.proc.terminate()
            w.proc.join(1)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        w.conn.close()
