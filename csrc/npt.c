/*
 * NPT engine: the C fast path of nptcore (docs/ARCHITECTURE.md, "Engine API").
 *
 * Pure functions over host memory (mem, mem_size): HPA x is mem[x].  No Python
 * objects, no policy, no global state.  nptcore/pyengine.py is the twin and
 * must give identical results (return values and bytes written); the tests in
 * tests/test_npt_engine.py compare the two.
 *
 * Memory safety: every entry read is inside [0, mem_size): a table address is
 * followed only when the whole 4 KiB page is inside memory, and a walk stops
 * (as a reserved-bit fault) on an entry that points outside memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "npt.h"

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define INLINE static inline __attribute__((always_inline))

/* keep in sync with nptcore/bits.py */
#define P   1ULL
#define W   2ULL
#define U   4ULL
#define A   0x20ULL
#define D   0x40ULL
#define PS  0x80ULL
#define NX  (1ULL << 63)
#define ADDR_MASK  0x000FFFFFFFFFF000ULL
#define GPA_LIMIT  (1ULL << 48)
#define HPA_LIMIT  (1ULL << 52)
#define RSVD_HI    0x7FF0000000000000ULL
#define RSVD_2M    0x00000000001FE000ULL
#define RSVD_1G    0x000000003FFFE000ULL
#define TABLE_FLAGS (P | W | U)
#define LEAF_FLAGS_ALLOWED (0xFFFULL | NX)

#define ACC_R 0
#define ACC_W 1
#define ACC_X 2

#define PF_P     1ULL
#define PF_W     2ULL
#define PF_U     4ULL
#define PF_RSV   8ULL
#define PF_ID    16ULL
#define PF_FINAL (1ULL << 32)
#define PF_WALK  (1ULL << 33)
#define PF_RMP   (1ULL << 31)
#define PF_SIZEM (1ULL << 35)

/* RMP entries (npt.h, nptcore/rmp.py) */
#define RMP_ASSIGNED  1ULL
#define RMP_SIZE_MASK 6ULL
#define RMP_GPA_MASK  0x0000FFFFFFFFF000ULL
#define RMP_ASID_MAX  0xFFFFULL

#define INST_OK          0
#define INST_MAPPED      1
#define INST_NEED_TABLES 2
#define INST_BAD_ARG     3
#define CLR_NOT_MAPPED   4

#define MODE_32    2
#define MODE_PAE   3
#define MODE_LONG4 4

#define K_OK       0
#define K_NPF      1
#define K_GUEST_PF 2

#define GUEST_ADDR_MASK 0x0000FFFFFFFFF000ULL
#define G_RSVD_LONG  0x000F000000000000ULL
#define G_RSVD_PAE   0x7FFF000000000000ULL
#define G_RSVD_PDPTE 0xFFFF0000000001E6ULL
#define G_RSVD_4M    (1ULL << 21)

INLINE uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
INLINE uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
INLINE void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Sets `bit` (one or more bits) in the aligned 64-bit entry at p unless all
 * are already set.
 * Atomic, as the hardware walker's A/D update, so that it cannot undo a
 * concurrent writer's store to the same entry. */
INLINE void set_bit64(uint8_t *p, uint64_t bit)
{
    uint64_t *q = (uint64_t *)(void *)p;
    if ((__atomic_load_n(q, __ATOMIC_RELAXED) & bit) != bit)
        __atomic_fetch_or(q, bit, __ATOMIC_RELAXED);
}

INLINE void set_bit32(uint8_t *p, uint32_t bit)
{
    uint32_t *q = (uint32_t *)(void *)p;
    if ((__atomic_load_n(q, __ATOMIC_RELAXED) & bit) != bit)
        __atomic_fetch_or(q, bit, __ATOMIC_RELAXED);
}

INLINE int root_ok(uint64_t root, uint64_t mem_size)
{
    return mem_size >= 4096 && !(root & 0xFFF) && root <= mem_size - 4096;
}

/* ------------------------------------------------------------------------ */
/* 1D walk                                                                  */

typedef struct {
    uint64_t off[4];   /* offsets of the entries traversed, root level first */
    uint64_t andb;     /* AND of the traversed entries (W, U, A) */
    int n;             /* number of entries traversed */
} npt_path;

static __attribute__((noinline, cold)) int
walk_fail(npt_walk_result *r, int level, uint64_t entry, uint64_t bits, int access)
{
    r->ok = 0;
    r->hpa = 0;
    r->level = level;
    r->entry = entry;
    r->errcode = PF_U | PF_FINAL | bits | (access == ACC_W ? PF_W : 0)
                 | (access == ACC_X ? PF_ID : 0);
    return 0;
}

INLINE int is_pow2(uint64_t x) { return (x & (x - 1)) == 0; }

/* The RMP check (npt.h): 0, or the fault bits.  The entries are the PSP's
 * (another process may be writing them): one relaxed atomic load. */
