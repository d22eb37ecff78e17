"""The PSP's optional C core (psp_firmware._psp_core_c, built from
csrc/psp_core.c when a compiler and OpenSSL's libcrypto are available).

`resolve(core)` picks what a Psp (or an integrity object) uses:
"c" (required), "python" (the pure-Python twin), or None: the C core when it
is built, unless the environment says HV_PSP_CORE=python. Both give the same
statuses, table bytes, digests and frame states; tests run both.
"""
import mmap
import os

try:
    from ._psp_core_c import ffi, lib
except ImportError:          # pragma: no cover - depends on the build
    ffi = lib = None


def available():
    return lib is not None


def resolve(core=None):
    """The cffi lib to use, or None for the Python twin."""
    if core is None:
        core = os.environ.get("HV_PSP_CORE") or ("c" if lib is not None else "python")
    if core == "python":
        return None
    if core == "c":
        if lib is None:
            raise RuntimeError("psp_firmware: C core not built (needs libcrypto; "
                               "see csrc/build_psp_core.py)")
        return lib
    raise ValueError(f"unknown PSP core {core!r} (expected 'c' or 'python')")


class Ptrs(dict):
    """hpa -> cffi pointer into the PSP-owned bytearray src[hpa], made once.
    Callers must never rebind src[hpa] to another object without dropping
    its entry here (they mutate in place)."""
    __slots__ = ("src",)

    def __init__(self, src):
        super().__init__()
        self.src = src

    def __missing__(self, key):
        p = self[key] = ffi.from_buffer(self.src[key])
        return p


class PageTables:
    """Per-frame pointer arrays for the C fast path (struct psp_ctx): for
    every table page, where its shadow copy and its line hashes live.

    Indexed by host frame number, over anonymous mmaps (lazily zero: a large
    host costs nothing until table pages exist). The buffers registered are
    PSP-owned bytearrays that are never resized or rebound; the cffi handles
    kept here pin them (a bytearray with an exported buffer cannot resize)."""

    def __init__(self, nframes):
        self._mms = [mmap.mmap(-1, max(8, nframes * 8),
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for _ in range(2)]
        self.shadow_of = memoryview(self._mms[0]).cast("Q")
        self.lines_of = memoryview(self._mms[1]).cast("Q")
        self.c_shadow_of = ffi.from_buffer(self._mms[0])
        self.c_lines_of = ffi.from_buffer(self._mms[1])
        self._keep = {}
        # table pages (of every guest) that may have stale merkle chunks: what
        # the Python side marks goes in directly, what the C update marks
        # arrives through the context's log (drain_log); `epoch` moves when
        # the log overflowed, and every guest's next flush then scans all
        self.pending = set()
        self.epoch = 0
        self._ctx = self._dlog = None

    def attach_log(self, ctx, cap=8192):
        self._dlog = ffi.new("uint64_t[]", cap)
        ctx.dlog, ctx.dlog_cap, ctx.dlog_n, ctx.dlog_over = self._dlog, cap, 0, 0
        self._ctx = ctx

    def drain_log(self):
        """Move the C log into `pending` (bump `epoch` if it overflowed)."""
        c = self._ctx
        if c is None:
            return
        n = c.dlog_n
        if n:
            self.pending.update(ffi.unpack(self._dlog, n))
            c.dlog_n = 0
        if c.dlog_over:
            c.dlog_over = 0
            self.epoch += 1

    @staticmethod
    def _addr(cdata):
        return int(ffi.cast("uintptr_t", cdata))

    def set_shadow(self, hpa, buf):
        p = ffi.from_buffer(buf, require_writable=True)
        self._keep[("s", hpa)] = p
        self.shadow_of[hpa >> 12] = self._addr(p)

    def set_lines(self, hpa, buf):
        p = ffi.from_buffer(buf, require_writable=True)
        self._keep[("l", hpa)] = p
        self.lines_of[hpa >> 12] = self._addr(p)

    def drop(self, hpa):
        self.shadow_of[hpa >> 12] = 0
        self.lines_of[hpa >> 12] = 0
        self._keep.pop(("s", hpa), None)
        self._keep.pop(("l", hpa), None)
