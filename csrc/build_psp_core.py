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

_STRUCTS = """
struct psp_guest {
    uint32_t handle;
    uint32_t accepting;
    uint64_t vmsa;
    uint64_t root;
    uint64_t mapped_pages;
};
struct psp_ctx {
    void *mem;
    uint64_t host_size;
    uint64_t fw_lo, fw_hi;
    void *fstate;
    void *fowner;
    void *fgpa;
    void *shadow_of;
    void *lines_of;
    void *dirty;
    int64_t scrub_advice;
    struct psp_guest *ring_guests[64];
};
"""

# the functions as Python sees them (char * takes bytes and cffi buffers);
# psp_core.h has the same ones with uint8_t *
_FUNCS = """
void psp_chunk_hash(const char *src, int mask_ad, const char *slots, char *out);
int psp_chunk_check(const char *src, int mask_ad, const char *slots, const char *expected);
void psp_node_hash(uint64_t hpa, int level, const char *chunks, char *out);
void psp_root_hash(uint64_t root, const char *node, char *out);
void psp_line_hash(const char *src, char *out);
int psp_line_check(const char *src, const char *expected);
void psp_lines_hash(const char *page, char *out);
void psp_scrub(char *mem, uint64_t off, uint64_t n);
void psp_scrub_advised(char *mem, uint64_t off, uint64_t n, int advice);
int64_t psp_leaf_scan(const char *shadow, int idx, int n, int level);
void psp_write_leaves(char *mem, uint64_t table, char *shadow, int idx, int n,
                      uint64_t value0, uint64_t step);
void psp_page_hash(const char *page, int mask_ad, const char *slots, int slot_mask,
                   uint64_t hpa, int level, char *chunks, char *node_out);
int psp_update_fast(struct psp_ctx *c, struct psp_guest *g, uint32_t level, uint64_t gpa,
                    uint64_t hpa, uint32_t attrs, uint32_t npages);
uint32_t psp_mailbox_update(struct psp_ctx *c, const char *buf);
uint32_t psp_ring_fast(struct psp_ctx *c, char *ring, uint32_t start, uint32_t n,
                       uint32_t *progress);
"""
CDEF = _STRUCTS + _FUNCS


def make_builder(absolute=False):
    csrc = HERE if absolute else "csrc"
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "psp_firmware._psp_core_c",
        "#include <stdint.h>\n"
        "#define OPENSSL_SUPPRESS_DEPRECATED 1\n"
        "#include <openssl/sha.h>\n"
        "#define PSP_CORE_NO_PROTOS 1\n"
        "#include \"psp_core.h\"\n" + _FUNCS,
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
