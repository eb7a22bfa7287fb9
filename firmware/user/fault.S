# fault: print a line, then read from an address user mode may not touch (the
# kernel's text by default) and so be killed by the kernel.
#   arg0 (rdi) = the address to read (default VIRT_BASE)
        .include "syscall.inc"
        .include "macros.inc"
        .text
        .globl _start
_start:
        movabs  $0xffffffff80000000, %rax
        default %r12, %rdi, %rax
        lea     line(%rip), %rdi
        lea     s_msg(%rip), %rsi
        call    fmt_str
        call    print_line
        mov     (%r12), %rax            # the fault
        xor     %edi, %edi
        call    exit_prog               # never reached

        .include "lib.inc"

        .section .rodata
s_msg:  .asciz "fault: about to read where it may not"

        .bss
line:   .skip   64
