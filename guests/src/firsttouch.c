/* The first-touch benchmark guest: write one byte to each 4 KiB page from the
   end of the image up to RAM size - 64 KiB (the stack reserve), once, and exit
   through port 0xF4 with 0. No output inside the loop and no second pass: each
   page costs exactly its first write (in hv an NPF through the PSP, in KVM an
   in-kernel demand fault), as the touch guest of hv/machine/kvm.py does. The
   page count goes to serial after the loop. */
#include "guest.h"

#define PAGE 4096ULL
#define STACK_RESERVE (64ULL * 1024)

extern char __image_end[];

int main(u64 ram_size)
{
    u64 start = ((u64)(uptr)__image_end + PAGE - 1) & ~(PAGE - 1);
    u64 end = ram_size > STACK_RESERVE ? ram_size - STACK_RESERVE : 0;
    u64 pages = 0;

    for (u64 a = start; a + PAGE <= end; a += PAGE) {
        *(volatile u8 *)(uptr)a = 1;
        pages++;
    }
    puts("firsttouch: ");
    put_dec(pages);
    puts(" pages\n");
    return 0;
}
