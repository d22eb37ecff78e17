"""cffi builder for ``hv._trace_c``, the C fast path of ``hv.trace``.

setup.py: ``cffi_modules=[..., "csrc/build_trace.py:ffibuilder"]``.
For a development tree: ``python csrc/build_trace.py`` puts the extension
next to ``hv/trace.py``.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CDEF = """
typedef struct {
    uint64_t line;
    int32_t code;
    int32_t col;
    uint64_t val;
    uint64_t val2;
    uint64_t n;
    int32_t has_rip;
    int32_t has_vcpu;
    uint64_t next;
} trace_result;

int trace_parse_lackey(const char *buf, size_t len, uint64_t first_line,
                       uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                       size_t cap, trace_result *res, uint64_t init_rip);
int trace_parse_csv(const char *buf, size_t len, uint64_t first_line,
                    const uint8_t *coltypes, int ncols,
                    uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                    uint16_t *vcpu, uint8_t *insn, uint8_t *insn_len,
                    size_t cap, trace_result *res);
int trace_parse_ftrace(const char *buf, size_t len, uint64_t first_line,
                       uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                       uint16_t *vcpu, size_t cap, trace_result *res);
int trace_parse_perf(const char *buf, size_t len, uint64_t first_line,
                     uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                     uint16_t *vcpu, size_t cap, trace_result *res);
int64_t trace_pages(const uint64_t *gpa, const uint32_t *size, size_t n,
                    uint64_t *out, size_t cap);
int64_t trace_straddles(const uint64_t *gpa, const uint32_t *size, size_t n,
                        uint64_t *out, size_t cap);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
with open(os.path.join(HERE, "trace.c")) as f:
    _src = f.read()
ffibuilder.set_source(
    "hv._trace_c",
    _src,
    extra_compile_args=["-O2", "-std=c99", "-Wall"],
)

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inplace import compile_in_place
    print("built", compile_in_place(ffibuilder, ROOT, "hv", "_trace_c"))
