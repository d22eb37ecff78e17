/*
 * Fault-trace parsers (the C fast path of hv/trace.py).
 *
 * Each parser takes the whole text of a trace (or the part after the CSV
 * header), fills preallocated column arrays and stops at the first bad line,
 * reporting its number, a reason code and the offending values in
 * trace_result.  The grammar is documented in hv/trace.py; the pure-Python
 * parsers there must give identical results (records and errors).
 *
 * No Python objects, no allocation: pure functions over buffers.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <stdlib.h>

/* Keep in sync with hv/trace.py (E_*). */
enum {
    E_OK = 0,
    E_SYNTAX = 1,     /* lackey/ftrace line not in the expected form */
    E_NFIELDS = 2,    /* csv: val = fields found, val2 = expected */
    E_ACCESS = 3,     /* csv: access kind not r/w/x (col) */
    E_NUMBER = 4,     /* csv: not a number (col) */
    E_RANGE = 5,      /* number does not fit in 64 bits (col) */
    E_EMPTY = 6,      /* csv: required field empty (col) */
    E_ADDR = 7,       /* val = address >= 2**48 */
    E_ADDR_END = 8,   /* val = address, val2 = size: ends past 2**48 */
    E_SIZE0 = 9,      /* size 0 */
    E_SIZEBIG = 10,   /* val = size > 4096 */
    E_VCPU = 11,      /* val = vcpu > 65535 */
    E_INSN = 12,      /* csv: insn not an even number of hex digits (col) */
    E_INSN_LONG = 13, /* val = insn length in bytes > 15 */
    E_INTERNAL = 14   /* output capacity exceeded */
};

/* csv column types (hv/trace.py: CSV_COLUMNS order) */
enum { C_ACCESS = 0, C_GPA = 1, C_SIZE = 2, C_RIP = 3, C_VCPU = 4, C_INSN = 5 };

typedef struct {
    uint64_t line;      /* line number of the first error */
    int32_t code;       /* E_* */
    int32_t col;        /* field / column index of the error, or -1 */
    uint64_t val;
    uint64_t val2;
    uint64_t n;         /* records written */
    int32_t has_rip;    /* ftrace/perf: some record carried a rip */
    int32_t has_vcpu;   /* ftrace/perf: some record carried a vcpu */
    uint64_t next;      /* on an error: byte offset of the line after the bad one
                           (where a caller skipping bad lines resumes) */
} trace_result;

#define GPA_LIMIT (1ULL << 48)
#define MAX_SIZE 4096u
#define MAX_INSN 15

static inline int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\r'; }
static inline int is_sep(unsigned char c) { return c == ' ' || c == '\t'; }

static inline int hexv(unsigned c)
{
    if (c - '0' < 10u) return (int)(c - '0');
    c |= 0x20;
    if (c - 'a' < 6u) return (int)(c - 'a' + 10);
    return -1;
}

/* Scan hex digits at *ps (< e).  Returns number of digits; sets *v and *ovf. */
static inline size_t scan_hex(const unsigned char **ps, const unsigned char *e,
                              uint64_t *v, int *ovf)
{
    const unsigned char *s = *ps;
    uint64_t x = 0;
    int o = 0, d;
    while (s < e && (d = hexv(*s)) >= 0) {
        if (x >> 60) o = 1;
        x = (x << 4) | (uint64_t)d;
        s++;
    }
    size_t n = (size_t)(s - *ps);
    *ps = s;
    *v = x;
    *ovf = o;
    return n;
}

static inline size_t scan_dec(const unsigned char **ps, const unsigned char *e,
                              uint64_t *v, int *ovf)
{
    const unsigned char *s = *ps;
    uint64_t x = 0;
    int o = 0;
    while (s < e && (unsigned)(*s - '0') < 10u) {
        uint64_t d = (uint64_t)(*s - '0');
        if (!o) {
            if (x > (UINT64_MAX - d) / 10) o = 1;
            else x = x * 10 + d;
        }
        s++;
    }
    size_t n = (size_t)(s - *ps);
    *ps = s;
    *v = x;
    *ovf = o;
    return n;
}