INLINE uint64_t rmp_bits(const npt_rmp *rmp, uint64_t hpa, uint64_t gpa, int level)
{
    uint64_t pfn = hpa >> 12, have = 0, want;
    if (unlikely(rmp->asid > RMP_ASID_MAX))
        return PF_RMP;
    want = RMP_ASSIGNED | ((uint64_t)level << 1) | (gpa & RMP_GPA_MASK)
           | (rmp->asid << 48);
    if (likely(pfn < rmp->nframes))
        have = __atomic_load_n(&rmp->entries[pfn], __ATOMIC_RELAXED);
    if (likely(have == want))
        return 0;
    return ((have ^ want) & ~RMP_SIZE_MASK) ? PF_RMP : (PF_RMP | PF_SIZEM);
}

uint64_t npt_rmp_check(const npt_rmp *rmp, uint64_t hpa, uint64_t gpa, int level)
{
    return rmp_bits(rmp, hpa, gpa, level);
}

/* After a successful walk of gpa into *r: with an RMP, check the final
 * frame; a mismatch turns *r into the nested fault (nothing written yet). */
INLINE int rmp_after(const npt_rmp *rmp, uint64_t gpa, int access, npt_walk_result *r)
{
    uint64_t bits;
    if (rmp == NULL)
        return 1;
    bits = rmp_bits(rmp, r->hpa, gpa, r->level);
    if (likely(!bits))
        return 1;
    return walk_fail(r, r->level, r->entry, PF_P | bits, access);
}

/* The walk without A/D updates, for a valid root and gpa < GPA_LIMIT:
 * fills *r, and on a hit path->andb, plus path->off/n when `record`.
 * `record` and `pow2` are constants at each call site: the batch loop does
 * not record (its hits store nothing); when mem_size is a power of two the
 * "points outside memory" test of table pointers and 4 KiB leaves merges
 * into the present/reserved mask test (both faults are PF_P|PF_RSV, so the
 * result is the same). */
INLINE int walk_body(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                     uint64_t gpa, int access, npt_walk_result *r,
                     npt_path *path, int record, int pow2)
{
    uint64_t table = root, andb = ~0ULL, orb = 0, e = 0, size = 4096;
    uint64_t lim = mem_size - 4096;
    uint64_t chk = P | RSVD_HI | (pow2 ? (ADDR_MASK & ~(mem_size - 1)) : 0);
    int level = 4;

#pragma GCC unroll 4
    for (level = 4; level >= 1; level--) {
        uint64_t off = table + ((gpa >> (9 * level)) & 0xFF8);
        e = ld64(mem + off);
        if (record)
            path->off[4 - level] = off;
        if (unlikely((e & chk) != P))
            return walk_fail(r, level, e, (e & P) ? (PF_P | PF_RSV) : 0, access);
        andb &= e;
        orb |= e;
        if (level == 1) {
            size = 1ULL << 12;
            break;
        }
        if (e & PS) {
            if (level == 4)
                return walk_fail(r, level, e, PF_P | PF_RSV, access);
            if (level == 3) {
                if (e & RSVD_1G)
                    return walk_fail(r, level, e, PF_P | PF_RSV, access);
                size = 1ULL << 30;
            } else {
                if (e & RSVD_2M)
                    return walk_fail(r, level, e, PF_P | PF_RSV, access);
                size = 1ULL << 21;
            }
            break;
        }
        table = e & ADDR_MASK;
        if (!pow2 && unlikely(table > lim))
            return walk_fail(r, level, e, PF_P | PF_RSV, access);
    }
    {
        uint64_t base = e & ADDR_MASK & ~(size - 1);
        /* branch-free (the access kinds of a batch are not predictable) */
        uint64_t need = U | ((uint64_t)(access == ACC_W) << 1);
        uint64_t nx_hit = orb & ((uint64_t)(access == ACC_X) << 63);
        if ((!pow2 || size > 4096)
            && unlikely(size > mem_size || base > mem_size - size))
            return walk_fail(r, level, e, PF_P | PF_RSV, access);
        if (unlikely(((andb & need) ^ need) | nx_hit))
            return walk_fail(r, level, e, PF_P, access);
        path->n = 5 - level;
        path->andb = andb;
        r->ok = 1;
        r->hpa = base | (gpa & (size - 1));
        r->level = level;
        r->entry = e;
        r->errcode = 0;
        return 1;
    }
}

/* The walk without A/D updates: fills *r, and on a hit *path. */
INLINE int walk_core(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                     uint64_t gpa, int access, npt_walk_result *r,
                     npt_path *path)
{
    if (unlikely(gpa >= GPA_LIMIT || !root_ok(root, mem_size)))
        return walk_fail(r, 4, 0, PF_RSV, access);
    if (is_pow2(mem_size))
        return walk_body(mem, mem_size, root, gpa, access, r, path, 1, 1);
    return walk_body(mem, mem_size, root, gpa, access, r, path, 1, 0);
}

static __attribute__((noinline)) void
apply_ad_slow(uint8_t *mem, const npt_path *path, int dirty)
{
    int i;
    for (i = 0; i < path->n; i++)
        set_bit64(mem + path->off[i], A);
    if (dirty)
        set_bit64(mem + path->off[path->n - 1], D);
}

/* Nothing to update: A on every traversed entry, D on the leaf if dirty. */
INLINE int ad_done(const npt_path *path, uint64_t leaf, int dirty)
{
    /* branch-free: the access kinds of a batch are not predictable */
    uint64_t need_d = (uint64_t)(dirty != 0) << 6;
    return ((path->andb & A) | ((leaf & need_d) ^ need_d)) == A;
}

