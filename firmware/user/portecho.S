# portecho: echo a virtio-console port back to the host, upper-cased
# (guestos/drivers/virtio_console.py).
#   arg0 (rdi) = the port's id, 1 to 9 (0: port 1): node "vport0p<id>"
# Each chunk read is written back with a-z made A-Z, and the console says
# "portecho: echoed N bytes". A read that returns 0 is the end of file (the
# host side closed): "portecho: end of file", exit 0. Exit code 1 if the
# open failed, 2 if a read or write did.
        .include "syscall.inc"
        .include "macros.inc"
        .text
        .globl _start
_start:
        default %rax, %rdi, $1
        add     $'0', %al
        movb    %al, node_id(%rip)
        mov     $SYS_open, %eax
        lea     node(%rip), %rdi
        mov     $O_RDWR, %esi
        syscall
        test    %rax, %rax
        js      fail_open
        mov     %rax, %r13              # fd
again:
        mov     $SYS_read, %eax
        mov     %r13, %rdi
        lea     buf(%rip), %rsi
        mov     $4096, %edx
        syscall
        test    %rax, %rax
        js      fail_rw
        jz      eof
        mov     %rax, %r14              # bytes read
        lea     buf(%rip), %rdi         # upper-case them
        mov     %r14, %rcx
1:      movb    (%rdi), %dl
        cmp     $'a', %dl
        jb      2f
        cmp     $'z', %dl
        ja      2f
        sub     $('a' - 'A'), %dl
        movb    %dl, (%rdi)
2:      inc     %rdi
        dec     %rcx
        jnz     1b
        mov     $SYS_write, %eax
        mov     %r13, %rdi
        lea     buf(%rip), %rsi
        mov     %r14, %rdx
        syscall
        cmp     %r14, %rax
        jne     fail_rw
        lea     line(%rip), %rdi        # "portecho: echoed N bytes"
        lea     echoed(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r14, %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     bytes(%rip), %rsi
        call    fmt_str
        call    print_line
        jmp     again
eof:
        lea     line(%rip), %rdi
        lea     ended(%rip), %rsi
        call    fmt_str
        call    print_line
        mov     $SYS_close, %eax
        mov     %r13, %rdi
        syscall
        xor     %edi, %edi
        call    exit_prog
fail_open:
        mov     $1, %edi
        call    exit_prog
fail_rw:
        mov     $2, %edi
        call    exit_prog

        .include "lib.inc"

        .section .rodata
echoed: .asciz  "portecho: echoed "
bytes:  .asciz  " bytes"
ended:  .asciz  "portecho: end of file"

        .data
node:   .ascii  "vport0p"
node_id: .byte  '1'
        .byte   0

        .bss
buf:    .skip   4096
line:   .skip   64
