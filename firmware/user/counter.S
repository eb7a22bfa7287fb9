# counter: print "counter 1" .. "counter N", busy-looping between lines.
#   arg0 (rdi) = number of lines (default 5)
#   arg1 (rsi) = busy-loop iterations between lines (default 100000)
        .include "syscall.inc"
        .text
        .globl _start
_start:
        mov     %rdi, %r12              # lines
        test    %r12, %r12
        jnz     1f
        mov     $5, %r12
1:      mov     %rsi, %r13              # spin
        test    %r13, %r13
        jnz     2f
        mov     $100000, %r13
2:      mov     $1, %rbx                # line number
next_line:
        mov     %r13, %rcx
3:      dec     %rcx                    # burn time so the scheduler interleaves
        jnz     3b
        lea     line(%rip), %rdi
        lea     s_counter(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %rbx, %rsi
        call    fmt_dec
        movb    $'\n', (%rax)
        inc     %rax
        lea     line(%rip), %rdi
        mov     %rax, %rsi
        sub     %rdi, %rsi
        call    write_out
        inc     %rbx
        cmp     %r12, %rbx
        jbe     next_line
        xor     %edi, %edi
        call    exit_prog

        .include "lib.inc"

        .section .rodata
s_counter: .asciz "counter "

        .bss
line:   .skip   64
