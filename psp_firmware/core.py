"""The PSP's optional C core (psp_firmware._psp_core_c, built from
csrc/psp_core.c when a compiler and OpenSSL's libcrypto are available).

`resolve(core)` picks what a Psp (or an integrity object) uses:
"c" (required), "python" (the pure-Python twin), or None: the C core when it
is built, unless the environment says HV_PSP_CORE=python. Both give the same
statuses, table bytes, digests and frame states; tests run both.
"""
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
