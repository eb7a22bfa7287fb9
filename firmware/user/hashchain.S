# hashchain: iterate a hash over a buffer spread across many pages, and print
# its digest: the reference workload whose result must not change whatever
# happens to the guest meanwhile (save, restore, migration, ballooning).
#   arg0 (rdi) = rounds (default 100)
#   arg1 (rsi) = pages (default 64, at most 256)
#
# word i of the buffer starts as (i + 1) * 0x9E3779B97F4A7C15; then for each
# round r and each word i:  h = rotl((h ^ buf[i]) * 0x100000001b3, 17);
# buf[i] = h ^ r. The digest is h, printed as 16 hex digits.
        .include "syscall.inc"
        .include "macros.inc"
        .equ    MAX_PAGES, 256
        .text
        .globl _start
_start:
        default %r12, %rdi, $100        # rounds
        default %r13, %rsi, $64         # pages
        clamp   %r13, $MAX_PAGES
        # "hashchain start rounds=R pages=P\n"
        lea     line(%rip), %rdi
        lea     s_start(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r12, %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_pages(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r13, %rsi
        call    fmt_dec
        call    print_line

        # initialise the buffer
        mov     %r13, %r14
        shl     $9, %r14                # words = pages * 512
        lea     buffer(%rip), %rbx
        movabs  $0x9E3779B97F4A7C15, %rcx
        mov     %rcx, %rax              # (i + 1) * k, by repeated addition
        xor     %edx, %edx
4:      mov     %rax, (%rbx,%rdx,8)
        add     %rcx, %rax
        inc     %rdx
        cmp     %r14, %rdx
        jb      4b

        # the chain
        movabs  $0xcbf29ce484222325, %rax   # h
        movabs  $0x100000001b3, %r8         # FNV prime
        xor     %r15d, %r15d                # round
round:
        xor     %edx, %edx                  # word index
5:      xor     (%rbx,%rdx,8), %rax
        imul    %r8, %rax
        rol     $17, %rax
        mov     %rax, %rcx
        xor     %r15, %rcx
        mov     %rcx, (%rbx,%rdx,8)
        inc     %rdx
        cmp     %r14, %rdx
        jb      5b
        inc     %r15
        cmp     %r12, %r15
        jb      round

        # "hashchain digest <16 hex>\n"
        mov     %rax, %rbp
        lea     line(%rip), %rdi
        lea     s_digest(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %rbp, %rsi
        call    fmt_hex16
        call    print_line
        xor     %edi, %edi
        call    exit_prog

        .include "lib.inc"

        .section .rodata
s_start:  .asciz "hashchain start rounds="
s_pages:  .asciz " pages="
s_digest: .asciz "hashchain digest "

        .bss
        .balign 4096
buffer: .skip   MAX_PAGES * 4096
line:   .skip   128
