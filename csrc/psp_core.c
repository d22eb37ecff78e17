/* psp_core.c: the PSP's C fast path (psp_firmware._psp_core_c).
 *
 * Two kinds of code live here.
 *
 * 1. Pure helpers used by psp_firmware/merkle.py and psp_firmware/psp.py:
 *    the merkle chunk/node/root hashes and the line hashes (SHA-256 from
 *    OpenSSL's libcrypto), hashing straight from host memory with the A/D
 *    bits masked, the leaf-range scan and bulk entry write, and the scrub.
 *    Each mirrors a Python twin byte for byte.
 *
 * 2. psp_update_fast / psp_ring_fast: the whole of an ordinary UPDATE_NPT
 *    (the common case of an NPF: leaves inside one existing leaf table) as
 *    one call, over PSP state kept in flat per-frame arrays (struct psp_ctx).
 *    It either commits exactly what the Python handler would commit for the
 *    same command and returns 0, or returns 1 having changed nothing; the
 *    Python handler (psp_firmware/psp.py cmd_update_npt) then runs its full
 *    path, which decides the status (refusals, new tables, integrity stops).
 *    So the C code never has to reproduce a refusal, only the success case.
 *    A ring is one batch: its line checks and scrub probes are cached for
 *    the length of one psp_ring_fast call (struct ring_state).
 *
 * Host memory is only read (hash, scan) or written where the Python twin
 * writes it (entries, scrub). PSP state passed in (shadow pages, line
 * hashes, child-hash slots, stored hashes) lives in buffers the PSP owns.
 */
#define _GNU_SOURCE             /* SEEK_DATA, SEEK_HOLE */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#include <unistd.h>
#include <sys/mman.h>
#include <openssl/sha.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "psp_core.h"

/* One-shot SHA-256 through the low-level API: OpenSSL 3's SHA256() goes
 * through an EVP fetch on every call (about 1.5 us here), which would
 * dominate the small hashes of an update. */
static void sha256(const uint8_t *p, size_t n, uint8_t *out)
{
    SHA256_CTX c;
    SHA256_Init(&c);
    SHA256_Update(&c, p, n);
    SHA256_Final(out, &c);
}

#define CHUNK_BYTES 512
#define SLOT_BYTES  2048            /* 64 child node hashes of 32 bytes */
#define AD_MASK     0x60ULL
#define P_BIT       1ULL
#define PS_BIT      0x80ULL
#define W_BIT       0x2ULL
#define U_BIT       0x4ULL
#define NX_BIT      (1ULL << 63)
#define ADDR_MASK   0x000FFFFFFFFFF000ULL
#define GPA_LIMIT   (1ULL << 48)
#define MAX_NPAGES  (1u << 20)
#define LINE_BYTES  64
#define ATTR_W      1u
#define ATTR_X      2u
/* psp_firmware.frames.F */
#define F_HV        0
#define F_PRIVATE   5
#define F_MAPPED    6
/* psp_firmware.status.Status / commands / mailbox_layout */
#define ST_SUCCESS  0u
#define CMD_UPDATE_NPT 0x20u
#define CMD_NOP     0x3Fu
#define UPDATE_NPT_LEN 32u
#define RING_ENTRY  256u
#define RE_STATUS   8u
#define RE_OUT_LEN  12u
#define RE_IN       16u
#define RE_OUT      128u
#define DONE_BIT    (1u << 31)
/* struct psp_ctx.hole_kind */
#define HOLE_NONE    0
#define HOLE_SEEK    1
#define HOLE_PAGEMAP 2

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* SHA-256("C" || chunk (A/D cleared when mask_ad) || slots[0..2048) if slots) */
void psp_chunk_hash(const uint8_t *src, int mask_ad, const uint8_t *slots, uint8_t *out)
{
    SHA256_CTX c;
    SHA256_Init(&c);
    if (mask_ad) {
        uint8_t buf[1 + CHUNK_BYTES];
        buf[0] = 'C';
        for (int i = 0; i < CHUNK_BYTES; i += 8)
            st64(buf + 1 + i, ld64(src + i) & ~AD_MASK);
        SHA256_Update(&c, buf, sizeof buf);
    } else {
        SHA256_Update(&c, "C", 1);
        SHA256_Update(&c, src, CHUNK_BYTES);
    }
    if (slots)
        SHA256_Update(&c, slots, SLOT_BYTES);
    SHA256_Final(out, &c);
}

/* 1 when psp_chunk_hash(...) equals expected[0..32) */
int psp_chunk_check(const uint8_t *src, int mask_ad, const uint8_t *slots,
                    const uint8_t *expected)
{
    uint8_t h[32];
    psp_chunk_hash(src, mask_ad, slots, h);
    return memcmp(h, expected, 32) == 0;
}

