/* Multiboot v1 kernel: prints mem_lower/mem_upper to VGA text memory and to
   serial, then exits with code 0. */
#include "guest.h"

struct mb_info {
    u32 flags, mem_lower, mem_upper;
};

static volatile u16 *const vga = (volatile u16 *)0xB8000;
static int vga_pos;

static void both(char c)
{
    putc(c);
    if (c == '\n')
        vga_pos = (vga_pos / 80 + 1) * 80;
    else
        vga[vga_pos++] = (u16)(0x0700 | (u8)c);
}

static void both_s(const char *s) { while (*s) both(*s++); }

int mb_main(u32 magic, const struct mb_info *info)
{
    for (int i = 0; i < 80 * 25; i++)
        vga[i] = 0x0720;
    if (magic != 0x2BADB002) {
        both_s("mb_hello: bad magic\n");
        return 2;
    }
    if (!(info->flags & 1)) {
        both_s("mb_hello: no memory info\n");
        return 3;
    }
    both_s("mem_lower=");
    put_dec_to(both, info->mem_lower);
    both_s("KB mem_upper=");
    put_dec_to(both, info->mem_upper);
    both_s("KB\n");
    return 0;
}
