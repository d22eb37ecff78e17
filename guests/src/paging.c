/* Builds its own 4-level page tables, switches CR3 to them and checks
   aliases:
     identity  0 .. 2 MiB         4 KiB pages (page 0 left unmapped)
     identity  2 MiB .. RAM       2 MiB pages
     VA 0x8000000000 + 16 pages   4 KiB pages -> PA 0x200000
     VA 0x8040000000 (2 MiB)      one 2 MiB page -> PA 0x400000
   then remaps one 4 KiB alias page, flushes it with invlpg and checks the
   new translation.  Needs 8 MiB <= RAM <= 4 GiB. */
#include "guest.h"

#define P 0x1ULL
#define W 0x2ULL
#define PS 0x80ULL
#define PAGE 4096ULL
#define MB2 (2ULL << 20)

#define ALIAS4K 0x8000000000ULL
#define ALIAS4K_PA 0x200000ULL
#define ALIAS4K_PAGES 16
#define ALIAS2M 0x8040000000ULL
#define ALIAS2M_PA 0x400000ULL

typedef u64 table_t[512] __attribute__((aligned(4096)));

static table_t pml4, pdpt_id, pd_id[4], pt_low, pdpt_alias, pd_alias4k, pt_alias, pd_alias2m;

#define V64(a) (*(volatile u64 *)(uptr)(a))

static int fail(const char *what, u64 addr, u64 got, u64 want)
{
    puts("paging: FAIL ");
    puts(what);
    puts(" at ");
    put_hex(addr);
    puts(" got ");
    put_hex(got);
    puts(" want ");
    put_hex(want);
    puts("\n");
    return 1;
}

int main(u64 ram_size)
{
    if (ram_size < (8ULL << 20) || ram_size > (4ULL << 30)) {
        puts("paging: need 8 MiB <= RAM <= 4 GiB\n");
        return 1;
    }

    /* identity map */
    pml4[0] = (uptr)pdpt_id | P | W;
    for (int i = 0; i < 4; i++)
        pdpt_id[i] = (uptr)pd_id[i] | P | W;
    pd_id[0][0] = (uptr)pt_low | P | W;
    for (u64 i = 1; i < 512; i++)
        pt_low[i] = (i * PAGE) | P | W;
    u64 top = (ram_size + MB2 - 1) & ~(MB2 - 1);
    for (u64 a = MB2; a < top; a += MB2)
        pd_id[a >> 30][(a >> 21) & 511] = a | P | W | PS;

    /* aliases in PML4 slot 1 */
    pml4[1] = (uptr)pdpt_alias | P | W;
    pdpt_alias[0] = (uptr)pd_alias4k | P | W;
    pd_alias4k[0] = (uptr)pt_alias | P | W;
    for (u64 i = 0; i < ALIAS4K_PAGES; i++)
        pt_alias[i] = (ALIAS4K_PA + i * PAGE) | P | W;
    pdpt_alias[1] = (uptr)pd_alias2m | P | W;
    pd_alias2m[0] = ALIAS2M_PA | P | W | PS;

    puts("paging: switching CR3 to ");
    put_hex((uptr)pml4);
    puts("\n");
    __asm__ volatile("mov %0, %%cr3" : : "r"((u64)(uptr)pml4) : "memory");

    /* 4 KiB aliases: write through the alias, read through identity. */
    for (u64 i = 0; i < ALIAS4K_PAGES; i++)
        for (u64 off = 0; off < PAGE; off += 1024)
            V64(ALIAS4K + i * PAGE + off) = 0xA11A5000000000ULL | (i << 16) | off;
    for (u64 i = 0; i < ALIAS4K_PAGES; i++)
        for (u64 off = 0; off < PAGE; off += 1024) {
            u64 want = 0xA11A5000000000ULL | (i << 16) | off;
            u64 pa = ALIAS4K_PA + i * PAGE + off;
            if (V64(pa) != want)
                return fail("4K alias->identity", pa, V64(pa), want);
        }
    /* and the other way round */
    V64(ALIAS4K_PA + 5 * PAGE + 8) = 0x5EED5EED12345678ULL;
    if (V64(ALIAS4K + 5 * PAGE + 8) != 0x5EED5EED12345678ULL)
        return fail("identity->4K alias", ALIAS4K + 5 * PAGE + 8, V64(ALIAS4K + 5 * PAGE + 8), 0x5EED5EED12345678ULL);
    puts("paging: 4K alias ");
    put_hex(ALIAS4K);
    puts(" -> ");
    put_hex(ALIAS4K_PA);
    puts(" ok\n");

    /* 2 MiB alias: write through identity, read through the alias, and back. */
    for (u64 off = 0; off < MB2; off += 0x10000)
        V64(ALIAS2M_PA + off) = 0xB16B00B500000000ULL | off;
    for (u64 off = 0; off < MB2; off += 0x10000) {
        u64 want = 0xB16B00B500000000ULL | off;
        if (V64(ALIAS2M + off) != want)
            return fail("2M identity->alias", ALIAS2M + off, V64(ALIAS2M + off), want);
    }
    V64(ALIAS2M + MB2 - 8) = 0xC0FFEEULL;
    if (V64(ALIAS2M_PA + MB2 - 8) != 0xC0FFEEULL)
        return fail("2M alias->identity", ALIAS2M_PA + MB2 - 8, V64(ALIAS2M_PA + MB2 - 8), 0xC0FFEE);
    puts("paging: 2M alias ");
    put_hex(ALIAS2M);
    puts(" -> ");
    put_hex(ALIAS2M_PA);
    puts(" ok\n");

    /* Remap alias page 0 onto the frame of alias page 15, invlpg, re-read. */
    u64 before = V64(ALIAS4K);
    pt_alias[0] = (ALIAS4K_PA + 15 * PAGE) | P | W;
    __asm__ volatile("invlpg (%0)" : : "r"((uptr)ALIAS4K) : "memory");
    u64 want = 0xA11A5000000000ULL | (15ULL << 16);
    if (V64(ALIAS4K) != want || before == want)
        return fail("remap+invlpg", ALIAS4K, V64(ALIAS4K), want);
    puts("paging: remap+invlpg ok\n");

    puts("paging: OK\n");
    return 0;
}