/* A on every traversed entry, D on the leaf for a write (if not yet set). */
INLINE void apply_ad(uint8_t *mem, const npt_path *path, uint64_t leaf, int dirty)
{
    if (likely(ad_done(path, leaf, dirty)))
        return;
    apply_ad_slow(mem, path, dirty);
}

INLINE int walk_impl(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
                     int access, int set_ad, const npt_rmp *rmp, npt_walk_result *out)
{
    npt_path path;
    if (!walk_core(mem, mem_size, root, gpa, access, out, &path)
        || !rmp_after(rmp, gpa, access, out))
        return -out->level;
    if (set_ad && unlikely(!ad_done(&path, out->entry, access == ACC_W))) {
        apply_ad_slow(mem, &path, access == ACC_W);
        out->entry = ld64(mem + path.off[path.n - 1]);   /* with A/D now */
    }
    return out->level;
}

int npt_walk(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
             int access, int set_ad, npt_walk_result *out)
{
    return walk_impl(mem, mem_size, root, gpa, access, set_ad, NULL, out);
}

int npt_walk_rmp(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
                 int access, int set_ad, const npt_rmp *rmp, npt_walk_result *out)
{
    return walk_impl(mem, mem_size, root, gpa, access, set_ad, rmp, out);
}

npt_walk_result npt_walk_v(uint8_t *mem, uint64_t mem_size, uint64_t root,
                           uint64_t gpa, int access, int set_ad)
{
    npt_walk_result r;
    r.level = npt_walk(mem, mem_size, root, gpa, access, set_ad, &r);
    return r;
}

npt_walk_result npt_walk_rmp_v(uint8_t *mem, uint64_t mem_size, uint64_t root,
                               uint64_t gpa, int access, int set_ad, const npt_rmp *rmp)
{
    npt_walk_result r;
    r.level = npt_walk_rmp(mem, mem_size, root, gpa, access, set_ad, rmp, &r);
    return r;
}

/* One walk of the batch, exactly as if alone: walk, A/D, store.  0 on a miss
 * (then *miss describes it). */
INLINE int batch_one(uint8_t *mem, uint64_t mem_size, uint64_t root,
                     uint64_t gpa, int acc, uint64_t *out_hpa,
                     npt_walk_result *miss, int set_ad, int pow2,
                     const npt_rmp *rmp)
{
    npt_path path;
    npt_walk_result r;
    path.andb = 0;
    if (unlikely(gpa >= GPA_LIMIT)) {
        walk_fail(miss, 4, 0, PF_RSV, acc);
        return 0;
    }
    if (unlikely(!walk_body(mem, mem_size, root, gpa, acc, &r, &path, 0, pow2)
                 || !rmp_after(rmp, gpa, acc, &r))) {
        *miss = r;
        return 0;
    }
    if (set_ad && unlikely(!ad_done(&path, r.entry, acc == ACC_W))) {
        /* rare: walk again recording the path, then set A/D */
        npt_path rec;
        npt_walk_result r2;
        if (walk_body(mem, mem_size, root, gpa, acc, &r2, &rec, 1, pow2))
            apply_ad_slow(mem, &rec, acc == ACC_W);
    }
    *out_hpa = r.hpa;
    return 1;
}

/* The walks one at a time (small batches, tails, aliased arguments). */
INLINE uint64_t batch_serial(uint8_t *mem, uint64_t mem_size, uint64_t root,
                             const uint64_t *gpas, const uint8_t *accesses,
                             uint64_t *out_hpas, uint64_t i, uint64_t n,
                             npt_walk_result *miss, int set_ad, int pow2,
                             const npt_rmp *rmp)
{
    for (; i < n; i++)
        if (!batch_one(mem, mem_size, root, gpas[i], accesses[i], &out_hpas[i],
                       miss, set_ad, pow2, rmp))
            return i;
    return n;
}

/*
 * Memory-level parallelism.  With tables bigger than the caches every walk
 * is a chain of dependent cache misses, and walked one after the other,
 * little of two walks' misses overlap.  So the batch is software-pipelined:
 * at step i,
 *   stage 1 reads walk i+PIPE_D's level-4, -3 and -2 entries (the upper
 *           levels: few pages, hot) and prefetches its level-1 entry,
 *   stage 2 reads walk i's level-1 entry (prefetched PIPE_D steps earlier)
 *           and commits walk i,
 * so the level-1 misses of about PIPE_D walks are in flight at once, and a
 * prefetch does not hold up the instructions after it as a load would.
 *
 * The stages only read: they are a speculative walk that recognises the
 * common case, a 4 KiB leaf, no fault, and nothing to update (A already set
 * on the whole path, and D on the leaf for a write).  Commits are in order: a
 * walk in the common case just stores its translation; any other walk (fault,
 * large page, A/D to set, gpa beyond GPA_LIMIT) is done again by batch_one
 * at its turn, which gives exactly the sequential result (including the
 * entry reported on a miss, read after the A/D updates of the walks before
 * it) and ends the batch on a miss, before any store for a later walk.
 *
 * Why a speculative result stays right although earlier walks may set A/D
 * bits after it was read: the only bytes a walk writes (out_hpas aside) are
 * A/D bits, which take part neither in the fault checks nor in the
 * addresses; and setting bits can only turn "A/D to set" into "nothing to
 * set", never the other way.  (npt_walk_batch checks that out_hpas, gpas and
 * accesses overlap neither host memory nor one another, so that no store
 * can change a later walk's input.)
 *
 * All the checks of one walk fold into one word `bad`: every entry must have
 * all of `want` (P, U, W for a write, A when setting A/D; D on the leaf of a
 * write) and none of `forbid` (reserved bits 52..62, address bits beyond
 * memory when its size is a power of two, NX for a fetch, PS above level 1).
 * A walk that went bad goes on from HPA 0 (inside memory): speculative loads
 * only read inside [0, mem_size), and only entries the walk itself would
 * read, or page 0.
 */
