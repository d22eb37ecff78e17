/*
 * vCPU fast path for the Unicorn backend (hv/vcpu.py): the TLB-fill hook
 * that plays the hardware page walker, and a basic-block hook that counts
 * retired instructions.  Both are registered directly with libunicorn's
 * uc_hook_add, so TLB fills that hit in the NPT never enter Python; only an
 * NPF (and the first sight of a new basic block) calls back into Python.
 *
 * No policy here: the walk is nptcore's (csrc/npt.c, compiled in), the NPF
 * is resolved by the Python callback (the VMM asks the PSP), then the walk
 * is retried.  This header is also the cffi cdef (csrc/build_vcpu.py).
 */
#ifndef HV_VCPU_H
#define HV_VCPU_H
#include <stdint.h>

#define VCPU_BLK_BITS 16

typedef struct {
    uint64_t addr;
    uint32_t size;
    uint32_t ninsns;       /* 0: empty slot */
} vcpu_blk;

typedef struct vcpu_ctx {
    /* set up by Python */
    uint8_t *mem;
    uint64_t mem_size;
    uint64_t vmsa;           /* HPA of the VM control page: nCR3 in its first 8 bytes */
    void *uc;                /* uc_engine * */
    void *reg_read;          /* address of uc_reg_read */
    uint64_t sentinel_page;  /* page of emu_start's `until` (Unicorn probes it after hlt) */
    uint64_t sentinel_hpa;   /* harmless frame that page is given */
    int64_t handle;          /* Python-side id of this vCPU (for the callbacks) */
    int32_t pc_reg;          /* UC_X86_REG_RIP or UC_X86_REG_EIP (by Unicorn mode) */
    /* last fault, for the Python callback and the report */
    uint64_t f_va, f_gpa, f_err, f_rip;
    int32_t f_access, f_kind, f_mode;
    /* set by the hook */
    int32_t stop;            /* 1: the NPF callback asked to stop; 2: guest #PF pending; 3: NPF loop */
    int32_t halted;          /* the sentinel page was probed: the guest executed hlt */
    uint64_t fills, npf_calls, walks;
    /* instruction counting (block hook) */
    uint64_t insns;          /* sum of the instruction counts of every block entered */
    uint64_t last_addr;
    uint32_t last_size, last_n;
    uint32_t nblocks;        /* distinct blocks seen */
    uint32_t blk_full;
    vcpu_blk *blocks;        /* 1 << VCPU_BLK_BITS slots, owned by Python */
    /* control registers seen by the last fill (for the report) */
    uint64_t cr0, cr3, cr4, efer;
    /* TLB flush without the Python binding: address of uc_ctl and the
     * encoded UC_CTL_TLB_FLUSH write request (set up by Python) */
    void *uc_ctl;
    uint32_t ctl_tlb_flush;
    /* the NPF fast path (csrc/vcpu.c fast_npf): the C twin of the VMM's
     * 4 KiB NPF handling, armed by Python (hv/machine/unicorn_vcpu.py) only
     * where the VMM's policy is that case (fault-around 1, no 2 MiB pages,
     * nothing recorded or logged, the in-process PSP with its C core). An
     * NPF it does not take goes to Python as before. */
    int32_t fast_on;
    int32_t fast_kind;       /* 0: the PSP's UPDATE_NPT (digest); 1: the VMM writes the
                                leaf itself (the none design: npt_install, no PSP) */
    uint64_t fast_leaf_flags;   /* kind 1: the leaf's flags (hv/vmm/tables.py leaf_flags) */
    uint32_t fast_handle;    /* the guest's PSP handle */
    uint64_t fast_ram;       /* guest RAM size: a GPA at or beyond it goes to Python */
    void *psp_update;        /* psp_mailbox_update (psp_firmware._psp_core_c) */
    void *psp_ctx;           /* its struct psp_ctx * */
    int32_t *psp_busy;       /* &psp_ctx.busy: the firmware's lock word */
    uint64_t *frames;        /* frames the VMM handed over, used in order */
    uint32_t nframes, next_frame;
    uint64_t *log;           /* per NPF taken: gpa, access, errcode, rip (hv/machine/npf_log.py's
                                layout); the i-th took frames[i] */
    uint32_t log_cap, log_n;
    /* the rmp protection design: the npt_rmp (csrc/npt.h) every translation
     * of the fill is checked against (a mismatch is an NPF with PF_RMP), or
     * NULL: no check */
    const void *rmp;
} vcpu_ctx;

/* the Python callbacks: cffi extern "Python+C" functions defined by the
 * generated module (declared in csrc/build_vcpu.py's cdef, not here) */
#ifndef CFFI_CDEF
int vcpu_py_npf(vcpu_ctx *ctx);
uint32_t vcpu_py_block(vcpu_ctx *ctx, uint64_t addr, uint32_t size);
#endif

/* addresses of the C hooks, for uc_hook_add */
uint64_t vcpu_tlb_fill_addr(void);
uint64_t vcpu_identity_fill_addr(void);   /* the plain-Unicorn baseline's fill */
uint64_t vcpu_block_addr(void);

/* paging mode the fill would use now: 0 none, 2/3/4 as nptcore MODE_* */
int vcpu_mode(vcpu_ctx *ctx);

/* flush the emulator's TLB (uc_ctl(uc, UC_CTL_TLB_FLUSH write)): the
 * uc_err it returns, or -1 when ctx has no uc_ctl */
int vcpu_flush_tlb(vcpu_ctx *ctx);

#endif
