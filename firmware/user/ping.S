# ping: ICMP echo requests through the "icmp" node (guestos/inet.py), and
# Linux ping's lines for each reply and its summary.
#   arg0 (rdi) = the address, a u32 (0x0a000202 is 10.0.2.2, the default)
#   arg1 (rsi) = how many requests (default 4)
#   arg2 (rdx) = milliseconds between them (default 1000)
# Each request is a write of {u32 address, u16 seq, u16 0}; ping then sleeps
# the interval and reads every reply that came, {u32 from, u16 seq, u8 ttl,
# u8 0, u32 rtt_us, u32 bytes} (a read gives 0 bytes when none has).
# Exit code: 0 if a reply came, 1 if none, 2 if there is no icmp node.
        .include "syscall.inc"
        .include "macros.inc"
        .text
        .globl _start
_start:
        default %r12, %rdi, $0x0a000202
        default %r13, %rsi, $4
        default %r14, %rdx, $1000
        mov     $SYS_open, %eax
        lea     node(%rip), %rdi
        mov     $O_RDWR, %esi
        syscall
        test    %rax, %rax
        js      no_node
        mov     %rax, %r15              # fd
        # PING a.b.c.d 56(84) bytes of data.
        lea     line(%rip), %rdi
        lea     s_ping(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r12, %rsi
        call    fmt_ip
        mov     %rax, %rdi
        lea     s_data(%rip), %rsi
        call    fmt_str
        call    print_line
        mov     $1, %ebx                # seq
next:
        cmp     %r13, %rbx
        ja      done
        lea     req(%rip), %rsi
        mov     %r12d, (%rsi)
        mov     %bx, 4(%rsi)
        movw    $0, 6(%rsi)
        mov     $SYS_write, %eax
        mov     %r15, %rdi
        mov     $8, %edx
        syscall
        incq    sent(%rip)              # transmitted, as ping counts a request sent
        mov     $SYS_sleep, %eax
        mov     %r14, %rdi
        syscall
        call    drain
        inc     %rbx
        jmp     next
done:
        call    drain
        # --- a.b.c.d ping statistics ---
        lea     line(%rip), %rdi
        lea     s_stats0(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r12, %rsi
        call    fmt_ip
        mov     %rax, %rdi
        lea     s_stats1(%rip), %rsi
        call    fmt_str
        call    print_line
        # N packets transmitted, M received, X% packet loss
        lea     line(%rip), %rdi
        mov     sent(%rip), %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_tx(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     recvd(%rip), %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_rx(%rip), %rsi
        call    fmt_str
        mov     %rax, %rbp
        mov     sent(%rip), %rcx
        mov     recvd(%rip), %rax
        cmp     %rcx, %rax              # duplicates: no negative loss
        jbe     1f
        mov     %rcx, %rax
1:      mov     %rcx, %rsi
        sub     %rax, %rsi
        imul    $100, %rsi, %rax
        xor     %edx, %edx
        test    %rcx, %rcx
        jz      2f
        div     %rcx
2:      mov     %rax, %rsi
        mov     %rbp, %rdi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_loss(%rip), %rsi
        call    fmt_str
        call    print_line
        xor     %edi, %edi
        cmpq    $0, recvd(%rip)
        jne     3f
        mov     $1, %edi
3:      call    exit_prog
no_node:
        lea     line(%rip), %rdi
        lea     s_nonode(%rip), %rsi
        call    fmt_str
        call    print_line
        mov     $2, %edi
        call    exit_prog

# Read and print every reply that has come.
drain:
        push    %rbx
1:      mov     $SYS_read, %eax
        mov     %r15, %rdi
        lea     rep(%rip), %rsi
        mov     $16, %edx
        syscall
        cmp     $16, %rax
        jne     9f
        incq    recvd(%rip)
        # B bytes from a.b.c.d: icmp_seq=N time=T.TTT ms
        lea     line(%rip), %rdi
        mov     rep+12(%rip), %esi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_from(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     rep(%rip), %esi
        call    fmt_ip
        mov     %rax, %rdi
        lea     s_seq(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        movzwl  rep+4(%rip), %esi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_time(%rip), %rsi
        call    fmt_str
        mov     %rax, %rbx              # the line so far
        mov     rep+8(%rip), %eax       # rtt in us: ms, then three digits
        xor     %edx, %edx
        mov     $1000, %ecx
        div     %ecx
        push    %rdx
        mov     %rbx, %rdi
        mov     %rax, %rsi
        call    fmt_dec
        pop     %rdx
        movb    $'.', (%rax)
        inc     %rax
        mov     %rax, %rdi
        mov     %edx, %eax              # the fraction, 000..999
        xor     %edx, %edx
        mov     $100, %ecx
        div     %ecx
        add     $'0', %al
        mov     %al, (%rdi)
        mov     %edx, %eax
        xor     %edx, %edx
        mov     $10, %ecx
        div     %ecx
        add     $'0', %al
        mov     %al, 1(%rdi)
        add     $'0', %dl
        mov     %dl, 2(%rdi)
        add     $3, %rdi
        lea     s_ms(%rip), %rsi
        call    fmt_str
        call    print_line
        jmp     1b
9:      pop     %rbx
        ret

# Append the dotted form of the u32 address in esi at rdi; returns the end in rax.
fmt_ip:
        push    %rbx
        push    %rbp
        mov     %esi, %ebx
        mov     $24, %ebp
1:      mov     %ebx, %esi
        mov     %ebp, %ecx
        shr     %cl, %esi
        and     $0xff, %esi
        call    fmt_dec
        mov     %rax, %rdi
        sub     $8, %ebp
        js      2f
        movb    $'.', (%rdi)
        inc     %rdi
        jmp     1b
2:      pop     %rbp
        pop     %rbx
        ret

        .include "lib.inc"

        .section .rodata
node:     .asciz  "icmp"
s_ping:   .asciz  "PING "
s_data:   .asciz  " 56(84) bytes of data."
s_from:   .asciz  " bytes from "
s_seq:    .asciz  ": icmp_seq="
s_time:   .asciz  " time="
s_ms:     .asciz  " ms"
s_stats0: .asciz  "--- "
s_stats1: .asciz  " ping statistics ---"
s_tx:     .asciz  " packets transmitted, "
s_rx:     .asciz  " received, "
s_loss:   .asciz  "% packet loss"
s_nonode: .asciz  "ping: no icmp node: the kernel has no network device"

        .data
sent:   .quad   0
recvd:  .quad   0

        .bss
req:    .skip   8
rep:    .skip   16
line:   .skip   128
