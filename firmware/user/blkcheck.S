# blkcheck: write blocks of a seeded pattern to the disk "vda", flush, read
# them back and print a checksum; a counter sector after the blocks is read,
# incremented and written back once per write, so a write lost or applied
# twice shows in its count (guestos/drivers/virtio_blk.py).
#   arg0 (rdi) = blocks of 4 KiB (default 16, at most 256; rounded up to even:
#                each write(2) carries two, 8 KiB in two segments)
#   arg1 (rsi) = seed (default 1)
#   arg2 (rdx) = first sector (default 0); the counter is the sector after
#                the blocks
# Word w of block b is ((seed << 32) + 512 * b + w + 1) * 0x9E3779B97F4A7C15;
# the checksum is FNV-1a over the words read back, 64-bit, words as units:
# h = (h ^ word) * 0x100000001b3 from h = 0xcbf29ce484222325.
# Prints "blkcheck start ...", then "blkcheck checksum H counter C bad B".
# Exit code 0, or the step that failed: 1 open, 2 write, 3 flush, 4 read,
# 5 words read back that differ (bad > 0).
        .include "syscall.inc"
        .include "macros.inc"
        .equ    MAX_BLOCKS, 256
        .equ    CHUNK, 8192             # bytes a write(2) or read(2) carries
        .equ    BLKGETSIZE64, 0x80081272
        .equ    BLKFLSBUF, 0x1261
        .equ    EAGAIN, 11
        .text
        .globl _start
