# dirtier: rewrite a set of pages again and again (a workload for dirty-page
# tracking and live migration).
#   arg0 (rdi) = pages (default 16, at most 256)
#   arg1 (rsi) = busy-loop iterations between passes (default 10000)
#   arg2 (rdx) = passes (default 100)
# Each pass writes the pass number into the first word of every page and a
# checksum (pass * page index + 1) into the second.
        .include "syscall.inc"
        .include "macros.inc"
        .equ    MAX_PAGES, 256
        .text
        .globl _start
_start:
        default %r12, %rdi, $16         # pages
        clamp   %r12, $MAX_PAGES
        default %r13, %rsi, $10000      # spin
        default %r14, %rdx, $100        # passes
        lea     line(%rip), %rdi
        lea     s_start(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r12, %rsi
        call    fmt_dec
        call    print_line

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
        call    print_line
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