#define PIPE_D 16                    /* prefetch distance, in walks */
#define PIPE_R (2 * PIPE_D)          /* ring of per-walk state, a power of 2 */
#define PIPE_BATCH_MIN 8             /* smaller batches: one walk at a time */

typedef struct {
    uint64_t want, mask;   /* mask = want | forbid */
} lane_bits;

/* by access kind: W that it needs, NX that it forbids (a table: branch-free,
 * as the access kinds of a batch are not predictable) */
static const uint64_t acc_bits[256] = { [ACC_W] = W, [ACC_X] = NX };

INLINE lane_bits lane_setup(int acc, uint64_t forbid, int set_ad)
{
    lane_bits lb;
    uint64_t ab = acc_bits[acc & 0xFF];
    lb.want = P | U | (ab & W) | (set_ad ? A : 0);
    lb.mask = lb.want | forbid | ab;
    return lb;
}

/* One table level: check e, return the next table (0 once bad). */
INLINE uint64_t lane_step(uint64_t e, lane_bits lb, uint64_t *bad,
                          uint64_t lim, int pow2)
{
    uint64_t nt = e & ADDR_MASK;
    uint64_t b = *bad | ((e & (lb.mask | PS)) ^ lb.want);
    if (!pow2)
        b |= nt > lim;
    *bad = b;
    return b ? 0 : nt;
}

INLINE uint64_t batch_loop(uint8_t *mem, uint64_t mem_size, uint64_t root,
                           const uint64_t *gpas, const uint8_t *accesses,
                           uint64_t *out_hpas, uint64_t n,
                           npt_walk_result *miss, int set_ad, int pow2,
                           const npt_rmp *rmp)
{
    /* per walk: the level-1 entry's offset, | 1 when the walk went bad;
     * and want | NX for a fetch (mask = that | forbid) */
    uint64_t off[PIPE_R], lane[PIPE_R];
    uint64_t lim = mem_size - 4096;
    uint64_t forbid = RSVD_HI | (pow2 ? (ADDR_MASK & ~(mem_size - 1)) : 0);
    uint64_t i, k;

/* stage 1 for walk k: levels 4..2, prefetch of the level-1 entry */
#define STAGE1(k) do {                                                        \
        uint64_t s_ = (k) & (PIPE_R - 1);                                     \
        uint64_t g_ = gpas[k], b_ = g_ >> 48, t_;                            \
        lane_bits lb_ = lane_setup(accesses[k], forbid, set_ad);              \
        t_ = lane_step(ld64(mem + root + ((g_ >> 36) & 0xFF8)), lb_, &b_,    \
                       lim, pow2);                                            \
        t_ = lane_step(ld64(mem + t_ + ((g_ >> 27) & 0xFF8)), lb_, &b_,      \
                       lim, pow2);                                            \
        t_ = lane_step(ld64(mem + t_ + ((g_ >> 18) & 0xFF8)), lb_, &b_,      \
                       lim, pow2);                                            \
        t_ += (g_ >> 9) & 0xFF8;                                              \
        __builtin_prefetch(mem + t_);                                         \
        off[s_] = t_ | (b_ != 0);                                             \
        lane[s_] = lb_.want | (lb_.mask & NX);                                \
    } while (0)
/* stage 2 for walk i: level 1, commit */
#define STAGE2(i) do {                                                        \
        uint64_t s_ = (i) & (PIPE_R - 1), g_ = gpas[i], e_, b_, w_, o_, l_;  \
        o_ = off[s_];                                                         \
        l_ = lane[s_];                                                        \
        w_ = l_ & 0xFFF;                                                      \
        if (set_ad)                                                           \
            w_ |= (w_ & W) << 5;                           /* D for a write */\
        e_ = ld64(mem + (o_ & ~7ULL));                                        \
        b_ = (o_ & 1) | ((e_ & (l_ | forbid | w_)) ^ w_);   /* PS: PAT here */\
        if (!pow2)                                                            \
            b_ |= (e_ & ADDR_MASK) > lim;                                     \
        if (likely(!b_) && (rmp == NULL                                       \
                            || likely(!rmp_bits(rmp, e_ & ADDR_MASK, g_, 1))))\
            out_hpas[i] = (e_ & ADDR_MASK) | (g_ & 0xFFF);                   \
        else if (!batch_one(mem, mem_size, root, g_, accesses[i],            \
                            &out_hpas[i], miss, set_ad, pow2, rmp))          \
            return (i);                                                       \
    } while (0)

    for (k = 0; k < PIPE_D && k < n; k++)
        STAGE1(k);
    for (i = 0; i + PIPE_D < n; i++) {
        STAGE1(i + PIPE_D);
        STAGE2(i);
    }
    for (; i < n; i++)
        STAGE2(i);
