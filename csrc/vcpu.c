/*
 * vCPU fast path: Unicorn TLB-fill hook (the hardware walker) and a block
 * hook counting instructions.  See vcpu.h.
 */
#include <stdbool.h>
#include <stdint.h>
#include <sched.h>
#include <string.h>

#include "npt.h"
#include "vcpu.h"

/* nptcore/bits.py */
#define ACC_R 0
#define ACC_W 1
#define ACC_X 2
#define K_OK 0
#define K_NPF 1
#define K_GUEST_PF 2
#define MODE_NONE 0
#define MODE_32 2
#define MODE_PAE 3
#define MODE_LONG4 4
#define NPT_ADDR_MASK 0x000FFFFFFFFFF000ULL

/* unicorn constants */
#define UC_MEM_READ 16
#define UC_MEM_WRITE 17
#define UC_MEM_FETCH 18
#define UC_PROT_READ 1
#define UC_PROT_WRITE 2
#define UC_PROT_EXEC 4
#define UC_X86_REG_CR0 50
#define UC_X86_REG_CR3 53
#define UC_X86_REG_CR4 54
#define UC_X86_REG_MSR 248
#define MSR_EFER 0xC0000080u

#define CR0_PG (1ULL << 31)
#define CR4_PAE (1ULL << 5)
#define EFER_LMA (1ULL << 10)

typedef struct {
    uint64_t paddr;
    uint32_t perms;
} uc_tlb_entry_t;

typedef struct {
    uint32_t rid;
    uint64_t value;
} uc_x86_msr_t;

typedef int (*reg_read_t)(void *uc, int regid, void *value);
typedef int (*uc_ctl_t)(void *uc, int control, ...);

#define MAX_TRIES 8

static uint64_t rd(vcpu_ctx *c, int reg)
{
    uint64_t v = 0;
    ((reg_read_t)c->reg_read)(c->uc, reg, &v);
    return v;
}

int vcpu_mode(vcpu_ctx *c)
{
    uc_x86_msr_t msr;
    c->cr0 = rd(c, UC_X86_REG_CR0);
    c->cr3 = rd(c, UC_X86_REG_CR3);
    c->cr4 = rd(c, UC_X86_REG_CR4);
    msr.rid = MSR_EFER;
    msr.value = 0;
    ((reg_read_t)c->reg_read)(c->uc, UC_X86_REG_MSR, &msr);
    c->efer = msr.value;
    if (!(c->cr0 & CR0_PG))
        return MODE_NONE;
    if (c->efer & EFER_LMA)
        return MODE_LONG4;
    if (c->cr4 & CR4_PAE)
        return MODE_PAE;
    return MODE_32;
}

int vcpu_flush_tlb(vcpu_ctx *c)
{
    if (c->uc_ctl == NULL)
        return -1;
    return ((uc_ctl_t)c->uc_ctl)(c->uc, (int)c->ctl_tlb_flush);
}

static uint32_t perms_for(int access)
{
    if (access == ACC_W)
        return UC_PROT_READ | UC_PROT_WRITE;
    if (access == ACC_X)
        return UC_PROT_READ | UC_PROT_EXEC;
    return UC_PROT_READ;
}

#define FAST_PSP_UPDATE 0      /* vcpu_ctx.fast_kind */
#define FAST_VMM_WRITES 1
#define PF_P 1ULL
#define PF_W 2ULL
#define PF_ID 16ULL
#define ATTR_RWX 3u
#define LEVEL_4K 1u

typedef uint32_t (*psp_update_t)(void *ctx, const uint8_t *buf);

static void psp_lock_word(int32_t *w)
{
    unsigned spins = 0;
    while (__atomic_exchange_n(w, 1, __ATOMIC_ACQUIRE)) {
        if (++spins > 64) {
            sched_yield();
            spins = 0;
        }
    }
}

