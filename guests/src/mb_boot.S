/* Multiboot v1 header and 32-bit entry for mb_hello. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003   /* bit 0: page-align modules, bit 1: memory info */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text.start, "ax"
    .globl _start
    .type _start, @function
_start:
    movl $stack_top, %esp
    xorl %ebp, %ebp
    pushl %ebx                /* multiboot info */
    pushl %eax                /* magic */
    call mb_main
    pushl %eax
    call guest_exit
1:  hlt
    jmp 1b

    .section .bss
    .align 16
stack_bottom:
    .skip 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
