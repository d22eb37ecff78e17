/* Touch one byte in each 4 KiB page from the end of the image up to
   RAM size - 64 KiB (the stack reserve), then read them all back. */
#include "guest.h"

#define PAGE 4096ULL
#define STACK_RESERVE (64ULL * 1024)

extern char __image_end[];

static inline u8 pattern(u64 page) { return (u8)((page * 37 + 11) | 1); }

int main(u64 ram_size)
{
    u64 start = ((u64)(uptr)__image_end + PAGE - 1) & ~(PAGE - 1);
    u64 end = ram_size > STACK_RESERVE ? ram_size - STACK_RESERVE : 0;
    u64 pages = 0;

    puts("memtouch: RAM ");
    put_dec(ram_size >> 10);
    puts(" KiB, touching ");
    put_hex(start);
    puts("..");
    put_hex(end);
    puts("\n");

    for (u64 a = start; a + PAGE <= end; a += PAGE) {
        *(volatile u8 *)(uptr)a = pattern(a >> 12);
        pages++;
    }
    puts("memtouch: touched ");
    put_dec(pages);
    puts(" pages\n");

    for (u64 a = start; a + PAGE <= end; a += PAGE) {
        u8 got = *(volatile u8 *)(uptr)a;
        if (got != pattern(a >> 12)) {
            puts("memtouch: MISMATCH at ");
            put_hex(a);
            puts("\n");
            return 1;
        }
    }
    puts("memtouch: OK\n");
    return 0;
}