#undef STAGE1
#undef STAGE2
    return n;
}

/* Do the byte ranges [a, a+na) and [b, b+nb) overlap? */
INLINE int overlap(const void *a, uint64_t na, const void *b, uint64_t nb)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + nb && y < x + na;
}

static __attribute__((noinline)) uint64_t
batch_serial_any(uint8_t *mem, uint64_t mem_size, uint64_t root,
                 const uint64_t *gpas, const uint8_t *accesses,
                 uint64_t *out_hpas, uint64_t n, int set_ad,
                 const npt_rmp *rmp, npt_walk_result *miss)
{
    int pow2 = is_pow2(mem_size);
    if (pow2 && set_ad)
        return batch_serial(mem, mem_size, root, gpas, accesses, out_hpas, 0, n, miss, 1, 1, rmp);
    if (pow2)
        return batch_serial(mem, mem_size, root, gpas, accesses, out_hpas, 0, n, miss, 0, 1, rmp);
    if (set_ad)
        return batch_serial(mem, mem_size, root, gpas, accesses, out_hpas, 0, n, miss, 1, 0, rmp);
    return batch_serial(mem, mem_size, root, gpas, accesses, out_hpas, 0, n, miss, 0, 0, rmp);
}

/* rmp: NULL (a constant at the call sites of npt_walk_batch: no check
 * compiled in) or the RMP every translation is checked against. */
INLINE uint64_t walk_batch_impl(uint8_t *mem, uint64_t mem_size, uint64_t root,
                                const uint64_t *gpas, const uint8_t *accesses,
                                uint64_t *out_hpas, uint64_t n, int set_ad,
                                const npt_rmp *rmp, npt_walk_result *miss)
{
    if (n == 0)
        return 0;
    if (unlikely(!root_ok(root, mem_size))) {
        walk_fail(miss, 4, 0, PF_RSV, accesses[0]);
        return 0;
    }
    /* The pipelined walk reads inputs PIPE_D walks ahead: when an input
     * could be changed by an earlier walk's stores (to out_hpas, or A/D bits
     * in host memory), walk strictly one at a time.  out_hpas == gpas (in
     * place) is fine: a store only replaces an input already read. */
    if (unlikely(n < PIPE_BATCH_MIN
                 || overlap(gpas, 8 * n, mem, mem_size)
                 || overlap(accesses, n, mem, mem_size)
                 || overlap(out_hpas, 8 * n, mem, mem_size)
                 || overlap(out_hpas, 8 * n, accesses, n)
                 || (out_hpas != gpas && overlap(out_hpas, 8 * n, gpas, 8 * n))))
        return batch_serial_any(mem, mem_size, root, gpas, accesses, out_hpas,
                                n, set_ad, rmp, miss);
    if (is_pow2(mem_size)) {
        if (set_ad)
            return batch_loop(mem, mem_size, root, gpas, accesses, out_hpas, n, miss, 1, 1, rmp);
        return batch_loop(mem, mem_size, root, gpas, accesses, out_hpas, n, miss, 0, 1, rmp);
    }
    if (set_ad)
        return batch_loop(mem, mem_size, root, gpas, accesses, out_hpas, n, miss, 1, 0, rmp);
    return batch_loop(mem, mem_size, root, gpas, accesses, out_hpas, n, miss, 0, 0, rmp);
}

uint64_t npt_walk_batch(uint8_t *mem, uint64_t mem_size, uint64_t root,
                        const uint64_t *gpas, const uint8_t *accesses,
                        uint64_t *out_hpas, uint64_t n, int set_ad,
                        npt_walk_result *miss)
{
    return walk_batch_impl(mem, mem_size, root, gpas, accesses, out_hpas, n, set_ad,
                           NULL, miss);
}

uint64_t npt_walk_batch_rmp(uint8_t *mem, uint64_t mem_size, uint64_t root,
                            const uint64_t *gpas, const uint8_t *accesses,
                            uint64_t *out_hpas, uint64_t n, int set_ad,
                            const npt_rmp *rmp, npt_walk_result *miss)
{
    return walk_batch_impl(mem, mem_size, root, gpas, accesses, out_hpas, n, set_ad,
                           rmp, miss);
}

uint64_t npt_floor_walk_batch(const uint8_t *mem, uint64_t root,
                              const uint64_t *gpas, uint64_t *out_hpas,
                              uint64_t n)
{
    uint64_t i;
    for (i = 0; i < n; i++) {
        uint64_t gpa = gpas[i], t = root;
        t = ld64(mem + t + ((gpa >> 36) & 0xFF8)) & ADDR_MASK;
        t = ld64(mem + t + ((gpa >> 27) & 0xFF8)) & ADDR_MASK;
        t = ld64(mem + t + ((gpa >> 18) & 0xFF8)) & ADDR_MASK;
        t = ld64(mem + t + ((gpa >> 9) & 0xFF8)) & ADDR_MASK;
        out_hpas[i] = t | (gpa & 0xFFF);
    }
    return n;
}

/* ------------------------------------------------------------------------ */
/* install / clear                                                          */

