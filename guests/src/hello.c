#include "guest.h"

int main(u64 ram_size)
{
    (void)ram_size;
    puts("Hello from the guest!\n");
    return 0;
}
