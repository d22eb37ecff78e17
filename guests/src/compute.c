/* Compute-bound guest: sieve of Eratosthenes below LIMIT, then an FNV-1a
   hash over the sieve.  Checks the results against known constants. */
#include "guest.h"

#define LIMIT 1000000
#define EXPECT_COUNT 78498ULL          /* primes below 10^6 */
#define EXPECT_SUM 37550402023ULL      /* their sum */

static u8 composite[LIMIT];

int main(u64 ram_size)
{
    (void)ram_size;
    for (u64 i = 2; i * i < LIMIT; i++)
        if (!composite[i])
            for (u64 j = i * i; j < LIMIT; j += i)
                composite[j] = 1;

    u64 count = 0, sum = 0;
    u64 h = 0xcbf29ce484222325ULL;
    for (u64 i = 2; i < LIMIT; i++) {
        if (!composite[i]) {
            count++;
            sum += i;
            h = (h ^ (i & 0xff)) * 0x100000001b3ULL;
        }
    }
    puts("compute: primes below ");
    put_dec(LIMIT);
    puts(": ");
    put_dec(count);
    puts(", sum ");
    put_dec(sum);
    puts(", hash ");
    put_hex(h);
    puts("\n");
    if (count != EXPECT_COUNT || sum != EXPECT_SUM) {
        puts("compute: WRONG\n");
        return 1;
    }
    puts("compute: OK\n");
    return 0;
}