enum { PATH_SLOT, PATH_NEED, PATH_BLOCKED };

/* Descends to the table holding gpa's entry at `level`.  PATH_SLOT: *slot is
 * the offset of that entry.  PATH_NEED: *slot is the offset of the absent
 * entry at *miss_level.  PATH_BLOCKED: a present entry on the way is a large
 * leaf, has reserved bits 52..62 set, has PS at level 4, or points outside
 * memory. */
static int descend(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                   uint64_t gpa, int level, uint64_t *slot, int *miss_level)
{
    uint64_t lim = mem_size - 4096, table = root;
    int L;
    for (L = 4; L > level; L--) {
        uint64_t off = table + ((gpa >> (9 * L)) & 0xFF8);
        uint64_t e = ld64(mem + off);
        if (!(e & P)) {
            *slot = off;
            *miss_level = L;
            return PATH_NEED;
        }
        if ((e & (PS | RSVD_HI)) || (e & ADDR_MASK) > lim)
            return PATH_BLOCKED;
        table = e & ADDR_MASK;
    }
    *slot = table + ((gpa >> (9 * level)) & 0xFF8);
    *miss_level = 0;
    return PATH_SLOT;
}

INLINE int gpa_arg_ok(uint64_t mem_size, uint64_t root, uint64_t gpa, int level)
{
    uint64_t size;
    if (level != 1 && level != 2)
        return 0;
    size = level == 1 ? (1ULL << 12) : (1ULL << 21);
    return root_ok(root, mem_size) && gpa < GPA_LIMIT && !(gpa & (size - 1));
}

int npt_tables_needed(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                      uint64_t gpa, int level, int *n)
{
    uint64_t slot;
    int miss_level, st;
    *n = 0;
    if (!gpa_arg_ok(mem_size, root, gpa, level))
        return INST_BAD_ARG;
    st = descend(mem, mem_size, root, gpa, level, &slot, &miss_level);
    if (st == PATH_BLOCKED)
        return INST_MAPPED;
    if (st == PATH_SLOT)
        return (ld64(mem + slot) & P) ? INST_MAPPED : INST_OK;
    *n = miss_level - level;
    return INST_OK;
}

int npt_install(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
                uint64_t hpa, int level, uint64_t leaf_flags,
                const uint64_t *spares, int n_spares, int *n_used)
{
    uint64_t slot, size, lim;
    int miss_level, st, need, i, j;

    *n_used = 0;
    if (!gpa_arg_ok(mem_size, root, gpa, level))
        return INST_BAD_ARG;
    size = level == 1 ? (1ULL << 12) : (1ULL << 21);
    if ((hpa & (size - 1)) || hpa >= HPA_LIMIT || size > mem_size
        || hpa > mem_size - size)
        return INST_BAD_ARG;
    if ((leaf_flags & ~LEAF_FLAGS_ALLOWED) || !(leaf_flags & P)
        || (level == 2 && !(leaf_flags & PS)))
        return INST_BAD_ARG;

    st = descend(mem, mem_size, root, gpa, level, &slot, &miss_level);
    if (st == PATH_BLOCKED)
        return INST_MAPPED;
    if (st == PATH_SLOT) {
        if (ld64(mem + slot) & P)
            return INST_MAPPED;
        st64(mem + slot, hpa | leaf_flags);
        return INST_OK;
    }
    need = miss_level - level;
    if (n_spares < need) {
        *n_used = need;
        return INST_NEED_TABLES;
    }
    lim = mem_size - 4096;
    for (i = 0; i < need; i++) {
        if ((spares[i] & 0xFFF) || spares[i] > lim)
            return INST_BAD_ARG;
        for (j = 0; j < i; j++)
            if (spares[j] == spares[i])
                return INST_BAD_ARG;
    }
    /* build the new subtree, then link it in with one store */
    for (i = 0; i < need; i++)
        memset(mem + spares[i], 0, 4096);
    for (i = 0; i < need; i++) {
        int L = miss_level - 1 - i;   /* level of the table spares[i] */
        uint64_t off = spares[i] + ((gpa >> (9 * L)) & 0xFF8);
        st64(mem + off, i + 1 < need ? (spares[i + 1] | TABLE_FLAGS)
                                     : (hpa | leaf_flags));
    }
    st64(mem + slot, spares[0] | TABLE_FLAGS);
    *n_used = need;
    return INST_OK;
}

int npt_clear(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
              int level, uint64_t *old_entry)
{
    uint64_t slot, e;
    int miss_level;
    *old_entry = 0;
    if (!gpa_arg_ok(mem_size, root, gpa, level))
        return INST_BAD_ARG;
    if (descend(mem, mem_size, root, gpa, level, &slot, &miss_level) != PATH_SLOT)
        return CLR_NOT_MAPPED;
    e = ld64(mem + slot);
    if (!(e & P) || (level == 2 && !(e & PS)))
        return CLR_NOT_MAPPED;
    st64(mem + slot, 0);
    *old_entry = e;
    return INST_OK;
}

/* ------------------------------------------------------------------------ */
/* traversal: mappings, table pages                                          */

typedef struct {
    const uint8_t *mem;
    uint64_t lim;
    uint8_t *visited;   /* one bit per 4 KiB frame */
    uint64_t *out;      /* mappings: 4 words per leaf; table pages: hpas */
    uint8_t *out_level;
    uint64_t cap;
    uint64_t count;
} trav;

