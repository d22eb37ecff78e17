"""cffi builder for psp_firmware._psp_core_c (the PSP's C fast path).

Optional, like every csrc/build_*.py: it needs OpenSSL's libcrypto and its
headers (Debian/Ubuntu: libssl-dev). Without them the build fails with a
warning (setup.py) and psp_firmware uses its pure-Python twin.
For a development tree, `python csrc/build_psp_core.py` builds the module
and copies it into psp_firmware/.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CDEF = """
void psp_chunk_hash(const char *src, int mask_ad, const char *slots, char *out);
int psp_chunk_check(const char *src, int mask_ad, const char *slots, const char *expected);
void psp_node_hash(uint64_t hpa, int level, const char *chunks, char *out);
void psp_root_hash(uint64_t root, const char *node, char *out);
void psp_rehash_chunk_node(const char *shadow, int j, const char *slots,
                           uint64_t hpa, int level, char *chunks, char *node_out);
void psp_scrub(char *mem, uint64_t off, uint64_t n);
int64_t psp_leaf_scan(const char *shadow, int idx, int n, int level);
void psp_write_leaves(char *mem, uint64_t table, char *shadow, int idx, int n,
                      uint64_t value0, uint64_t step);
void psp_page_hash(const char *page, int mask_ad, const char *slots, int slot_mask,
                   uint64_t hpa, int level, char *chunks, char *node_out);
"""


def make_builder(absolute=False):
    csrc = HERE if absolute else "csrc"
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "psp_firmware._psp_core_c",
        "#include <stdint.h>\n"
        "#define OPENSSL_SUPPRESS_DEPRECATED 1\n"
        "#include <openssl/sha.h>\n"
        "void psp_chunk_hash(const char *, int, const char *, char *);\n"
        "int psp_chunk_check(const char *, int, const char *, const char *);\n"
        "void psp_node_hash(uint64_t, int, const char *, char *);\n"
        "void psp_root_hash(uint64_t, const char *, char *);\n"
        "void psp_rehash_chunk_node(const char *, int, const char *, uint64_t, int, char *, char *);\n"
        "void psp_scrub(char *, uint64_t, uint64_t);\n"
        "int64_t psp_leaf_scan(const char *, int, int, int);\n"
        "void psp_write_leaves(char *, uint64_t, char *, int, int, uint64_t, uint64_t);\n"
        "void psp_page_hash(const char *, int, const char *, int, uint64_t, int, char *, char *);\n",
        sources=[os.path.join(csrc, "psp_core.c")],
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
