/* psp_core.h: the PSP C core's interface (psp_firmware._psp_core_c).
 * csrc/build_psp_core.py builds its cffi cdef from this file: the text
 * between the cdef-begin / cdef-end comments (structs, then functions), so
 * keep preprocessor lines out of those blocks. Pointer members of the structs
 * are void * so that any cffi buffer can be stored in them. */
#ifndef PSP_CORE_H
#define PSP_CORE_H

/* cdef-begin */
/* What the UPDATE_NPT fast path knows of one guest (PSP private memory,
 * kept in step by psp_firmware/psp.py). */
struct psp_guest {
    uint32_t handle;
    uint32_t accepting;      /* 1: LAUNCHING or RUNNING (may take UPDATE_NPT) */
    uint64_t vmsa;           /* HPA of the guest's control page (nCR3 at +0) */
    uint64_t root;           /* the root table the PSP built */
    uint64_t mapped_pages;   /* 4 KiB pages mapped (GUEST_STATUS) */
    uint32_t digest;         /* 1: merkle's line hashes are checked and kept (digest
                                design); 0: no digest (the isolated design) */
    uint32_t pad_;
    uint64_t leaf_extra;     /* bits every leaf gets besides its permissions
                                (isolated: A|D, so that the walker never stores) */
};

/* What a scrub's probe has learnt of which host frames are holes (pages
 * that already read as zero), kept so that it asks the kernel once per
 * window or run of holes rather than once per frame (psp_core.c, before
 * probe_page, says how it is read and why a hole may be skipped). Private
 * to the C core; here only because struct psp_ctx holds one. */
struct frame_probe {
    int32_t kind, fd;                   /* HOLE_SEEK / HOLE_PAGEMAP and its fd */
    int32_t mincore_window;             /* HOLE_SEEK: read a mincore window first */
    int32_t pad_;
    uint64_t limit;                     /* windows end here (the range / host size) */
    uint64_t hole_lo, hole_hi;          /* HOLE_SEEK: a known run of holes */
    uint64_t win_lo, win_n;             /* frames [win_lo, win_lo + win_n * 4K) */
    uint8_t win[256];                   /* PROBE_WINDOW entries, 1: data */
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
                                makes the mapping read as zero (psp_scrub_probe) */
    int64_t hole_kind;       /* how a scrub finds pages that already read as zero
                                without touching them (psp_scrub_probe): 0 none,
                                1 SEEK_DATA on hole_fd, 2 /proc/self/pagemap */
    int64_t hole_fd;         /*   the fd for hole_kind (-1: none) */
    struct psp_guest *ring_guests[64];   /* the ring loop's guests: handle % 64 if
                                            free, else any free slot */
    int32_t busy;            /* the firmware's lock word: 1 while a command runs. Every
                                entry takes it (psp_lock), the Python mailbox as well as
                                a caller of psp_mailbox_update on another thread (the
                                vCPU's NPF fast path, csrc/vcpu.c) */
    uint64_t shared_commands;   /* UPDATE_NPTs such a caller sent (psp_shared_update) */
    uint64_t *dlog;          /* table pages whose stale-chunk mask went from 0 to nonzero in
                                the C update (the merkle flush's to-do; NULL: not kept) */
    uint32_t dlog_cap, dlog_n;
    uint32_t dlog_over;      /* more than dlog_cap: the flush must scan every page */
    uint64_t lock_seq;       /* psp_unlock counts the commands a Python entry (or a ring)
                                ran under the lock word; psp_shared_update does not */
    uint64_t probe_seq;      /* lock_seq when shared_probe was last valid */
    struct frame_probe shared_probe;   /* what psp_shared_update's scrubs learnt while no
                                          other entry ran (see psp_shared_update) */
};
/* cdef-end */

/* The functions. Byte buffers are PSP_BYTE: uint8_t for the C sources,
 * char for cffi (csrc/build_psp_core.py reads this block as its cdef with
 * PSP_BYTE = char, so Python bytes and cffi buffers pass straight in). */
#ifndef PSP_BYTE
#define PSP_BYTE uint8_t
#endif
/* cdef-begin */
void psp_chunk_hash(const PSP_BYTE *src, int mask_ad, const PSP_BYTE *slots, PSP_BYTE *out);
int psp_chunk_check(const PSP_BYTE *src, int mask_ad, const PSP_BYTE *slots, const PSP_BYTE *expected);
void psp_node_hash(uint64_t hpa, int level, const PSP_BYTE *chunks, PSP_BYTE *out);
void psp_root_hash(uint64_t root, const PSP_BYTE *node, PSP_BYTE *out);
void psp_line_hash(const PSP_BYTE *src, PSP_BYTE *out);
int psp_line_check(const PSP_BYTE *src, const PSP_BYTE *expected);
void psp_lines_hash(const PSP_BYTE *page, PSP_BYTE *out);
void psp_scrub(PSP_BYTE *mem, uint64_t off, uint64_t n);
void psp_scrub_probe(PSP_BYTE *mem, uint64_t off, uint64_t n, int advice, int hole_kind,
                     int hole_fd);
int64_t psp_leaf_scan(const PSP_BYTE *shadow, int idx, int n, int level);
void psp_write_leaves(PSP_BYTE *mem, uint64_t table, PSP_BYTE *shadow, int idx, int n,
                      uint64_t value0, uint64_t step);
void psp_page_hash(const PSP_BYTE *page, int mask_ad, const PSP_BYTE *slots, int slot_mask,
                   uint64_t hpa, int level, PSP_BYTE *chunks, PSP_BYTE *node_out);
void psp_merkle_verify(const PSP_BYTE *mem, uint32_t n, const uint64_t *hpa,
                       const uint8_t *level, const uint8_t *slot_mask,
                       const int32_t *slots_of, const int64_t *parent_at,
                       PSP_BYTE *scratch, uint64_t scratch_len, PSP_BYTE *nodes_out,
                       uint32_t root_k, uint64_t root, PSP_BYTE *root_out);
int psp_update_fast(struct psp_ctx *c, struct psp_guest *g, uint32_t level, uint64_t gpa,
                    uint64_t hpa, uint32_t attrs, uint32_t npages);
#define PSP_NO_RECORD 0xFFFFFFFF   /* psp_mailbox_update: no such guest in the ring table */
uint32_t psp_mailbox_update(struct psp_ctx *c, const PSP_BYTE *buf);
uint32_t psp_dirty_scan(const PSP_BYTE *dirty, const uint64_t *hpa, uint32_t n, uint32_t *out);
void psp_lock(struct psp_ctx *c);
void psp_unlock(struct psp_ctx *c);
uint32_t psp_shared_update(struct psp_ctx *c, const PSP_BYTE *buf);
uint64_t psp_shared_update_addr(void);
uint32_t psp_ring_fast(struct psp_ctx *c, PSP_BYTE *ring, uint32_t start, uint32_t n,
                       uint32_t *progress);
/* cdef-end */

#endif
