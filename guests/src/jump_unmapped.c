/* Jumps to guest-physical memory that nothing has mapped: the page at
   (RAM rounded up to 2 MiB) + 0x1000, just beyond the guest's RAM.  The
   boot identity map covers the first 4 GiB, so the guest's own page walk
   succeeds and the instruction fetch is a nested page fault (error code
   ID | FINAL) on a GPA the VMM cannot back: under hv the run ends with
   exit_reason "error" (exit code 1) naming the fetch and the GPA.  It
   prints its target first; it never gets to the lines after the call. */
#include "guest.h"

int main(u64 ram_size)
{
    u64 target = ((ram_size + 0x1FFFFFull) & ~0x1FFFFFull) + 0x1000;
    puts("jump_unmapped: jumping to ");
    put_hex((uptr)target);
    puts(" (beyond RAM)\n");
    ((void (*)(void))(uptr)target)();
    puts("jump_unmapped: the jump came back\n");
    return 1;
}
