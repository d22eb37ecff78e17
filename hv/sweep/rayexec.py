"""The Ray executor: each point one task of Ray's task API.

``address``: ``"local"`` starts a Ray instance on this machine for the run
(and stops it afterwards); anything else is handed to ``ray.init`` to join
an existing cluster (``auto``, ``HOST:PORT`` of the head's GCS, or any other
address ``ray.init`` takes).

What travels to a worker: the runner (a module-level function, pickled by
name: ``hv`` must be installed on every node), the task (command, options,
the input's name), and the input file's *content*: each input is read once
on this machine and ``ray.put`` into the object store, and every task of
that input takes the object reference; the worker writes the bytes to a
private temporary file (worker.run_task_on_content).  No path of this
machine is opened on a worker.
"""
import logging
import os
import socket

from ..errors import BadInput
from .worker import failed_result, run_task_on_content

__all__ = ["RayExecutor", "INSTALL_HINT", "ray_available"]

INSTALL_HINT = "Ray is not installed: pip install 'hv[cluster]' (or pip install ray)"


def ray_available():
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BadInput(f"--executor ray: {INSTALL_HINT}") from None
    return ray


def _loopback_only(ray):
    """A Ray started here for the run stays on the loopback address: by
    default Ray replaces 127.0.0.1 with the machine's own network address
    (for other nodes to reach it), which a one-machine run has no use for.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's own switch for that (read
    by the workers it starts; the driver's copy of the constant is set too,
    in case Ray was imported before)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    consts = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if consts is not None and hasattr(consts, "ENABLE_RAY_CLUSTER"):
        consts.ENABLE_RAY_CLUSTER = False


class RayExecutor:
    """Run tasks as Ray tasks.  ``jobs``: at most this many in flight (and,
    for ``address="local"``, the CPUs the local instance gets); default: the
    cluster's CPUs."""
    name = "ray"

    def __init__(self, address="local", jobs=None):
        if jobs is not None and jobs < 1:
            raise ValueError("jobs must be >= 1")
        self.ray = _import_ray()
        self.address = address or "local"
        self.jobs = jobs
        self._started = False

    def describe(self):
        return {"executor": "ray", "ray_address": self.address,
                "jobs": getattr(self, "_window", None) or self.jobs}

    def start(self):
        """Join the cluster (or start the local Ray) now: a cluster that
        cannot be reached is BadInput before anything is written."""
        ray = self.ray
        if ray.is_initialized():
            return
        if self.address != "local":
            _check_reachable(self.address)
        kw = dict(include_dashboard=False, log_to_driver=False,
                  logging_level=logging.WARNING)
        try:
            if self.address == "local":
                _loopback_only(ray)
                ray.init(address="local", num_cpus=self.jobs, **kw)
            else:
                ray.init(address=self.address, **kw)
        except (ConnectionError, ValueError, RuntimeError) as e:
            msg = " ".join(str(e).splitlines())
            raise BadInput(f"--ray-address {self.address}: cannot start or reach Ray: "
                           f"{msg}") from None
        self._started = True

    def close(self):
        if self._started:
            self._started = False
            self.ray.shutdown()

    def run(self, tasks, runner, on_result):
        ray = self.ray
        self.start()
        try:
            self._run(ray, list(tasks), runner, on_result)
        finally:
            self.close()

    def _run(self, ray, tasks, runner, on_result):
        window = self._window = self.jobs or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1)(run_task_on_content)
        left = {}                       # input path -> tasks of it not yet finished
        for t in tasks:
            left[t.path] = left.get(t.path, 0) + 1
        content = {}                    # input path -> ObjectRef of its bytes
        pending = list(reversed(tasks))
        inflight = {}                   # result ObjectRef -> task
        try:
            while pending or inflight:
                while pending and len(inflight) < window:
                    t = pending.pop()
                    ref = content.get(t.path)
                    if ref is None:
                        try:
                            with open(t.path, "rb") as f:
                                data = f.read()
                        except OSError as e:
                            on_result(t, failed_result(
                                f"cannot read {t.path}: {e.strerror or e}", 2))
                            self._done(t, left, content)
                            continue
                        ref = content[t.path] = ray.put(data)
                        del data
                    inflight[remote.remote(runner, t, ref)] = t
                if not inflight:
                    continue
                # a short timeout keeps Ctrl-C prompt (a KeyboardInterrupt waits
                # for the call to return)
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.2)
                for r in ready:
                    t = inflight.pop(r)
                    try:
                        res = ray.get(r)
                    except Exception as e:      # noqa: BLE001 - the task's failure is its row
                        msg = " ".join(f"{type(e).__name__}: {e}".splitlines())[:500]
                        res = failed_result(f"ray task failed: {msg}")
                    on_result(t, res)
                    self._done(t, left, content)
        except BaseException:
            for r in inflight:
                try:
                    ray.cancel(r, force=True)
                except Exception:   # noqa: BLE001 - already finished or gone
                    pass
            raise

    @staticmethod
    def _done(t, left, content):
        left[t.path] -= 1
        if not left[t.path]:
            content.pop(t.path, None)     # its object can leave the store


def _check_reachable(address, timeout=3.0):
    """A HOST:PORT address (given, or in RAY_ADDRESS for ``auto``) where
    nothing accepts a connection is BadInput now: ray.init would retry for
    minutes, blocking Ctrl-C.  Other forms are left to ray.init."""
    addr = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    host, sep, port = addr.rpartition(":")
    if not sep or not host or "/" in addr or not port.isdigit():
        return
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError, OverflowError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise BadInput(f"--ray-address {address}: nothing answers at {host}:{port} ({why}); "
                       "is its head started (ray start --head)?") from None