/* Blank (only ' ', '\t', '\r') or comment (first non-blank char '#'). */
static inline int skip_line(const unsigned char *s, const unsigned char *e)
{
    while (s < e && is_ws(*s)) s++;
    return s == e || *s == '#';
}

#define FAIL(c, cl, v1, v2) do { res->line = lineno; res->code = (c); res->col = (cl); \
    res->val = (v1); res->val2 = (v2); res->n = n;                             \
    res->next = (uint64_t)(p - (const unsigned char *)buf); return (c); } while (0)

#define FOR_EACH_LINE                                                         \
    const unsigned char *p = (const unsigned char *)buf, *end = p + len;      \
    uint64_t lineno = first_line - 1;                                         \
    while (p < end) {                                                         \
        const unsigned char *nl = memchr(p, '\n', (size_t)(end - p));         \
        const unsigned char *le = nl ? nl : end;                              \
        const unsigned char *ls = p;                                          \
        p = nl ? nl + 1 : end;                                                \
        lineno++;

#define END_FOR_EACH_LINE }

/* init_rip: the current instruction address before the first line (0 at the
 * start of a trace; the last record's rip when resuming after a bad line) */
int trace_parse_lackey(const char *buf, size_t len, uint64_t first_line,
                       uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                       size_t cap, trace_result *res, uint64_t init_rip)
{
    size_t n = 0;
    uint64_t cur_rip = init_rip;
    memset(res, 0, sizeof *res);
    res->col = -1;
    FOR_EACH_LINE
        if (le - ls >= 2 && ls[0] == ls[1] && (ls[0] == '=' || ls[0] == '-' || ls[0] == '*'))
            continue;   /* valgrind's own messages: ==PID== --PID-- **PID** */
        if (skip_line(ls, le))
            continue;
        const unsigned char *s = ls;
        while (s < le && is_ws(*s)) s++;
        unsigned char kind = *s++;
        if (kind != 'I' && kind != 'L' && kind != 'S' && kind != 'M')
            FAIL(E_SYNTAX, -1, 0, 0);
        if (s == le || !is_sep(*s))
            FAIL(E_SYNTAX, -1, 0, 0);
        while (s < le && is_sep(*s)) s++;
        uint64_t a, sz;
        int ao, so;
        if (!scan_hex(&s, le, &a, &ao)) FAIL(E_SYNTAX, -1, 0, 0);
        if (s == le || *s != ',') FAIL(E_SYNTAX, -1, 0, 0);
        s++;
        if (!scan_dec(&s, le, &sz, &so)) FAIL(E_SYNTAX, -1, 0, 0);
        while (s < le && is_ws(*s)) s++;
        if (s != le) FAIL(E_SYNTAX, -1, 0, 0);
        if (ao) FAIL(E_RANGE, 0, 0, 0);
        if (so) FAIL(E_RANGE, 1, 0, 0);
        if (a >= GPA_LIMIT) FAIL(E_ADDR, -1, a, 0);
        if (sz == 0) FAIL(E_SIZE0, -1, 0, 0);
        if (sz > MAX_SIZE) FAIL(E_SIZEBIG, -1, sz, 0);
        if (a + sz > GPA_LIMIT) FAIL(E_ADDR_END, -1, a, sz);
        if (n + (kind == 'M' ? 2 : 1) > cap) FAIL(E_INTERNAL, -1, 0, 0);
        switch (kind) {
        case 'I':
            cur_rip = a;
            acc[n] = 2; gpa[n] = a; size[n] = (uint32_t)sz; rip[n] = a; n++;
            break;
        case 'L':
            acc[n] = 0; gpa[n] = a; size[n] = (uint32_t)sz; rip[n] = cur_rip; n++;
            break;
        case 'S':
            acc[n] = 1; gpa[n] = a; size[n] = (uint32_t)sz; rip[n] = cur_rip; n++;
            break;
        default: /* 'M': read-modify-write: a read, then a write */
            acc[n] = 0; gpa[n] = a; size[n] = (uint32_t)sz; rip[n] = cur_rip; n++;
            acc[n] = 1; gpa[n] = a; size[n] = (uint32_t)sz; rip[n] = cur_rip; n++;
            break;
        }
    END_FOR_EACH_LINE
    res->n = n;
    return E_OK;
}

/* number field of a CSV line: 0x-hex or decimal */
static inline int csv_num(const unsigned char *s, const unsigned char *e, uint64_t *v)
{
    int ovf;
    size_t k;
    if (e - s >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        k = scan_hex(&s, e, v, &ovf);
    } else {
        k = scan_dec(&s, e, v, &ovf);
    }
    if (!k || s != e) return E_NUMBER;
    if (ovf) return E_RANGE;
    return E_OK;
}

int trace_parse_csv(const char *buf, size_t len, uint64_t first_line,
                    const uint8_t *coltypes, int ncols,
                    uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                    uint16_t *vcpu, uint8_t *insn, uint8_t *insn_len,
                    size_t cap, trace_result *res)
{
    size_t n = 0;
    memset(res, 0, sizeof *res);
    res->col = -1;
    FOR_EACH_LINE
        if (skip_line(ls, le))
            continue;
        uint64_t nf = 1;
        for (const unsigned char *q = ls; q < le; q++)
            nf += (*q == ',');
        if (nf != (uint64_t)ncols) FAIL(E_NFIELDS, -1, nf, (uint64_t)ncols);
        if (n + 1 > cap) FAIL(E_INTERNAL, -1, 0, 0);
        uint8_t a_ = 0;
        uint64_t g_ = 0, sz_ = 1, r_ = 0, vc_ = 0;
        size_t il = 0;
        const unsigned char *fs = ls;
        for (int c = 0; c < ncols; c++) {
            const unsigned char *fe = fs;
            while (fe < le && *fe != ',') fe++;
            const unsigned char *next = fe + 1;
            const unsigned char *s = fs;
            while (s < fe && is_ws(*s)) s++;
            while (fe > s && is_ws(fe[-1])) fe--;
            size_t flen = (size_t)(fe - s);
            int rc;
            switch (coltypes[c]) {
            case C_ACCESS:
                if (!flen) FAIL(E_EMPTY, c, 0, 0);
                if (flen != 1) FAIL(E_ACCESS, c, 0, 0);
                switch (*s | 0x20) {
                case 'r': a_ = 0; break;
                case 'w': a_ = 1; break;
                case 'x': a_ = 2; break;
                default: FAIL(E_ACCESS, c, 0, 0);
                }
                break;
            case C_GPA:
                if (!flen) FAIL(E_EMPTY, c, 0, 0);
                if ((rc = csv_num(s, fe, &g_))) FAIL(rc, c, 0, 0);
                if (g_ >= GPA_LIMIT) FAIL(E_ADDR, c, g_, 0);
                break;
            case C_SIZE:
                if (!flen) { sz_ = 1; break; }
                if ((rc = csv_num(s, fe, &sz_))) FAIL(rc, c, 0, 0);
                if (sz_ == 0) FAIL(E_SIZE0, c, 0, 0);
                if (sz_ > MAX_SIZE) FAIL(E_SIZEBIG, c, sz_, 0);
                break;
            case C_RIP:
                if (!flen) { r_ = 0; break; }
                if ((rc = csv_num(s, fe, &r_))) FAIL(rc, c, 0, 0);
                break;
            case C_VCPU:
                if (!flen) { vc_ = 0; break; }
                if ((rc = csv_num(s, fe, &vc_))) FAIL(rc, c, 0, 0);
                if (vc_ > 0xffff) FAIL(E_VCPU, c, vc_, 0);
                break;
            case C_INSN: {
                if (flen & 1) FAIL(E_INSN, c, 0, 0);
                for (size_t i = 0; i < flen; i++)
                    if (hexv(s[i]) < 0) FAIL(E_INSN, c, 0, 0);
                il = flen / 2;
                if (il > MAX_INSN) FAIL(E_INSN_LONG, c, il, 0);
                for (size_t i = 0; i < il; i++)
                    insn[n * MAX_INSN + i] = (uint8_t)(hexv(s[2 * i]) << 4 | hexv(s[2 * i + 1]));
                break;
            }
            default:
                FAIL(E_INTERNAL, c, 0, 0);
            }
            fs = next;
        }
        if (g_ + sz_ > GPA_LIMIT) FAIL(E_ADDR_END, -1, g_, sz_);
        acc[n] = a_;
        gpa[n] = g_;
        size[n] = (uint32_t)sz_;
        if (rip) rip[n] = r_;
        if (vcpu) vcpu[n] = (uint16_t)vc_;
        if (insn_len) insn_len[n] = (uint8_t)il;
        n++;
    END_FOR_EACH_LINE
    res->n = n;
    return E_OK;
}

static inline int lit(const unsigned char **ps, const unsigned char *e, const char *w)
{
    size_t k = strlen(w);
    if ((size_t)(e - *ps) < k || memcmp(*ps, w, k)) return 0;
    *ps += k;
    return 1;
}

static inline int seps(const unsigned char **ps, const unsigned char *e)
{
    const unsigned char *s = *ps;
    while (s < e && is_ws(*s)) s++;
    int any = s != *ps;
    *ps = s;
    return any;
}

static inline void opt_0x(const unsigned char **ps, const unsigned char *e)
{
    const unsigned char *s = *ps;
    if (e - s >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) *ps = s + 2;
}

/* A tracepoint event token at the start of the line or after ' ', '\t' or
 * ':' (perf script prints "kvm:kvm_page_fault:"); only its first occurrence
 * in the line counts.  Returns the position after the token, or NULL. */
static const unsigned char *event_at(const unsigned char *ls, const unsigned char *le,
                                     const char *tok, size_t toklen)
{
    const unsigned char *t = memmem(ls, (size_t)(le - ls), tok, toklen);
    if (!t) return NULL;
    if (t > ls && !(t[-1] == ' ' || t[-1] == '\t' || t[-1] == ':'))
        return NULL;
    return t + toklen;
}

/*
 * kvm_page_fault events (ftrace and perf) and, with `perf`, page_fault_user
 * events (exceptions:page_fault_user: "address=%ps ip=%ps error_code=0x%lx",
 * the ip going to rip).  Every other line is skipped.
 */
static int parse_events(const char *buf, size_t len, uint64_t first_line,
                        uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                        uint16_t *vcpu, size_t cap, trace_result *res, int perf)
{
    static const char TOK[] = "kvm_page_fault:";
    static const char PFU[] = "page_fault_user:";
    size_t n = 0;
    memset(res, 0, sizeof *res);
    res->col = -1;
    FOR_EACH_LINE
        if (skip_line(ls, le))
            continue;
        const unsigned char *s = event_at(ls, le, TOK, sizeof TOK - 1);
        uint64_t v = 0, r = 0, a, ec;
        int vo = 0, ro = 0, ao, eo, withv = 0, withr = 0;
        if (s) {
            seps(&s, le);
            if (lit(&s, le, "vcpu")) {
                withv = withr = 1;
                if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
                if (!scan_dec(&s, le, &v, &vo)) FAIL(E_SYNTAX, -1, 0, 0);
                if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
                if (!lit(&s, le, "rip")) FAIL(E_SYNTAX, -1, 0, 0);
                if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
                opt_0x(&s, le);
                if (!scan_hex(&s, le, &r, &ro)) FAIL(E_SYNTAX, -1, 0, 0);
                if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
            }
            if (!lit(&s, le, "address")) FAIL(E_SYNTAX, -1, 0, 0);
            if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
            opt_0x(&s, le);
            if (!scan_hex(&s, le, &a, &ao)) FAIL(E_SYNTAX, -1, 0, 0);
            if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
            if (!lit(&s, le, "error_code")) FAIL(E_SYNTAX, -1, 0, 0);
            if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
            opt_0x(&s, le);
            if (!scan_hex(&s, le, &ec, &eo)) FAIL(E_SYNTAX, -1, 0, 0);
        } else if (perf && (s = event_at(ls, le, PFU, sizeof PFU - 1)) != NULL) {
            withr = 1;
            seps(&s, le);
            if (!lit(&s, le, "address=")) FAIL(E_SYNTAX, -1, 0, 0);
            opt_0x(&s, le);
            if (!scan_hex(&s, le, &a, &ao)) FAIL(E_SYNTAX, -1, 0, 0);
            if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
            if (!lit(&s, le, "ip=")) FAIL(E_SYNTAX, -1, 0, 0);
            opt_0x(&s, le);
            if (!scan_hex(&s, le, &r, &ro)) FAIL(E_SYNTAX, -1, 0, 0);
            if (!seps(&s, le)) FAIL(E_SYNTAX, -1, 0, 0);
            if (!lit(&s, le, "error_code=")) FAIL(E_SYNTAX, -1, 0, 0);
            opt_0x(&s, le);
            if (!scan_hex(&s, le, &ec, &eo)) FAIL(E_SYNTAX, -1, 0, 0);
        } else {
            continue;
        }
        seps(&s, le);
        if (s != le) FAIL(E_SYNTAX, -1, 0, 0);
        if (vo) FAIL(E_RANGE, 0, 0, 0);
        if (ro) FAIL(E_RANGE, 1, 0, 0);
        if (ao) FAIL(E_RANGE, 2, 0, 0);
        if (eo) FAIL(E_RANGE, 3, 0, 0);
        if (v > 0xffff) FAIL(E_VCPU, -1, v, 0);
        if (a >= GPA_LIMIT) FAIL(E_ADDR, -1, a, 0);
        if (n + 1 > cap) FAIL(E_INTERNAL, -1, 0, 0);
        acc[n] = (ec & 16) ? 2 : (ec & 2) ? 1 : 0;
        gpa[n] = a;
        size[n] = 1;
        rip[n] = r;
        vcpu[n] = (uint16_t)v;
        /* kept in res as they come: an error return reports them too */
        res->has_rip |= withr;
        res->has_vcpu |= withv;
        n++;
    END_FOR_EACH_LINE
    res->n = n;
    return E_OK;
}

int trace_parse_ftrace(const char *buf, size_t len, uint64_t first_line,
                       uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                       uint16_t *vcpu, size_t cap, trace_result *res)
{
    return parse_events(buf, len, first_line, acc, gpa, size, rip, vcpu, cap, res, 0);
}

int trace_parse_perf(const char *buf, size_t len, uint64_t first_line,
                     uint8_t *acc, uint64_t *gpa, uint32_t *size, uint64_t *rip,
                     uint16_t *vcpu, size_t cap, trace_result *res)
{
    return parse_events(buf, len, first_line, acc, gpa, size, rip, vcpu, cap, res, 1);
}

static int cmp_u64(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return (a > b) - (a < b);
}

/*
 * Distinct 4 KiB page numbers touched by the accesses (gpa .. gpa+size-1),
 * sorted, written to out (capacity cap).  Returns the count, or -1 if cap is
 * too small (the caller then falls back).
 */
int64_t trace_pages(const uint64_t *gpa, const uint32_t *size, size_t n,
                    uint64_t *out, size_t cap)
{
    size_t m = 0;
    uint64_t last = UINT64_MAX;
    for (size_t i = 0; i < n; i++) {
        uint64_t first = gpa[i] >> 12;
        uint64_t sz = size[i] ? size[i] : 1;
        uint64_t lastpg = (gpa[i] + sz - 1) >> 12;
        for (uint64_t pg = first; pg <= lastpg; pg++) {
            if (pg == last) continue;
            if (m >= cap) return -1;
            out[m++] = last = pg;
        }
    }
    if (m < 2) return (int64_t)m;
    qsort(out, m, sizeof *out, cmp_u64);
    size_t k = 1;
    for (size_t i = 1; i < m; i++)
        if (out[i] != out[k - 1]) out[k++] = out[i];
    return (int64_t)k;
}

/* Rows whose access crosses a 4 KiB page boundary ((gpa & 0xFFF) + size >
 * 0x1000): writes up to cap of their indices to out and returns how many
 * there are in all (call again with a bigger array when that exceeds cap). */
int64_t trace_straddles(const uint64_t *gpa, const uint32_t *size, size_t n,
                        uint64_t *out, size_t cap)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (__builtin_expect((gpa[i] & 0xFFF) + (uint64_t)size[i] > 0x1000, 0)) {
            if (m < cap) out[m] = i;
            m++;
        }
    }
    return (int64_t)m;
}
