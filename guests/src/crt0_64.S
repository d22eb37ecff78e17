/* Entry for the ELF64 toy guests: long mode, identity paging, rdi = RAM size,
   rsp = top of RAM.  Calls main(ram_size) and exits with its return value. */
    .section .text.start, "ax"
    .globl _start
    .type _start, @function
_start:
    andq $-16, %rsp
    xorl %ebp, %ebp
    call main
    movl %eax, %edi
    call guest_exit
1:  hlt
    jmp 1b

    .section .note.GNU-stack, "", @progbits