/* SHA-256("N" || hpa (u64 LE) || level (u8) || chunks[0..256)) */
void psp_node_hash(uint64_t hpa, int level, const uint8_t *chunks, uint8_t *out)
{
    uint8_t buf[1 + 8 + 1 + 256];
    buf[0] = 'N';
    st64(buf + 1, hpa);
    buf[9] = (uint8_t)level;
    memcpy(buf + 10, chunks, 256);
    sha256(buf, sizeof buf, out);
}

/* SHA-256("R" || root (u64 LE) || node[0..32)) */
void psp_root_hash(uint64_t root, const uint8_t *node, uint8_t *out)
{
    uint8_t buf[1 + 8 + 32];
    buf[0] = 'R';
    st64(buf + 1, root);
    memcpy(buf + 9, node, 32);
    sha256(buf, sizeof buf, out);
}

/* Zero k bytes at p. A whole aligned page goes out with non-temporal
 * stores: no read-for-ownership of lines the PSP will not read again
 * (measured here: 150-180 ns per cold 4 KiB page against 330-360 for
 * memset). The caller fences (zero_fence) before it publishes anything
 * that lets another agent see the page. */
static void zero_bytes(uint8_t *p, uint64_t k)
{
#if defined(__x86_64__)
    if (k == 4096 && !((uintptr_t)p & 15)) {
        const __m128i z = _mm_setzero_si128();
        for (int i = 0; i < 4096; i += 64) {
            _mm_stream_si128((__m128i *)(p + i), z);
            _mm_stream_si128((__m128i *)(p + i + 16), z);
            _mm_stream_si128((__m128i *)(p + i + 32), z);
            _mm_stream_si128((__m128i *)(p + i + 48), z);
        }
        return;
    }
#endif
    memset(p, 0, k);
}

static inline void zero_fence(void)
{
#if defined(__x86_64__)
    _mm_sfence();
#endif
}

/* Scrub [off, off+n) of host memory a page at a time, leaving pages that
 * already read as zero untouched (same bytes; avoids dirtying a page the
 * kernel would have to allocate just to write zeros over its zeros). */
static void scrub_pages(uint8_t *mem, uint64_t off, uint64_t n)
{
    static const uint8_t zero[4096];
    uint8_t *p = mem + off, *end = p + n;
    while (p < end) {
        uint64_t k = (uint64_t)(end - p) < 4096 ? (uint64_t)(end - p) : 4096;
        if (memcmp(p, zero, k))
            zero_bytes(p, k);
        p += k;
    }
}

void psp_scrub(uint8_t *mem, uint64_t off, uint64_t n)
{
    scrub_pages(mem, off, n);
    zero_fence();
}

/* Scrub by giving the pages back: with advice MADV_DONTNEED (a private
 * anonymous mapping) or MADV_REMOVE (a shared one: punches a hole in the
 * memfd/file), the range reads as zero afterwards and costs no page fault
 * now; the guest's first touch allocates a zeroed page, as a fresh KVM page
 * would. The caller picks the advice that is right for the mapping
 * (psp_firmware/psp.py: Psp(scrub=...)); if the kernel refuses, write zeros.
 * Below SCRUB_MADVISE_MIN bytes the pages are compared and written instead:
 * a madvise costs a fixed 1-5 us (5 for a memfd hole punch), and pages the
 * VMM keeps resident would be faulted back in; 16 pages and up it wins. */
#define SCRUB_MADVISE_MIN (16 * 4096)