/* The common NPF, without leaving C: a not-present fault at a GPA inside the
 * guest's RAM gets the next frame the VMM handed over, mapped RWX at 4 KiB:
 * under digest by the PSP's own UPDATE_NPT entry (psp_shared_update, with the
 * firmware's lock word held: the same command buffer, checks and commit as
 * through the mailbox), under none (fast_kind FAST_VMM_WRITES) by the VMM's
 * own write of the leaf into an existing leaf table (npt_install, as
 * hv/vmm/tables.py VmmWrites does). Returns 1 when it was mapped (logged for
 * the VMM's bookkeeping, which Python does after emu_start), 0 for anything
 * else: nothing changed, and the NPF goes to Python (which also refuses,
 * reports and stops exactly as before). */
static int fast_npf(vcpu_ctx *c, uint64_t gpa, uint64_t err, int access)
{
    uint8_t buf[32];
    uint64_t page = gpa & ~0xFFFULL, hpa;
    uint32_t done, level = LEVEL_4K, attrs = ATTR_RWX, one = 1;
    uint64_t *l;
    if (!c->fast_on || (err & PF_P) || gpa >= c->fast_ram || c->next_frame >= c->nframes ||
            c->log_n >= c->log_cap)
        return 0;
    hpa = c->frames[c->next_frame];
    if (c->fast_kind == FAST_VMM_WRITES) {
        /* the none design: the VMM writes its own table, as VmmWrites._write
         * does, into an existing leaf table only (a new table: Python) */
        uint64_t root;
        int used = 0;
        if (c->vmsa + 8 > c->mem_size)
            return 0;
        memcpy(&root, c->mem + c->vmsa, 8);
        root &= NPT_ADDR_MASK;
        if (npt_install(c->mem, c->mem_size, root, page, hpa, 1, c->fast_leaf_flags, NULL, 0,
                        &used) != 0)
            return 0;               /* mapped, a table missing, a bad argument: Python */
    } else {
        memcpy(buf, &c->fast_handle, 4);
        memcpy(buf + 4, &level, 4);
        memcpy(buf + 8, &page, 8);
        memcpy(buf + 16, &hpa, 8);
        memcpy(buf + 24, &attrs, 4);
        memcpy(buf + 28, &one, 4);
        psp_lock_word(c->psp_busy);
        done = ((psp_update_t)c->psp_update)(c->psp_ctx, buf);
        __atomic_store_n(c->psp_busy, 0, __ATOMIC_RELEASE);
        if (done != 1)
            return 0;               /* declined or not its guest: nothing changed */
    }
    c->next_frame++;
    l = c->log + 4ULL * c->log_n++;   /* its frame is frames[i] for the i-th entry */
    l[0] = gpa;
    l[1] = (err & PF_ID) ? ACC_X : ((err & PF_W) ? ACC_W : ACC_R);
    l[2] = err;
    l[3] = rd(c, c->pc_reg);
    (void)access;
    return 1;
}

