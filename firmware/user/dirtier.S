# dirtier: rewrite a set of pages again and again (a workload for dirty-page
# tracking and live migration).
#   arg0 (rdi) = pages (default 16, at most 256)
#   arg1 (rsi) = busy-loop iterations between passes (default 10000)
#   arg2 (rdx) = passes (default 100)
# Each pass writes the pass number into the first word of every page and a
# checksum (pass * page index + 1) into the second.
        .include "syscall.inc"
        .equ    MAX_PAGES, 256
        .text
        .globl _start
_start:
        mov     %rdi, %r12              # pages
        test    %r12, %r12
        jnz     1f
        mov     $16, %r12
1:      cmp     $MAX_PAGES, %r12
        jbe     2f
        mov     $MAX_PAGES, %r12
2:      mov     %rsi, %r13              # spin
        test    %r13, %r13
        jnz     3f
        mov     $10000, %r13
3:      mov     %rdx, %r14              # passes
        test    %r14, %r14
        jnz     4f
        mov     $100, %r14
4:
        lea     line(%rip), %rdi
        lea     s_start(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r12, %rsi
        call    fmt_dec
        movb    $'\n', (%rax)
        inc     %rax
        lea     line(%rip), %rdi
        mov     %rax, %rsi
        sub     %rdi, %rsi
        call    write_out

        lea     pages(%rip), %rbx
        xor     %r15d, %r15d            # pass
pass:
        xor     %ecx, %ecx              # page index
5:      mov     %rcx, %rdx
        shl     $12, %rdx
        mov     %r15, (%rbx,%rdx)
        mov     %r15, %rax
        imul    %rcx, %rax
        inc     %rax
        mov     %rax, 8(%rbx,%rdx)
        inc     %rcx
        cmp     %r12, %rcx
        jb      5b
        mov     %r13, %rcx
6:      dec     %rcx
        jnz     6b
        inc     %r15
        cmp     %r14, %r15
        jb      pass

        lea     line(%rip), %rdi
        lea     s_done(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r14, %rsi
        call    fmt_dec
        movb    $'\n', (%rax)
        inc     %rax
        lea     line(%rip), %rdi
        mov     %rax, %rsi
        sub     %rdi, %rsi
        call    write_out
        xor     %edi, %edi
        call    exit_prog

        .include "lib.inc"

        .section .rodata
s_start: .asciz "dirtier start pages="
s_done:  .asciz "dirtier done passes="

        .bss
        .balign 4096
pages:  .skip   MAX_PAGES * 4096
line:   .skip   64