/* Scrub pages that hold data; skip the holes. A page the host kernel has
 * never allocated (or that a scrub's madvise gave back) already reads as
 * zero, and reading it to find that out is what costs: a read fault that
 * allocates a zeroed page in a memfd, or maps the zero page in a private
 * mapping. The probe asks the kernel instead, without touching the page:
 *   HOLE_SEEK    hole_fd is the memfd that mem maps from offset 0:
 *                lseek(SEEK_DATA) names the next page that holds data (in
 *                memory or swapped out: both are data);
 *   HOLE_PAGEMAP hole_fd is /proc/self/pagemap and mem a private anonymous
 *                mapping: an entry neither present (bit 63) nor swapped
 *                (bit 62) is a page never touched since it was last zero.
 * Data pages are compared and written as psp_scrub does; a page the probe
 * cannot tell about (an fd error, a short read) is too.
 * Whether a hole stays zero after the probe is no different from whether
 * a written page stays zero after the scrub: the VMM can write any host
 * page at any time (DESIGN.md's threat model); the scrub only guarantees
 * that no earlier owner's bytes reach the new one.
 *
 * What a probe has learnt (struct frame_probe, psp_core.h), kept for its
 * scrub (one call), for a whole ring (psp_ring_fast), or across the vCPU's
 * updates while no other entry runs (psp_shared_update), so that it asks
 * the kernel once per window or run rather than once per frame (a 1-entry
 * pagemap read costs about 0.8 us here, as much as the guest's write that
 * allocates the page):
 *   a window of up to PROBE_WINDOW frames, read in one call when a frame
 *   outside it is asked about (never past `limit`): for HOLE_PAGEMAP the
 *   pagemap entries (present or swapped: data; else a hole); for HOLE_SEEK,
 *   only in a ring (`mincore_window`), mincore() of the PSP's mapping (1:
 *   the memfd has the page in memory: data; a single scrub goes straight
 *   to SEEK_DATA, which costs less than a mincore of the window);
 *   for HOLE_SEEK, a known run of holes [hole_lo, hole_hi) from the last
 *   SEEK_DATA that found none there (a frame mincore does not report may
 *   still be swapped out: only SEEK_DATA says it is a hole). One SEEK_DATA
 *   per data page: SEEK_HOLE would walk the whole run of data pages after
 *   it (O(run) in shmem), which a VMM's memory is.
 * A frame the VMM fills after the probe looked is the same as one it fills
 * after the scrub; what the probe saw as data is always scrubbed. */
#define PROBE_WINDOW 256
#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)
_Static_assert(sizeof(((struct frame_probe *)0)->win) == PROBE_WINDOW, "frame_probe.win");

static void probe_init(struct frame_probe *pr, int kind, int fd, int mincore_window,
                       uint64_t limit)
{
    pr->kind = kind;
    pr->fd = fd;
    pr->mincore_window = mincore_window;
    pr->limit = limit;
    pr->hole_lo = pr->hole_hi = 0;
    pr->win_lo = pr->win_n = 0;
}

/* 1: the page at pos holds data (scrub it), 0: a hole, -1: cannot tell (scrub) */
static int probe_page(const uint8_t *mem, struct frame_probe *pr, uint64_t pos)
{
    if (pr->kind == HOLE_SEEK && pos >= pr->hole_lo && pos < pr->hole_hi)
        return 0;
    if ((pr->kind == HOLE_PAGEMAP || pr->mincore_window) &&
        (pos < pr->win_lo || pos >= pr->win_lo + (pr->win_n << 12))) {
        uint64_t n = (pr->limit - pos) >> 12;
        if (n > PROBE_WINDOW)
            n = PROBE_WINDOW;
        pr->win_lo = pos;
        pr->win_n = 0;
        if (pr->kind == HOLE_SEEK) {
            if (mincore((void *)(mem + pos), n << 12, pr->win) != 0)
                return -1;
        } else {
            uint64_t ent[PROBE_WINDOW];
            off_t at = (off_t)(((uintptr_t)mem + pos) >> 12) * 8;
            if (pread(pr->fd, ent, n * 8, at) != (ssize_t)(n * 8))
                return -1;
            for (uint64_t i = 0; i < n; i++)
                pr->win[i] = (ent[i] & (PM_PRESENT | PM_SWAPPED)) != 0;
        }
        pr->win_n = n;
    }
    if (pr->win_n && pos >= pr->win_lo && (pr->win[(pos - pr->win_lo) >> 12] & 1))
        return 1;
    if (pr->kind == HOLE_PAGEMAP)
        return 0;
    off_t d = lseek(pr->fd, (off_t)pos, SEEK_DATA);
    if (d < 0) {
        if (errno != ENXIO)
            return -1;
        pr->hole_lo = pos;                 /* no data from pos to the end */
        pr->hole_hi = UINT64_MAX;
        return 0;
    }
    if ((uint64_t)d == pos)
        return 1;
    if ((uint64_t)d < pos || ((uint64_t)d & 4095))
        return -1;                         /* not what SEEK_DATA promises */
    pr->hole_lo = pos;
    pr->hole_hi = (uint64_t)d;
    return 0;
}

/* The scrub of [off, off+n): madvise for a large range where the mapping
 * allows; else page by page, with pr (NULL: no probe) skipping the holes. */
static void scrub_range(uint8_t *mem, uint64_t off, uint64_t n, int advice,
                        struct frame_probe *pr)
{
    int aligned = !(off & 4095) && !(n & 4095) && !((uintptr_t)mem & 4095);
    if (advice && n >= SCRUB_MADVISE_MIN && aligned && madvise(mem + off, n, advice) == 0)
        return;
    if (!pr || !aligned || pr->fd < 0 || (pr->kind != HOLE_SEEK && pr->kind != HOLE_PAGEMAP)) {
        scrub_pages(mem, off, n);
    } else {
        for (uint64_t pos = off; pos < off + n; pos += 4096)
            if (probe_page(mem, pr, pos) != 0)
                scrub_pages(mem, pos, 4096);
    }
    zero_fence();
}

