/* Shared helpers for the toy guests (freestanding, no libc). */
#ifndef HV_GUEST_H
#define HV_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#ifdef __x86_64__
typedef unsigned long uptr;
#else
typedef unsigned int uptr;
#endif

#define COM1 0x3F8
#define COM1_LSR 0x3FD
#define EXIT_PORT 0xF4

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

void putc(char c);
void puts(const char *s);          /* no newline added */
void put_dec(uptr v);
void put_dec_to(void (*out)(char), uptr v);   /* decimal through any sink */
void put_hex(uptr v);              /* 0x-prefixed */
void guest_exit(u8 code) __attribute__((noreturn));
void *memset(void *d, int c, uptr n);
void *memcpy(void *d, const void *s, uptr n);

#endif
