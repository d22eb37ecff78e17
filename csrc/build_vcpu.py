"""cffi builder for hv._vcpu_c (the vCPU fast path: Unicorn TLB-fill hook).

setup.py: cffi_modules=[..., "csrc/build_vcpu.py:ffibuilder"].  For a
development tree, `python csrc/build_vcpu.py` builds the module and copies it
into hv/.  The NPT walker (csrc/npt.c) is compiled into this module as well,
so a TLB fill is one C call with no Python in between.
"""
import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cdef():
    text = open(os.path.join(HERE, "vcpu.h"), encoding="utf-8").read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"#ifndef CFFI_CDEF.*?#endif", "", text, flags=re.S)
    text = text.replace("VCPU_BLK_BITS", "16")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines) + """
extern "Python+C" int vcpu_py_npf(vcpu_ctx *ctx);
extern "Python+C" uint32_t vcpu_py_block(vcpu_ctx *ctx, uint64_t addr, uint32_t size);
"""


def make_builder(absolute=False):
    csrc = HERE if absolute else "csrc"
    ffi = FFI()
    ffi.cdef(_cdef())
    cflags = ["/O2"] if sys.platform == "win32" else ["-O2", "-std=gnu99", "-fno-strict-aliasing"]
    ffi.set_source(
        "hv._vcpu_c",
        '#include "vcpu.h"\n',
        sources=[os.path.join(csrc, "vcpu.c"), os.path.join(csrc, "npt.c")],
        include_dirs=[csrc],
        depends=[os.path.join(csrc, "vcpu.h"), os.path.join(csrc, "npt.h")],
        extra_compile_args=cflags,
        py_limited_api=False,
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inplace import compile_in_place
    print("built", compile_in_place(make_builder(absolute=True), ROOT, "hv", "_vcpu_c"))
