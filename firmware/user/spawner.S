# spawner: start counters as new tasks, sleeping between them, then exit.
#   arg0 (rdi) = number of children (default 3)
#   arg1 (rsi) = lines each child counts (default 3)
#   arg2 (rdx) = milliseconds to sleep after each spawn (default 10)
        .include "syscall.inc"
        .include "macros.inc"
        .text
        .globl _start
_start:
        default %r12, %rdi, $3          # children
        default %r13, %rsi, $3          # their lines
        default %r14, %rdx, $10         # sleep
        xor     %ebx, %ebx
next_child:
        mov     $SYS_spawn, %eax
        lea     s_child(%rip), %rdi
        mov     %r13, %rsi
        mov     $20000, %edx            # the child's spin between lines
        xor     %r10d, %r10d
        syscall
        mov     %rax, %r15
        lea     line(%rip), %rdi
        lea     s_spawned(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r15, %rsi
        call    fmt_dec
        call    print_line
        mov     $SYS_sleep, %eax
        mov     %r14, %rdi
        syscall
        inc     %rbx
        cmp     %r12, %rbx
        jb      next_child
        xor     %edi, %edi
        call    exit_prog

        .include "lib.inc"

        .section .rodata
s_child:   .asciz "counter"
s_spawned: .asciz "spawner: started pid "

        .bss
line:   .skip   64
