# hello: print one line and exit(0).
        .include "syscall.inc"
        .text
        .globl _start
_start:
        mov     $SYS_write, %eax
        mov     $1, %edi
        lea     msg(%rip), %rsi
        mov     $msg_len, %edx
        syscall
        mov     $SYS_exit, %eax
        xor     %edi, %edi
        syscall
        ud2                     # exit never returns

        .section .rodata
msg:    .ascii  "hello from user space\n"
        .equ    msg_len, . - msg
