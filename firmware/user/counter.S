# counter: print "counter 1" .. "counter N", busy-looping between lines.
#   arg0 (rdi) = number of lines (default 5)
#   arg1 (rsi) = busy-loop iterations between lines (default 100000)
        .include "syscall.inc"
        .include "macros.inc"
        .text
        .globl _start
_start:
        default %r12, %rdi, $5          # lines
        default %r13, %rsi, $100000     # spin
        mov     $1, %rbx                # line number
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
        call    print_line
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
