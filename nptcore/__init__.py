"""nptcore: the NPT engine (docs/ARCHITECTURE.md, "Engine API").

Pure functions over a host-memory buffer, in two backends with identical
results: "c" (csrc/npt.c through cffi, built at install time when a compiler
is available) and "python" (nptcore/pyengine.py).  No state, no policy.

    from nptcore import get_engine, available_backends
    eng = get_engine(buf)            # c if built, else python (warns once)
"""
import sys

from . import bits
from .bits import WalkResult, Walk2DResult
from .pyengine import PyEngine

try:
    from .cengine import CEngine
    _C_ERROR = None
except ImportError as exc:       # extension not built: pure-Python fallback
    CEngine = None
    _C_ERROR = exc

_warned = False

__all__ = ["get_engine", "available_backends", "bits", "WalkResult",
           "Walk2DResult", "PyEngine", "CEngine"]


def available_backends():
    """Names of the usable backends, fastest first."""
    return ["c", "python"] if CEngine is not None else ["python"]


def c_build_error():
    """Why the C backend is missing (the import error), or None when built."""
    return None if CEngine is not None else str(_C_ERROR)


def _warn_once():
    global _warned
    if not _warned:
        _warned = True
        sys.stderr.write("nptcore: warning: the C extension is not built (%s): running on "
                         "the pure-Python engine, much slower (install a C compiler and the "
                         "Python headers, then reinstall)\n" % (_C_ERROR,))


def get_engine(buf, backend=None):
    """An engine over `buf` (a writable buffer over all of host memory).

    backend: "c", "python", or None for "c" when built, else "python"
    (printing a one-time warning on stderr).  Asking for "c" when it is not
    built raises RuntimeError."""
    if backend is None:
        if CEngine is not None:
            return CEngine(buf)
        _warn_once()
        return PyEngine(buf)
    if backend == "c":
        if CEngine is None:
            raise RuntimeError("the C extension is not built (%s): use backend='python'"
                               % (_C_ERROR,))
        return CEngine(buf)
    if backend == "python":
        return PyEngine(buf)
    raise ValueError("nptcore: unknown backend %r (expected 'c' or 'python')"
                     % (backend,))