/* Marks a frame visited; returns 1 if it already was. */
INLINE int visit(trav *t, uint64_t hpa)
{
    uint64_t f = hpa >> 12;
    uint8_t m = (uint8_t)(1u << (f & 7));
    if (t->visited[f >> 3] & m)
        return 1;
    t->visited[f >> 3] |= m;
    return 0;
}

static void trav_maps(trav *t, uint64_t table, int level, uint64_t gpa_base)
{
    int i;
    for (i = 0; i < 512; i++) {
        uint64_t e = ld64(t->mem + table + 8 * (uint64_t)i), gpa, next;
        if (!(e & P))
            continue;
        gpa = gpa_base | ((uint64_t)i << (3 + 9 * level));
        if (level == 1 || (level <= 3 && (e & PS))) {
            uint64_t size = 1ULL << (3 + 9 * level);
            if (t->count < t->cap) {
                uint64_t *o = t->out + 4 * t->count;
                o[0] = gpa;
                o[1] = e & ADDR_MASK & ~(size - 1);
                o[2] = size;
                o[3] = e;
            }
            t->count++;
            continue;
        }
        next = e & ADDR_MASK;
        if (next > t->lim || visit(t, next))
            continue;
        trav_maps(t, next, level - 1, gpa);
    }
}

static void trav_tables(trav *t, uint64_t table, int level)
{
    int i;
    if (t->count < t->cap) {
        t->out[t->count] = table;
        t->out_level[t->count] = (uint8_t)level;
    }
    t->count++;
    if (level == 1)
        return;
    for (i = 0; i < 512; i++) {
        uint64_t e = ld64(t->mem + table + 8 * (uint64_t)i), next;
        if (!(e & P) || (level <= 3 && (e & PS)))
            continue;
        next = e & ADDR_MASK;
        if (next > t->lim || visit(t, next))
            continue;
        trav_tables(t, next, level - 1);
    }
}

static int trav_init(trav *t, const uint8_t *mem, uint64_t mem_size, uint64_t root)
{
    t->mem = mem;
    t->lim = mem_size - 4096;
    t->count = 0;
    t->visited = calloc((size_t)((mem_size >> 15) + 1), 1);
    if (!t->visited)
        return -1;
    visit(t, root);
    return 0;
}

int64_t npt_mappings(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                     uint64_t *out, uint64_t cap)
{
    trav t;
    if (!root_ok(root, mem_size))
        return 0;
    if (trav_init(&t, mem, mem_size, root))
        return -1;
    t.out = out;
    t.out_level = NULL;
    t.cap = cap;
    trav_maps(&t, root, 4, 0);
    free(t.visited);
    return (int64_t)t.count;
}

int64_t npt_table_pages(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                        uint64_t *out_hpa, uint8_t *out_level, uint64_t cap)
{
    trav t;
    if (!root_ok(root, mem_size))
        return 0;
    if (trav_init(&t, mem, mem_size, root))
        return -1;
    t.out = out_hpa;
    t.out_level = out_level;
    t.cap = cap;
    trav_tables(&t, root, 4);
    free(t.visited);
    return (int64_t)t.count;
}

