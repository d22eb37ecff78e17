"""cffi builder for nptcore._npt_c (the C fast path of the NPT engine).

setup.py: cffi_modules=["csrc/build_npt.py:ffibuilder"] (paths relative to
the project root, where setup.py runs).  For a development tree,
`python csrc/build_npt.py` builds the module and copies it into nptcore/.
"""
import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cdef_from_header(path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)          # comments
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


def make_builder(absolute=False):
    csrc = HERE if absolute else "csrc"
    ffi = FFI()
    ffi.cdef(_cdef_from_header(os.path.join(HERE, "npt.h")))
    if sys.platform == "win32":
        cflags = ["/O2"]
    else:
        cflags = ["-O2", "-std=gnu99", "-fno-strict-aliasing"]
    ffi.set_source(
        "nptcore._npt_c",
        '#include "npt.h"\n',
        sources=[os.path.join(csrc, "npt.c")],
        include_dirs=[csrc],
        depends=[os.path.join(csrc, "npt.h")],
        extra_compile_args=cflags,
        # built for the running interpreter: the full C API is faster
        py_limited_api=False,
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inplace import compile_in_place
    print("built", compile_in_place(make_builder(absolute=True), ROOT, "nptcore", "_npt_c"))