void psp_scrub_probe(uint8_t *mem, uint64_t off, uint64_t n, int advice, int hole_kind,
                     int hole_fd)
{
    struct frame_probe pr;
    probe_init(&pr, hole_kind, hole_fd, 0, off + n);
    scrub_range(mem, off, n, advice, &pr);
}

/* The leaf scan of a one-table plan: entries [idx, idx+n) of a shadow page.
 * Returns -1 if none is present, else (i << 1) | overlap for the first
 * present one at idx+i, overlap set when level 2 and the entry is not PS
 * (a table: RANGE_OVERLAP), as ShadowNpt.plan_map decides. */
int64_t psp_leaf_scan(const uint8_t *shadow, int idx, int n, int level)
{
    for (int i = 0; i < n; i++) {
        uint64_t e = ld64(shadow + 8 * (idx + i));
        if (e & P_BIT)
            return ((int64_t)i << 1) | (level == 2 && !(e & PS_BIT));
    }
    return -1;
}

/* Write n leaves value0 + i*step into entries [idx, idx+n) of a table page in
 * host memory and of its shadow (A/D cleared in the shadow). */
void psp_write_leaves(uint8_t *mem, uint64_t table, uint8_t *shadow, int idx, int n,
                      uint64_t value0, uint64_t step)
{
    for (int i = 0; i < n; i++) {
        uint64_t v = value0 + (uint64_t)i * step;
        st64(mem + table + 8 * (uint64_t)(idx + i), v);
        st64(shadow + 8 * (idx + i), v & ~AD_MASK);
    }
}

/* All 8 chunk hashes of a page (into chunks[0..256)) and its node hash.
 * Chunk j includes slots + j*2048 when bit j of slot_mask is set. */
void psp_page_hash(const uint8_t *page, int mask_ad, const uint8_t *slots, int slot_mask,
                   uint64_t hpa, int level, uint8_t *chunks, uint8_t *node_out)
{
    for (int j = 0; j < 8; j++)
        psp_chunk_hash(page + j * CHUNK_BYTES, mask_ad,
                       (slots && ((slot_mask >> j) & 1)) ? slots + j * SLOT_BYTES : 0,
                       chunks + 32 * j);
    psp_node_hash(hpa, level, chunks, node_out);
}

/* ---------------------------------------------------------------------------
 * The merkle periodic check (MerkleIntegrity.verify_all) in one call: every
 * table page's chunk and node hashes recomputed straight from host memory
 * (A/D masked), leaves first, each parent's child-hash slots built from its
 * children's recomputed node hashes, then the root digest.
 *
 * Pages k = 0 .. n-1 in the order given (leaves first: a child before its
 * parent); for page k:
 *   hpa[k], level[k]  the page and its level (its node header),
 *   slot_mask[k]      chunks whose hash covers child-hash slots,
 *   slots_of[k]       its slot buffer: scratch + slots_of[k] * 16384, or -1,
 *   parent_at[k]      where its node hash goes: scratch + parent_at[k]
 *                     (its parent's slot for its entry), or -1.
 * scratch (scratch_len bytes) is zeroed first; a slot no child writes stays
 * zero. nodes_out[32k..32k+32) gets page k's node hash (the caller names the
 * first page that differs from its stored one); root_out gets
 * SHA-256("R" || root || node hash of page root_k).
 * The caller guarantees every hpa[k] + 4096 lies inside host memory. */
void psp_merkle_verify(const uint8_t *mem, uint32_t n, const uint64_t *hpa,
                       const uint8_t *level, const uint8_t *slot_mask,
                       const int32_t *slots_of, const int64_t *parent_at,
                       uint8_t *scratch, uint64_t scratch_len, uint8_t *nodes_out,
                       uint32_t root_k, uint64_t root, uint8_t *root_out)
{
    uint8_t chunks[256];
    memset(scratch, 0, scratch_len);
    for (uint32_t k = 0; k < n; k++) {
        const uint8_t *sl = slots_of[k] >= 0 ? scratch + (uint64_t)slots_of[k] * (8 * SLOT_BYTES)
                                             : NULL;
        uint8_t *node = nodes_out + 32 * (uint64_t)k;
        psp_page_hash(mem + hpa[k], 1, sl, slot_mask[k], hpa[k], level[k], chunks, node);
        if (parent_at[k] >= 0)
            memcpy(scratch + parent_at[k], node, 32);
    }
    if (root_k < n)
        psp_root_hash(root, nodes_out + 32 * (uint64_t)root_k, root_out);
}

