/* psp_core.h: the PSP C core's interface (psp_firmware._psp_core_c).
 * csrc/build_psp_core.py repeats the two structs in its cdef (pointer
 * members are void * so that any cffi buffer can be stored) and declares the
 * functions with char * for Python bytes; keep them in step. */
#ifndef PSP_CORE_H
#define PSP_CORE_H

/* What the UPDATE_NPT fast path knows of one guest (PSP private memory,
 * kept in step by psp_firmware/psp.py). */
struct psp_guest {
    uint32_t handle;
    uint32_t accepting;      /* 1: LAUNCHING or RUNNING (may take UPDATE_NPT) */
    uint64_t vmsa;           /* HPA of the guest's control page (nCR3 at +0) */
    uint64_t root;           /* the root table the PSP built */
    uint64_t mapped_pages;   /* 4 KiB pages mapped (GUEST_STATUS) */
};

/* The PSP state the fast path reads and commits to. Every array is indexed
 * by host frame number (pfn) and owned by the Python firmware object. */
struct psp_ctx {
    void *mem;               /* host memory (the VMM's: read, never trusted) */
    uint64_t host_size;      /* bytes of host memory the platform covers */
    uint64_t fw_lo, fw_hi;   /* firmware frames [fw_lo, fw_hi) */
    void *fstate;            /* frame table: state (psp_firmware.frames.F) */
    void *fowner;            /*   owner handle */
    void *fgpa;              /*   GPA of a MAPPED frame */
    void *shadow_of;         /* table page pfn -> its 4 KiB shadow copy (0: none) */
    void *lines_of;          /* table page pfn -> its 64 line hashes (2 KiB; 0: none) */
    void *dirty;             /* table page pfn -> chunk bits whose hashes are stale */
    int64_t scrub_advice;    /* 0: zero by writing; else the madvise() advice that
                                makes the mapping read as zero (psp_scrub_advised) */
    struct psp_guest *ring_guests[64];   /* handle % 64 -> guest, for the ring loop */
};

#ifndef PSP_CORE_NO_PROTOS
void psp_chunk_hash(const uint8_t *src, int mask_ad, const uint8_t *slots, uint8_t *out);
int psp_chunk_check(const uint8_t *src, int mask_ad, const uint8_t *slots, const uint8_t *expected);
void psp_node_hash(uint64_t hpa, int level, const uint8_t *chunks, uint8_t *out);
void psp_root_hash(uint64_t root, const uint8_t *node, uint8_t *out);
void psp_line_hash(const uint8_t *src, uint8_t *out);
int psp_line_check(const uint8_t *src, const uint8_t *expected);
void psp_lines_hash(const uint8_t *page, uint8_t *out);
void psp_scrub(uint8_t *mem, uint64_t off, uint64_t n);
void psp_scrub_advised(uint8_t *mem, uint64_t off, uint64_t n, int advice);
int64_t psp_leaf_scan(const uint8_t *shadow, int idx, int n, int level);
void psp_write_leaves(uint8_t *mem, uint64_t table, uint8_t *shadow, int idx, int n,
                      uint64_t value0, uint64_t step);
void psp_page_hash(const uint8_t *page, int mask_ad, const uint8_t *slots, int slot_mask,
                   uint64_t hpa, int level, uint8_t *chunks, uint8_t *node_out);
int psp_update_fast(struct psp_ctx *c, struct psp_guest *g, uint32_t level, uint64_t gpa,
                    uint64_t hpa, uint32_t attrs, uint32_t npages);
uint32_t psp_mailbox_update(struct psp_ctx *c, const uint8_t *buf);
uint32_t psp_ring_fast(struct psp_ctx *c, uint8_t *ring, uint32_t start, uint32_t n,
                       uint32_t *progress);
#endif

#endif
