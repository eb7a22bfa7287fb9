# fdtest: a device file opened, read or written, closed (guestos/fs.py).
#   arg0 (rdi) = 0: read one chunk from node "loop0" (blocking while it is
#                   empty) and print it; 1: write a line to it
# Exit code: 0 if all went as the calls promise (read on a closed
# descriptor: -EBADF), else the step that failed (1 open, 2 read or write,
# 3 the closed descriptor answered otherwise).
        .include "syscall.inc"
        .include "macros.inc"
        .text
        .globl _start
_start:
        mov     %rdi, %r12              # mode
        mov     $SYS_open, %eax
        lea     node(%rip), %rdi
        mov     $O_RDWR, %esi
        syscall
        test    %rax, %rax
        js      fail_open
        mov     %rax, %r13              # fd
        test    %r12, %r12
        jnz     writer
        mov     $SYS_read, %eax
        mov     %r13, %rdi
        lea     buf(%rip), %rsi
        mov     $64, %edx
        syscall
        test    %rax, %rax
        jle     fail_rw
        mov     %rax, %rsi              # print what came
        lea     buf(%rip), %rdi
        call    write_out
        jmp     close
writer:
        mov     $SYS_write, %eax
        mov     %r13, %rdi
        lea     msg(%rip), %rsi
        mov     $msg_len, %edx
        syscall
        cmp     $msg_len, %rax
        jne     fail_rw
close:
        mov     $SYS_close, %eax
        mov     %r13, %rdi
        syscall
        mov     $SYS_read, %eax         # the descriptor is gone now
        mov     %r13, %rdi
        lea     buf(%rip), %rsi
        mov     $1, %edx
        syscall
        cmp     $-9, %rax               # -EBADF
        jne     fail_closed
        xor     %edi, %edi
        call    exit_prog
fail_open:
        mov     $1, %edi
        call    exit_prog
fail_rw:
        mov     $2, %edi
        call    exit_prog
fail_closed:
        mov     $3, %edi
        call    exit_prog

        .include "lib.inc"

        .section .rodata
node:   .asciz  "loop0"
msg:    .ascii  "fdtest: a line through loop0\n"
        .equ    msg_len, . - msg

        .bss
buf:    .skip   64
line:   .skip   64