static bool tlb_fill(void *uc, uint64_t va, int type, uc_tlb_entry_t *e, void *user)
{
    vcpu_ctx *c = (vcpu_ctx *)user;
    int access = type == UC_MEM_WRITE ? ACC_W : (type == UC_MEM_FETCH ? ACC_X : ACC_R);
    int mode, tries;
    (void)uc;

    c->fills++;
    if (access == ACC_X && va == c->sentinel_page) {
        /* Unicorn looks at the page of emu_start's `until` after hlt. */
        c->halted = 1;
        e->paddr = c->sentinel_hpa;
        e->perms = UC_PROT_READ | UC_PROT_EXEC;
        return true;
    }
    if (c->stop)
        return false;
    mode = vcpu_mode(c);
    for (tries = 0; tries < MAX_TRIES; tries++) {
        uint64_t root, gpa, err;
        c->walks++;
        if (c->vmsa + 8 > c->mem_size)
            root = 0;
        else {
            memcpy(&root, c->mem + c->vmsa, 8);
            root &= NPT_ADDR_MASK;
        }
        if (mode == MODE_NONE) {
            npt_walk_result r;
            gpa = (c->efer & EFER_LMA) ? va : (va & 0xFFFFFFFFULL);
            if ((c->rmp ? npt_walk_rmp(c->mem, c->mem_size, root, gpa, access, 1,
                                       (const npt_rmp *)c->rmp, &r)
                        : npt_walk(c->mem, c->mem_size, root, gpa, access, 1, &r)) > 0) {
                e->paddr = r.hpa & ~0xFFFULL;
                e->perms = perms_for(access);
                return true;
            }
            err = r.errcode;
        } else {
            npt_walk2d_result r;
            int rc = c->rmp
                ? npt_walk2d_rmp(c->mem, c->mem_size, root, c->cr3, va, access, mode, 1,
                                 (const npt_rmp *)c->rmp, &r)
                : npt_walk2d(c->mem, c->mem_size, root, c->cr3, va, access, mode, 1, &r);
            if (rc > 0) {
                e->paddr = r.hpa & ~0xFFFULL;
                e->perms = perms_for(access);
                return true;
            }
            if (rc < 0 || r.kind == K_GUEST_PF) {
                c->f_va = va;
                c->f_gpa = 0;
                c->f_err = rc < 0 ? 0 : r.errcode;
                c->f_access = access;
                c->f_kind = K_GUEST_PF;
                c->f_mode = mode;
                c->f_rip = rd(c, c->pc_reg);
                c->stop = 2;
                return false;           /* Unicorn stops: Python injects the #PF */
            }
            gpa = r.gpa;
            err = r.errcode;
        }
        c->f_va = va;
        c->f_gpa = gpa;
        c->f_err = err;
        c->f_access = access;
        c->f_kind = K_NPF;
        c->f_mode = mode;
        c->f_rip = rd(c, c->pc_reg);
        if (fast_npf(c, gpa, err, access))
            continue;               /* mapped by the PSP: walk again */
        c->npf_calls++;
        if (vcpu_py_npf(c) != 0) {
            c->stop = 1;
            return false;
        }
    }
    c->stop = 3;
    return false;
}

static void block_hook(void *uc, uint64_t addr, uint32_t size, void *user)
{
    vcpu_ctx *c = (vcpu_ctx *)user;
    uint64_t h = (addr ^ (addr >> 17) ^ ((uint64_t)size << 7)) * 0x9E3779B97F4A7C15ULL;
    uint32_t mask = (1u << VCPU_BLK_BITS) - 1, i = (uint32_t)(h >> (64 - VCPU_BLK_BITS)), n;
    vcpu_blk *b;
    (void)uc;
    for (;;) {
        b = &c->blocks[i];
        if (b->ninsns == 0)
            break;
        if (b->addr == addr && b->size == size) {
            n = b->ninsns;
            goto found;
        }
        i = (i + 1) & mask;
    }
    n = vcpu_py_block(c, addr, size);
    if (n == 0)
        n = 1;
    if (c->nblocks < (mask >> 1)) {        /* keep the table at most half full */
        b->addr = addr;
        b->size = size;
        b->ninsns = n;
        c->nblocks++;
    } else
        c->blk_full = 1;
found:
    c->insns += n;
    c->last_addr = addr;
    c->last_size = size;
    c->last_n = n;
}

/* The plain-Unicorn baseline's fill (guests/flat_runner.py, tlb="per_access",
 * the other side of hv bench's guest_speed_vs_unicorn): virtual == physical
 * (the bundled guests' own page tables are identity maps), with each access
 * kind's permissions only, as tlb_fill grants them. No guest walk, no NPT,
 * no PSP: that is what the ratio measures. In C, as tlb_fill is, so that
 * neither side pays a Python call per fill. user: a vcpu_ctx whose fills it
 * counts, or NULL. */
static bool identity_fill(void *uc, uint64_t va, int type, uc_tlb_entry_t *e, void *user)
{
    (void)uc;
    if (user)
        ((vcpu_ctx *)user)->fills++;
    e->paddr = va & ~0xFFFULL;
    e->perms = perms_for(type == UC_MEM_WRITE ? ACC_W : (type == UC_MEM_FETCH ? ACC_X : ACC_R));
    return true;
}

uint64_t vcpu_identity_fill_addr(void)
{
    return (uint64_t)(uintptr_t)&identity_fill;
}

uint64_t vcpu_tlb_fill_addr(void)
{
    return (uint64_t)(uintptr_t)&tlb_fill;
}

uint64_t vcpu_block_addr(void)
{
    return (uint64_t)(uintptr_t)&block_hook;
}
