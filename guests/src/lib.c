/* Serial output, exit and the two functions gcc may call on its own. */
#include "guest.h"

void putc(char c)
{
    /* Wait for THR empty (LSR bit 5); bounded so an emulator without port
       reads cannot hang us. */
    for (int i = 0; i < 1000; i++)
        if (inb(COM1_LSR) & 0x20)
            break;
    outb(COM1, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

void put_dec_to(void (*out)(char), uptr v)
{
    char buf[24];
    int i = 0;
    do {
        buf[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        out(buf[--i]);
}

void put_dec(uptr v)
{
    put_dec_to(putc, v);
}

void put_hex(uptr v)
{
    static const char digits[] = "0123456789abcdef";
    int started = 0;
    puts("0x");
    for (int sh = (int)sizeof(uptr) * 8 - 4; sh >= 0; sh -= 4) {
        int d = (int)((v >> sh) & 15);
        if (d || started || sh == 0) {
            putc(digits[d]);
            started = 1;
        }
    }
}

void guest_exit(u8 code)
{
    outb(EXIT_PORT, code);
    for (;;)
        __asm__ volatile("hlt");
}

void *memset(void *d, int c, uptr n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, uptr n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}