/* ---------------------------------------------------------------------------
 * Line hashes: the index an update's path check uses.
 * L = SHA-256("L" || 64 bytes of entries with A/D cleared): one cache line,
 * 8 entries, two SHA-256 blocks. */
void psp_line_hash(const uint8_t *src, uint8_t *out)
{
    uint8_t buf[1 + LINE_BYTES];
    buf[0] = 'L';
    for (int i = 0; i < LINE_BYTES; i += 8)
        st64(buf + 1 + i, ld64(src + i) & ~AD_MASK);
    sha256(buf, sizeof buf, out);
}

int psp_line_check(const uint8_t *src, const uint8_t *expected)
{
    uint8_t h[32];
    psp_line_hash(src, h);
    return memcmp(h, expected, 32) == 0;
}

/* All 64 line hashes of a page into out[0..2048). */
void psp_lines_hash(const uint8_t *page, uint8_t *out)
{
    for (int k = 0; k < 4096 / LINE_BYTES; k++)
        psp_line_hash(page + k * LINE_BYTES, out + 32 * k);
}

/* ---------------------------------------------------------------------------
 * UPDATE_NPT, the common case, in one call.
 *
 * Frame-state model (psp_firmware/frames.py): the frames [hpa, hpa+total)
 * go HV | PRIVATE(g) -> MAPPED(g, gpa + i*4K). Table pages are untouched
 * (no new table: an update that needs one is declined, and the Python
 * handler takes table pages from the pool). */
static inline const uint8_t *shadow_of(const struct psp_ctx *c, uint64_t t)
{
    return (const uint8_t *)(uintptr_t)((const uint64_t *)c->shadow_of)[t >> 12];
}

static inline uint8_t *lines_of(const struct psp_ctx *c, uint64_t t)
{
    return (uint8_t *)(uintptr_t)((const uint64_t *)c->lines_of)[t >> 12];
}

/* Does line k of table page t in host memory hash to the stored line hash? */
static int line_matches(const struct psp_ctx *c, uint64_t t, int k)
{
    const uint8_t *lines = lines_of(c, t);
    if (!lines)
        return 0;
    return psp_line_check((const uint8_t *)c->mem + t + (uint64_t)k * LINE_BYTES, lines + 32 * k);
}

/* The lines one ring has checked, so that it checks each line once.
 *
 * A ring is answered in one wake-up, under the PSP's lock: to the VMM it is
 * one batch, as an UPDATE_NPT of many pages is one command (that one also
 * checks each line its walk reads once, not once per page). Within a ring,
 * a line of table page t that has matched its stored line hash is not
 * hashed again for the ring's later entries, and a leaf line the ring has
 * written gets its new line hash once (from the shadow copy, as in the
 * single command), when the entry is evicted or the ring loop returns. A
 * VMM that rewrites a line after the ring has checked it gains nothing it
 * would not gain by rewriting it just after the ring: the walk reads the
 * PSP's shadow copy, never host memory, and the next check of that line
 * (a later command, the periodic check, VERIFY) finds the change.
 *
 * Direct-mapped: key = t + k + 1 (t is 4 KiB aligned, k < 64; 0 = empty).
 * Invariant at every return of psp_ring_fast: no entry is pending, i.e.
 * every stored line hash matches the shadow copy, as after a single command. */
#define LC_SLOTS 128
struct line_cache {
    uint64_t key[LC_SLOTS];
    uint8_t pending[LC_SLOTS];     /* written: its stored line hash is stale */
};

static inline unsigned lc_slot(uint64_t key)
{
    return (unsigned)(((key >> 12) * 0x9E3779B97F4A7C15ULL + key) >> 57) & (LC_SLOTS - 1);
}

static void lc_rehash(const struct psp_ctx *c, uint64_t key)
{
    uint64_t t = key & ~4095ULL;
    int k = (int)(key & 4095) - 1;
    psp_line_hash(shadow_of(c, t) + k * LINE_BYTES, lines_of(c, t) + 32 * k);
}

static void lc_evict(const struct psp_ctx *c, struct line_cache *lc, unsigned s)
{
    if (lc->pending[s])
        lc_rehash(c, lc->key[s]);
    lc->key[s] = 0;
    lc->pending[s] = 0;
}

static void lc_flush(const struct psp_ctx *c, struct line_cache *lc)
{
    for (unsigned s = 0; s < LC_SLOTS; s++)
        if (lc->key[s])
            lc_evict(c, lc, s);
}