_start:
        default %r12, %rdi, $16         # blocks
        clamp   %r12, $MAX_BLOCKS
        inc     %r12
        and     $-2, %r12               # even
        default %r13, %rsi, $1          # seed
        mov     %rdx, %r14              # first sector
        mov     $SYS_open, %eax
        lea     node(%rip), %rdi
        mov     $O_RDWR, %esi
        syscall
        test    %rax, %rax
        js      fail_open
        mov     %rax, %r15              # fd
        mov     $SYS_ioctl, %eax
        mov     %r15, %rdi
        mov     $BLKGETSIZE64, %esi
        lea     size(%rip), %rdx
        syscall
        # "blkcheck start bytes=SIZE blocks=N seed=S"
        lea     line(%rip), %rdi
        lea     s_start(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     size(%rip), %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_blocks(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r12, %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_seed(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r13, %rsi
        call    fmt_dec
        call    print_line

        # the writes, each followed by the counter's read-increment-write
        xor     %ebx, %ebx              # block
write_loop:
        mov     %rbx, %rdi
        call    fill
        mov     %rbx, %rdi
        call    seek_block
        mov     $SYS_write, %eax
        mov     %r15, %rdi
        lea     buf(%rip), %rsi
        mov     $CHUNK, %edx
        syscall
        cmp     $CHUNK, %rax
        jne     fail_write
        call    seek_counter
        mov     $SYS_read, %eax
        mov     %r15, %rdi
        lea     cbuf(%rip), %rsi
        mov     $512, %edx
        syscall
        cmp     $512, %rax
        jne     fail_read
        incq    cbuf(%rip)
        call    seek_counter
        mov     $SYS_write, %eax
        mov     %r15, %rdi
        lea     cbuf(%rip), %rsi
        mov     $512, %edx
        syscall
        cmp     $512, %rax
        jne     fail_write
        add     $2, %rbx
        cmp     %r12, %rbx
        jb      write_loop

flush:  mov     $SYS_ioctl, %eax
        mov     %r15, %rdi
        mov     $BLKFLSBUF, %esi
        xor     %edx, %edx
        syscall
        cmp     $-EAGAIN, %rax          # every slot busy: try again
        jne     1f
        mov     $SYS_sched_yield, %eax
        syscall
        jmp     flush
1:      test    %rax, %rax
        jnz     fail_flush

        # read back: the checksum, and the words that differ from the pattern
        movabs  $0xcbf29ce484222325, %rbp   # h
        xor     %ebx, %ebx
        movq    $0, bad(%rip)
read_loop:
        mov     %rbx, %rdi
        call    seek_block
        mov     $SYS_read, %eax
        mov     %r15, %rdi
        lea     buf(%rip), %rsi
        mov     $CHUNK, %edx
        syscall
        cmp     $CHUNK, %rax
        jne     fail_read
        mov     %rbx, %rdi
        call    check
        add     $2, %rbx
        cmp     %r12, %rbx
        jb      read_loop
        call    seek_counter
        mov     $SYS_read, %eax
        mov     %r15, %rdi
        lea     cbuf(%rip), %rsi
        mov     $512, %edx
        syscall
        cmp     $512, %rax
        jne     fail_read

        # "blkcheck checksum H counter C bad B"
        lea     line(%rip), %rdi
        lea     s_sum(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %rbp, %rsi
        call    fmt_hex16
        mov     %rax, %rdi
        lea     s_counter(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     cbuf(%rip), %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_bad(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     bad(%rip), %rsi
        call    fmt_dec
        call    print_line
        mov     $SYS_close, %eax
        mov     %r15, %rdi
        syscall
        xor     %edi, %edi
        cmpq    $0, bad(%rip)
        je      2f
        mov     $5, %edi
2:      call    exit_prog

# rax = the pattern's word at global index rdi (clobbers rdx)
pattern:
        mov     %r13, %rax
        shl     $32, %rax
        lea     1(%rax,%rdi), %rax
        movabs  $0x9E3779B97F4A7C15, %rdx
        imul    %rdx, %rax
        ret

# buf = blocks rdi and rdi + 1 of the pattern
fill:
        push    %rbx
        mov     %rdi, %rbx
        shl     $9, %rbx                # the first word's global index
        xor     %ecx, %ecx
1:      lea     (%rbx,%rcx), %rdi
        call    pattern
        lea     buf(%rip), %rdx
        mov     %rax, (%rdx,%rcx,8)
        inc     %rcx
        cmp     $(CHUNK / 8), %rcx
        jb      1b
        pop     %rbx
        ret

# fold buf (blocks rdi, rdi + 1) into h (rbp); count the words that differ
check:
        push    %rbx
        mov     %rdi, %rbx
        shl     $9, %rbx
        xor     %ecx, %ecx
1:      lea     buf(%rip), %rdx
        mov     (%rdx,%rcx,8), %rsi
        xor     %rsi, %rbp
        movabs  $0x100000001b3, %rax
        imul    %rax, %rbp
        lea     (%rbx,%rcx), %rdi
        call    pattern
        cmp     %rax, %rsi
        je      2f
        incq    bad(%rip)
2:      inc     %rcx
        cmp     $(CHUNK / 8), %rcx
        jb      1b
        pop     %rbx
        ret

# lseek(fd, (first + 8 * rdi) * 512, SEEK_SET)
seek_block:
        lea     (%r14,%rdi,8), %rsi
        shl     $9, %rsi
        jmp     seek
# lseek(fd, (first + 8 * blocks) * 512, SEEK_SET): the counter sector
seek_counter:
        lea     (%r14,%r12,8), %rsi
        shl     $9, %rsi
seek:   mov     $SYS_lseek, %eax
        mov     %r15, %rdi
        xor     %edx, %edx
        syscall
        ret

fail_open:
        mov     $1, %edi
        jmp     fail
fail_write:
        mov     $2, %edi
        jmp     fail
fail_flush:
        mov     $3, %edi
        jmp     fail
fail_read:
        mov     $4, %edi
fail:   push    %rdi
        push    %rax
        lea     line(%rip), %rdi
        lea     s_fail(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     8(%rsp), %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_rc(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     (%rsp), %rsi
        neg     %rsi                    # an -errno, printed as errno
        call    fmt_dec
        call    print_line
        pop     %rax
        pop     %rdi
        call    exit_prog

        .include "lib.inc"

        .section .rodata
node:      .asciz "vda"
s_start:   .asciz "blkcheck start bytes="
s_blocks:  .asciz " blocks="
s_seed:    .asciz " seed="
s_sum:     .asciz "blkcheck checksum "
s_counter: .asciz " counter "
s_bad:     .asciz " bad "
s_fail:    .asciz "blkcheck FAILED step "
s_rc:      .asciz " errno "

        .bss
        .balign 4096
buf:    .skip   CHUNK
cbuf:   .skip   512
size:   .skip   8
bad:    .skip   8
line:   .skip   128
