/* Calls a function that the linker places in its own PT_LOAD segment at
   0x900000, far from the rest of the image: the first access to that page
   is the instruction fetch of the call. */
#include "guest.h"

__attribute__((section(".far"), noinline, noreturn)) void far_code(void)
{
    puts("far code ran\n");
    guest_exit(0);
}

int main(u64 ram_size)
{
    (void)ram_size;
    puts("jump_unmapped: calling ");
    put_hex((uptr)far_code);
    puts("\n");
    far_code();
}