/* line_matches, asked once per ring (lc NULL: every time) */
static int line_checked(const struct psp_ctx *c, struct line_cache *lc, uint64_t t, int k)
{
    if (!lc)
        return line_matches(c, t, k);
    uint64_t key = t + (uint64_t)k + 1;
    unsigned s = lc_slot(key);
    if (lc->key[s] == key)
        return 1;
    if (!line_matches(c, t, k))
        return 0;
    lc_evict(c, lc, s);
    lc->key[s] = key;
    return 1;
}

/* line k of table page t was written (shadow and host): its line hash is
 * stale; bring it up to date now, or when the ring's cache lets it go */
static void line_written(const struct psp_ctx *c, struct line_cache *lc, uint64_t t, int k)
{
    uint64_t key = t + (uint64_t)k + 1;
    if (lc) {
        unsigned s = lc_slot(key);
        if (lc->key[s] == key) {
            lc->pending[s] = 1;
            return;
        }
    }
    lc_rehash(c, key);
}

/* What a ring keeps between its entries: the lines it checked and wrote,
 * and what its scrubs' probe learnt (struct frame_probe, with a mincore
 * window for HOLE_SEEK and windows up to the end of host memory). */
struct ring_state {
    struct line_cache lc;
    struct frame_probe probe;
};

/* The scrub of an update: the probe of its ring or of the shared entry, or
 * for a single command its own */
static void scrub_frames(const struct psp_ctx *c, struct frame_probe *pr, uint64_t off, uint64_t n)
{
    if (pr)
        scrub_range((uint8_t *)c->mem, off, n, (int)c->scrub_advice, pr);
    else
        psp_scrub_probe((uint8_t *)c->mem, off, n, (int)c->scrub_advice, (int)c->hole_kind,
                        (int)c->hole_fd);
}

static int update_fast(struct psp_ctx *c, struct psp_guest *g, uint32_t level, uint64_t gpa,
                       uint64_t hpa, uint32_t attrs, uint32_t npages, struct line_cache *lc,
                       struct frame_probe *pr)
{
    uint8_t *mem = (uint8_t *)c->mem;
    uint8_t *fstate = (uint8_t *)c->fstate;
    uint32_t *fowner = (uint32_t *)c->fowner;
    uint64_t *fgpa = (uint64_t *)c->fgpa;
    uint8_t *dirty = (uint8_t *)c->dirty;
    int dg = g->digest != 0;     /* the digest design: check and keep the line hashes */

    /* -- arguments (the same checks as _map_checks, in any order: any
     *    failure declines, and the Python handler names the status) -- */
    if (!g->accepting || (level != 1 && level != 2) || (attrs & ~(ATTR_W | ATTR_X)))
        return 1;
    if (npages < 1 || npages > MAX_NPAGES)
        return 1;
    unsigned shift = level == 1 ? 12 : 21;
    uint64_t size = 1ULL << shift, total = (uint64_t)npages << shift;
    if ((gpa & (size - 1)) || gpa >= GPA_LIMIT || total > GPA_LIMIT - gpa)
        return 1;
    if ((hpa & (size - 1)) || hpa >= c->host_size || total > c->host_size - hpa)
        return 1;
    uint64_t lo = hpa >> 12, nfr = total >> 12;
    if (lo < c->fw_hi && lo + nfr > c->fw_lo)
        return 1;
    for (uint64_t f = lo; f < lo + nfr; f++) {
        uint8_t st = fstate[f];
        if (st != F_HV && !(st == F_PRIVATE && fowner[f] == g->handle))
            return 1;
    }

    /* -- integrity: the root pointer, then every line the walk reads -- */
    if ((ld64(mem + g->vmsa) & ADDR_MASK) != g->root)
        return 1;
    /* First the walk through the PSP's shadow copy alone (the path's tables),
     * asking for every line the checks will read on the way (the host copy's
     * line and its stored line hash): in a large table they are cache misses,
     * and asked for together they overlap instead of waiting one after the
     * other behind each SHA-256. Then the line checks, in the same order.
     * (The order of the checks is free: any failure declines, nothing has
     * changed yet.) */
    uint64_t path_t[4];
    int path_k[4], np = 0;
    uint64_t t = g->root;
    for (unsigned lvl = 4; lvl > level; lvl--) {
        int idx = (int)((gpa >> (12 + 9 * (lvl - 1))) & 511);
        const uint8_t *sh = shadow_of(c, t);
        if (!sh)
            return 1;
        if (dg) {
            const uint8_t *lh = lines_of(c, t);
            __builtin_prefetch(mem + t + (uint64_t)(idx >> 3) * LINE_BYTES);
            if (lh)
                __builtin_prefetch(lh + 32 * (idx >> 3));
            path_t[np] = t;
            path_k[np++] = idx >> 3;
        }
        uint64_t e = ld64(sh + 8 * idx);
        if (!(e & P_BIT) || (e & PS_BIT))       /* needs a new table / a large leaf */
            return 1;
        t = e & ADDR_MASK;
    }
    uint8_t *lsh = (uint8_t *)shadow_of(c, t);
    int idx = (int)((gpa >> (12 + 9 * (level - 1))) & 511);
    if (!lsh || (dg && !lines_of(c, t)) || idx + npages > 512)
        return 1;
    int k0 = idx >> 3, k1 = (int)((idx + npages - 1) >> 3);
    if (dg) {
        __builtin_prefetch(mem + t + (uint64_t)k0 * LINE_BYTES);
        __builtin_prefetch(lines_of(c, t) + 32 * k0);
        __builtin_prefetch(lsh + 8 * idx);
        __builtin_prefetch(dirty + (t >> 12), 1);
    }
    for (int i = 0; i < np; i++)
        if (!line_checked(c, lc, path_t[i], path_k[i]))
            return 1;
    for (int k = k0; dg && k <= k1; k++)
        if (!line_checked(c, lc, t, k))
            return 1;
    for (uint32_t i = 0; i < npages; i++)
        if (ld64(lsh + 8 * (idx + i)) & P_BIT)
            return 1;

