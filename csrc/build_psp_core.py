"""cffi builder for psp_firmware._psp_core_c (the PSP's C fast path).

Optional, like every csrc/build_*.py: it needs OpenSSL's libcrypto and its
headers (Debian/Ubuntu: libssl-dev). Without them the build fails with a
warning (setup.py) and psp_firmware uses its pure-Python twin.
For a development tree, `python csrc/build_psp_core.py` builds the module
and copies it into psp_firmware/.
"""
import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def cdef_from_header(path=os.path.join(HERE, "psp_core.h")):
    """The cdef: psp_core.h's cdef-begin/cdef-end blocks, byte buffers as char *."""
    with open(path) as f:
        text = f.read()
    blocks = re.findall(r"/\* cdef-begin \*/(.*?)/\* cdef-end \*/", text, re.S)
    if len(blocks) != 2:
        raise RuntimeError(f"{path}: expected two cdef-begin/cdef-end blocks, found {len(blocks)}")
    return "".join(blocks).replace("PSP_BYTE", "char")


CDEF = cdef_from_header()


def make_builder(absolute=False):
    csrc = HERE if absolute else "csrc"
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "psp_firmware._psp_core_c",
        "#include <stdint.h>\n"
        "#define OPENSSL_SUPPRESS_DEPRECATED 1\n"
        "#include <openssl/sha.h>\n"
        "#define PSP_BYTE char\n"
        "#include \"psp_core.h\"\n",
        sources=[os.path.join(csrc, "psp_core.c")],
        include_dirs=[csrc],
        libraries=["crypto"],
        extra_compile_args=["-O2", "-std=gnu99", "-fno-strict-aliasing",
                            "-DOPENSSL_SUPPRESS_DEPRECATED", "-Wno-deprecated-declarations"],
        py_limited_api=False,
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inplace import compile_in_place
    print("built", compile_in_place(make_builder(absolute=True), ROOT, "psp_firmware", "_psp_core_c"))
