/*
 * NPT engine: pure C functions over host memory (uint8_t *mem, mem_size).
 * HPA x is mem[x].  No allocation except the visited bitmap of
 * npt_mappings/npt_table_pages, no global state, no policy.
 *
 * Semantics: docs/ARCHITECTURE.md ("Engine API"); the pure-Python twin is
 * nptcore/pyengine.py and must give identical results.  This header is also
 * the cffi cdef (csrc/build_npt.py), so it holds only plain declarations.
 */
#ifndef NPT_H
#define NPT_H
#include <stdint.h>

typedef struct {
    uint64_t hpa;
    uint64_t entry;
    uint64_t errcode;
    int32_t ok;
    int32_t level;
} npt_walk_result;

typedef struct {
    uint64_t hpa;
    uint64_t gpa;
    uint64_t errcode;
    int32_t ok;
    int32_t kind;
    int32_t level;
} npt_walk2d_result;

/* 1D walk of gpa through the NPT at root.  Returns the leaf level (> 0) on a
 * hit, minus the level where the walk stopped on a miss; *out is filled in
 * both cases.  On a hit out->entry is the leaf as it is after the A/D update. */
int npt_walk(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
             int access, int set_ad, npt_walk_result *out);

/* The same, returning the result by value (level < 0 on a miss): one
 * allocation less for the Python wrapper. */
npt_walk_result npt_walk_v(uint8_t *mem, uint64_t mem_size, uint64_t root,
                           uint64_t gpa, int access, int set_ad);

/* Walks gpas[0..n) in order, storing translations in out_hpas, and stops at
 * the first miss (described in *miss).  Returns the number of hits before it
 * (n when none missed). */
uint64_t npt_walk_batch(uint8_t *mem, uint64_t mem_size, uint64_t root,
                        const uint64_t *gpas, const uint8_t *accesses,
                        uint64_t *out_hpas, uint64_t n, int set_ad,
                        npt_walk_result *miss);

/* The benchmark's floor: the same four dependent loads, no checks at all.
 * Only for well-formed 4-level 4 KiB trees inside memory. */
uint64_t npt_floor_walk_batch(const uint8_t *mem, uint64_t root,
                              const uint64_t *gpas, uint64_t *out_hpas,
                              uint64_t n);

/* rc INST_OK with *n = tables needed, INST_MAPPED or INST_BAD_ARG (*n = 0) */
int npt_tables_needed(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                      uint64_t gpa, int level, int *n);

int npt_install(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
                uint64_t hpa, int level, uint64_t leaf_flags,
                const uint64_t *spares, int n_spares, int *n_used);

int npt_clear(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
              int level, uint64_t *old_entry);

/* Fills out[4*i .. 4*i+3] = gpa, hpa, size, entry for up to cap leaves and
 * returns the total number of leaves (call again with a bigger array when it
 * exceeds cap); -1 when out of memory. */
int64_t npt_mappings(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                     uint64_t *out, uint64_t cap);

/* Same protocol: out_hpa[i], out_level[i] for each reachable table page. */
int64_t npt_table_pages(const uint8_t *mem, uint64_t mem_size, uint64_t root,
                        uint64_t *out_hpa, uint8_t *out_level, uint64_t cap);

/* Copies the page at hpa into out[4096] with A and D cleared in every entry.
 * Returns 0, or -1 if hpa is misaligned or outside memory. */
int npt_canon_page(const uint8_t *mem, uint64_t mem_size, uint64_t hpa,
                   uint8_t *out);

/* 2D walk.  Returns 1 on success, 0 on a fault, -1 for a bad mode. */
int npt_walk2d(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t cr3,
               uint64_t va, int access, int mode, int set_ad,
               npt_walk2d_result *out);

/* The RMP check of the `rmp` protection design (SEV-SNP's reverse map):
 * after a nested translation gpa -> hpa through a leaf at `level`, the
 * entry of the final 4 KiB frame must say "assigned to this guest (asid),
 * at this GPA, with this page size".  Entry format (nptcore/rmp.py, written
 * only by the PSP): bit 0 assigned, bits 1..2 the page-size level (1 4 KiB,
 * 2 2 MiB), bits 12..47 the GPA of the frame, bits 48..63 the ASID.  A
 * translation that fails it is a nested fault (PF_RMP, bit 31, plus
 * PF_SIZEM, bit 35, when only the size differs): the walk fails as if the
 * leaf were not usable, and sets no A/D bit. */
typedef struct {
    const uint64_t *entries;   /* one per host frame, indexed by HPA >> 12 */
    uint64_t nframes;          /* frames beyond: never assigned */
    uint64_t asid;             /* the guest whose translations are checked */
} npt_rmp;

/* 0 when the entry matches, else the fault bits (PF_RMP [| PF_SIZEM]). */
uint64_t npt_rmp_check(const npt_rmp *rmp, uint64_t hpa, uint64_t gpa, int level);

/* npt_walk / npt_walk_v / npt_walk_batch / npt_walk2d with the RMP check
 * on every nested translation (the final one, and in a 2D walk each read
 * of a guest table). */
int npt_walk_rmp(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t gpa,
                 int access, int set_ad, const npt_rmp *rmp, npt_walk_result *out);
npt_walk_result npt_walk_rmp_v(uint8_t *mem, uint64_t mem_size, uint64_t root,
                               uint64_t gpa, int access, int set_ad, const npt_rmp *rmp);
uint64_t npt_walk_batch_rmp(uint8_t *mem, uint64_t mem_size, uint64_t root,
                            const uint64_t *gpas, const uint8_t *accesses,
                            uint64_t *out_hpas, uint64_t n, int set_ad,
                            const npt_rmp *rmp, npt_walk_result *miss);
int npt_walk2d_rmp(uint8_t *mem, uint64_t mem_size, uint64_t root, uint64_t cr3,
                   uint64_t va, int access, int mode, int set_ad,
                   const npt_rmp *rmp, npt_walk2d_result *out);

#endif