    /* ---- all checks passed: commit ---- */
    scrub_frames(c, pr, hpa, total);
    uint64_t flags = P_BIT | U_BIT | ((attrs & ATTR_W) ? W_BIT : 0) |
                     ((attrs & ATTR_X) ? 0 : NX_BIT) | (level == 2 ? PS_BIT : 0) | g->leaf_extra;
    psp_write_leaves(mem, t, lsh, idx, (int)npages, hpa | flags, size);
    for (uint64_t j = 0; j < nfr; j++) {
        fstate[lo + j] = F_MAPPED;
        fowner[lo + j] = g->handle;
        fgpa[lo + j] = gpa + (j << 12);
    }
    if (dg) {
        for (int k = k0; k <= k1; k++)
            line_written(c, lc, t, k);
        /* stale merkle chunks: the leaf chunks written (the flush in merkle.py
         * carries the change up the tree: each parent's chunk above them) */
        if (!dirty[t >> 12] && c->dlog) {      /* newly stale: the flush's to-do */
            if (c->dlog_n < c->dlog_cap)
                c->dlog[c->dlog_n++] = t;
            else
                c->dlog_over = 1;
        }
        for (int j = idx >> 6; j <= (int)((idx + npages - 1) >> 6); j++)
            dirty[t >> 12] |= (uint8_t)(1u << j);
    }
    g->mapped_pages += nfr;
    return 0;
}

int psp_update_fast(struct psp_ctx *c, struct psp_guest *g, uint32_t level, uint64_t gpa,
                    uint64_t hpa, uint32_t attrs, uint32_t npages)
{
    return update_fast(c, g, level, gpa, hpa, attrs, npages, NULL, NULL);
}

/* The fast path's record of guest `handle`: slot handle % 64 if it is
 * there (the usual case), else wherever psp.py put it (NULL: the Python
 * path answers) */
static struct psp_guest *ring_guest(const struct psp_ctx *c, uint32_t handle)
{
    struct psp_guest *g = c->ring_guests[handle & 63];
    if (g && g->handle == handle)
        return g;
    for (int k = 0; k < 64; k++) {
        g = c->ring_guests[k];
        if (g && g->handle == handle)
            return g;
    }
    return NULL;
}

/* An UPDATE_NPT command buffer (32 bytes: handle, level, gpa, hpa, attrs,
 * npages) through the fast path, for a guest the ring table knows.
 * Returns npages (>= 1) when committed, 0 when declined (nothing changed),
 * PSP_NO_RECORD when the guest has no fast-path record in the ring table. */
static uint32_t update_from_buf(struct psp_ctx *c, const uint8_t *buf, struct line_cache *lc,
                                struct frame_probe *pr)
{
    uint8_t in[UPDATE_NPT_LEN];
    memcpy(in, buf, sizeof in);                /* a copy: the VMM may race us */
    uint32_t handle = ld32(in), npages = ld32(in + 28);
    struct psp_guest *g = ring_guest(c, handle);
    if (!g)
        return PSP_NO_RECORD;
    if (update_fast(c, g, ld32(in + 4), ld64(in + 8), ld64(in + 16), ld32(in + 24), npages, lc,
                    pr))
        return 0;
    return npages;
}

uint32_t psp_mailbox_update(struct psp_ctx *c, const uint8_t *buf)
{
    return update_from_buf(c, buf, NULL, NULL);
}

/* The merkle flush's search for stale table pages (psp_firmware/merkle.py
 * _flush): the indices i < n whose page hpa[i] has a nonzero stale-chunk
 * mask, in order, into out; returns how many. One byte read per table page,
 * instead of a Python loop over every table page of the guest. */
