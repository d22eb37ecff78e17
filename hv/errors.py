"""User-facing error types of ``hv``.

``BadInput`` is any error caused by what the user handed us (a file, an
argument, a trace).  The CLI prints ``hv: <message>`` and exits with status 2,
so messages are a single line.
"""

__all__ = ["BadInput", "TraceError", "VmStopped"]


def _one_line(s):
    return " ".join(str(s).splitlines())


class BadInput(Exception):
    """Any user-input error.  ``str(exc)`` is one line."""

    def __str__(self):
        return _one_line(super().__str__())


class TraceError(BadInput):
    """A fault trace could not be read.

    ``path`` is the file, ``line`` the 1-based line number of the first
    problem (``None`` when the problem is the file as a whole: missing,
    unreadable, unknown format, no accesses), ``msg`` what is wrong.
    ``str()`` gives ``PATH:LINE: msg`` (or ``PATH: msg`` without a line).
    """

    def __init__(self, path, line, msg):
        self.path = str(path)
        self.line = line
        self.msg = _one_line(msg)
        super().__init__(self.path, line, self.msg)

    def __str__(self):
        if self.line is None:
            return f"{self.path}: {self.msg}"
        return f"{self.path}:{self.line}: {self.msg}"

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.msg))


class VmStopped(Exception):
    """The PSP stopped the VM (tamper detected) or refused its NPF."""

    def __init__(self, status, msg, fields=None):
        super().__init__(msg)
        self.status = status
        self.fields = fields or {}      # the PSP's reply fields (where a tamper is)