int npt_canon_page(const uint8_t *mem, uint64_t mem_size, uint64_t hpa,
                   uint8_t *out)
{
    int i;
    if (!root_ok(hpa, mem_size))
        return -1;
    memcpy(out, mem + hpa, 4096);
    for (i = 0; i < 4096; i += 8)
        out[i] &= (uint8_t)~(A | D);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* 2D walk                                                                  */

static int w2d_npf(npt_walk2d_result *out, uint64_t gpa, const npt_walk_result *r,
                   int during_walk)
{
    out->ok = 0;
    out->hpa = 0;
    out->gpa = gpa;
    out->kind = K_NPF;
    out->errcode = during_walk ? ((r->errcode & ~PF_FINAL) | PF_WALK) : r->errcode;
    out->level = r->level;
    return 0;
}

static int w2d_gpf(npt_walk2d_result *out, int level, uint64_t errcode)
{
    out->ok = 0;
    out->hpa = 0;
    out->gpa = 0;
    out->kind = K_GUEST_PF;
    out->errcode = errcode;
    out->level = level;
    return 0;
}

/* walk_core, then (with an RMP) the RMP check of the translation */
INLINE int walk_chk(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                    uint64_t gpa, int access, npt_walk_result *r,
                    npt_path *path, const npt_rmp *rmp)
{
    return walk_core(mem, mem_size, root, gpa, access, r, path)
           && rmp_after(rmp, gpa, access, r);
}

INLINE int walk2d_impl(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t cr3,
                       uint64_t va, int access, int mode, int set_ad,
                       const npt_rmp *rmp, npt_walk2d_result *out)
{
    int write = access == ACC_W, fetch = access == ACC_X;
    int nx_on = mode != MODE_32;
    uint64_t gerr = (write ? PF_W : 0) | ((fetch && nx_on) ? PF_ID : 0);
    uint64_t table, andb = ~0ULL, orb = 0, e = 0, size = 4096, gpa;
    npt_path tpath[4], fpath;
    uint64_t ehpa[4], tleaf[4], setbits[4];
    npt_walk_result r;
    int levels, L, ng = 0, esz = mode == MODE_32 ? 4 : 8, i;

    switch (mode) {
    case MODE_LONG4:
        table = cr3 & GUEST_ADDR_MASK;
        va &= (1ULL << 48) - 1;
        levels = 4;
        break;
    case MODE_PAE:
        table = cr3 & 0xFFFFFFE0ULL;
        va &= 0xFFFFFFFFULL;
        levels = 3;
        break;
    case MODE_32:
        table = cr3 & 0xFFFFF000ULL;
        va &= 0xFFFFFFFFULL;
        levels = 2;
        break;
    default:
        return -1;
    }

    for (L = levels; L >= 1; L--) {
        uint64_t eg, rsv = 0;
        int leaf = 0, pdpte = mode == MODE_PAE && L == 3;
        if (mode == MODE_32)
            eg = table + (((va >> (2 + 10 * L)) & 1023) << 2);
        else if (pdpte)
            eg = table + (((va >> 30) & 3) << 3);
        else
            eg = table + ((va >> (9 * L)) & 0xFF8);
        if (!walk_chk(mem, mem_size, root, eg, ACC_R, &r, &tpath[ng], rmp))
            return w2d_npf(out, eg, &r, 1);
        e = esz == 8 ? ld64(mem + r.hpa) : ld32(mem + r.hpa);
        ehpa[ng] = r.hpa;
        tleaf[ng] = r.entry;
        setbits[ng] = 0;
        ng++;
        if (!(e & P))
            return w2d_gpf(out, L, gerr);
        if (mode == MODE_LONG4) {
            rsv = e & G_RSVD_LONG;
            if (L == 4)
                rsv |= e & PS;
            else if (L == 1)
                leaf = 1, size = 1ULL << 12;
            else if (e & PS) {
                leaf = 1;
                size = L == 3 ? (1ULL << 30) : (1ULL << 21);
                rsv |= e & (L == 3 ? RSVD_1G : RSVD_2M);
            }
        } else if (mode == MODE_PAE) {
            if (pdpte)
                rsv = e & G_RSVD_PDPTE;
            else {
                rsv = e & G_RSVD_PAE;
                if (L == 1)
                    leaf = 1, size = 1ULL << 12;
                else if (e & PS)
                    leaf = 1, size = 1ULL << 21, rsv |= e & RSVD_2M;
            }
        } else {
            if (L == 1)
                leaf = 1, size = 1ULL << 12;
            else if (e & PS)
                leaf = 1, size = 1ULL << 22, rsv = e & G_RSVD_4M;
        }
        if (rsv)
            return w2d_gpf(out, L, gerr | PF_P | PF_RSV);
        if (!pdpte) {
            andb &= e;
            orb |= e;
        }
        if (leaf && ((write && !(andb & W)) || (fetch && nx_on && (orb & NX))))
            return w2d_gpf(out, L, gerr | PF_P);
        if (set_ad && !pdpte) {
            uint64_t nb = 0;
            if (!(e & A))
                nb |= A;
            if (leaf && write && !(e & D))
                nb |= D;
            if (nb) {
                /* the CPU will write this guest entry: NPT write permission */
                npt_path wp;
                npt_walk_result wr;
                if (!walk_chk(mem, mem_size, root, eg, ACC_W, &wr, &wp, rmp))
                    return w2d_npf(out, eg, &wr, 1);
                setbits[ng - 1] = nb;
            }
        }
        if (leaf)
            break;
        table = mode == MODE_32 ? (e & 0xFFFFF000ULL) : (e & GUEST_ADDR_MASK);
    }

    if (mode == MODE_32 && size == (1ULL << 22))
        gpa = (e & 0xFFC00000ULL) | (((e >> 13) & 0xFF) << 32) | (va & 0x3FFFFF);
    else
        gpa = (e & GUEST_ADDR_MASK & ~(size - 1)) | (va & (size - 1));

    if (!walk_chk(mem, mem_size, root, gpa, access, &r, &fpath, rmp))
        return w2d_npf(out, gpa, &r, 0);

    if (set_ad) {
        for (i = 0; i < ng; i++) {
            apply_ad(mem, &tpath[i], tleaf[i], setbits[i] != 0);
            if (setbits[i]) {
                if (esz == 8)
                    set_bit64(mem + ehpa[i], setbits[i]);
                else
                    set_bit32(mem + ehpa[i], (uint32_t)setbits[i]);
            }
        }
        apply_ad(mem, &fpath, r.entry, write);
    }
    out->ok = 1;
    out->hpa = r.hpa;
    out->gpa = gpa;
    out->kind = K_OK;
    out->errcode = 0;
    out->level = L;
    return 1;
}

int npt_walk2d(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t cr3,
               uint64_t va, int access, int mode, int set_ad,
               npt_walk2d_result *out)
{
    return walk2d_impl(mem, mem_size, root, cr3, va, access, mode, set_ad, NULL, out);
}

int npt_walk2d_rmp(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t cr3,
                   uint64_t va, int access, int mode, int set_ad,
                   const npt_rmp *rmp, npt_walk2d_result *out)
{
    return walk2d_impl(mem, mem_size, root, cr3, va, access, mode, set_ad, rmp, out);
}