uint32_t psp_dirty_scan(const uint8_t *dirty, const uint64_t *hpa, uint32_t n, uint32_t *out)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++)
        if (dirty[hpa[i] >> 12])
            out[k++] = i;
    return k;
}

/* The firmware's lock (struct psp_ctx.busy): commands are serialized, as the
 * real mailbox serializes them. A spin that yields: the holder is either the
 * Python mailbox (a handler, micro- to milliseconds) or another thread's
 * psp_shared_update (a microsecond). Called from Python through cffi, which
 * releases the GIL around the call, so a waiting Python thread never blocks
 * a holder that needs the GIL. */
void psp_lock(struct psp_ctx *c)
{
    unsigned spins = 0;
    while (__atomic_exchange_n(&c->busy, 1, __ATOMIC_ACQUIRE)) {
        if (++spins > 64) {
            sched_yield();
            spins = 0;
        }
    }
}

void psp_unlock(struct psp_ctx *c)
{
    c->lock_seq++;            /* (under the lock) another entry ran: psp_shared_update */
    __atomic_store_n(&c->busy, 0, __ATOMIC_RELEASE);
}

/* psp_mailbox_update for a caller in another C module that holds the lock
 * (the vCPU's NPF fast path, csrc/vcpu.c): the same checks and commit, and
 * the command counted, as the mailbox counts every command it answers.
 *
 * Its scrubs share one probe (c->shared_probe) from one such update to the
 * next for as long as no other entry takes the lock in between (lock_seq
 * unchanged: psp_unlock counts every other entry). Then nothing but these
 * updates has changed a frame's state since the probe looked, and they only
 * take frames HV/PRIVATE -> MAPPED: a frame the probe saw as a hole has had
 * no owner since but the VMM (whose writes are no different from writes
 * after the scrub: see the probe) or, once mapped, its guest, and a mapped
 * frame is never scrubbed again by this path (its update is declined).
 * Any other command (a RECLAIM, a pool donation, a launch) runs under
 * psp_lock/psp_unlock and so starts the next shared update on a fresh probe,
 * as a ring does. The line checks are never shared: every update checks
 * every line its walk reads, as through the mailbox. */
uint32_t psp_shared_update(struct psp_ctx *c, const uint8_t *buf)
{
    c->shared_commands++;
    if (c->probe_seq != c->lock_seq || c->shared_probe.limit != c->host_size) {
        probe_init(&c->shared_probe, (int)c->hole_kind, (int)c->hole_fd, 1, c->host_size);
        c->probe_seq = c->lock_seq;
    }
    return update_from_buf(c, buf, NULL, &c->shared_probe);
}

uint64_t psp_shared_update_addr(void)
{
    return (uint64_t)(uintptr_t)&psp_shared_update;
}

/* Answer ring entries [start, n) (psp_firmware/mailbox_layout.py) while they
 * are NOPs or UPDATE_NPTs the fast path takes; returns the index of the first entry
 * it did not answer (n when all were), which the caller answers through the
 * full mailbox. progress (may be NULL) gets the count answered so far. */
uint32_t psp_ring_fast(struct psp_ctx *c, uint8_t *ring, uint32_t start, uint32_t n,
                       uint32_t *progress)
{
    struct ring_state rs;
    memset(&rs.lc, 0, sizeof rs.lc);
    probe_init(&rs.probe, (int)c->hole_kind, (int)c->hole_fd, 1, c->host_size);
    uint32_t i;
    for (i = start; i < n; i++) {
        uint8_t *e = ring + (uint64_t)i * RING_ENTRY;
        uint32_t cmd = ld32(e), in_len = ld32(e + 4);
        if (cmd == CMD_NOP && in_len == 0) {       /* cmd_nop: SUCCESS, no output */
            st32(e + RE_OUT_LEN, 0);
        } else {
            if (cmd != CMD_UPDATE_NPT || in_len != UPDATE_NPT_LEN)
                break;
            uint32_t npages = update_from_buf(c, e + RE_IN, &rs.lc, &rs.probe);
            if (!npages || npages == PSP_NO_RECORD)
                break;
            st32(e + RE_OUT, npages);              /* done */
            st32(e + RE_OUT + 4, 0);               /* tables_used */
            st32(e + RE_OUT_LEN, 8);
        }
        __atomic_store_n((uint32_t *)(e + RE_STATUS), ST_SUCCESS | DONE_BIT, __ATOMIC_RELEASE);
        if (progress)
            __atomic_store_n(progress, i + 1, __ATOMIC_RELEASE);
    }
    lc_flush(c, &rs.lc);       /* every stored line hash matches its shadow again */
    return i;
}
