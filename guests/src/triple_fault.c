/* Loads an empty IDT and executes ud2: #UD cannot be delivered (#GP), nor
   can the #DF that follows, so the CPU shuts down (triple fault). */
#include "guest.h"

int main(u64 ram_size)
{
    struct __attribute__((packed)) { u16 limit; u64 base; } idtr = { 0, 0 };
    (void)ram_size;
    puts("triple_fault: empty IDT, ud2\n");
    __asm__ volatile("lidt %0\n\tud2" : : "m"(idtr));
    puts("triple_fault: still alive?!\n");
    return 1;
}
