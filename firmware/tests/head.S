# The runtime of pvlab's x86 test guests, in the manner of the Xen Test
# Framework: Xen ELF notes, a hypercall page, an entry that saves start_info
# and calls test_main, console output, and the "Test result:" line.

        .equ XEN_ELFNOTE_ENTRY, 1
        .equ XEN_ELFNOTE_HYPERCALL_PAGE, 2
        .equ XEN_ELFNOTE_VIRT_BASE, 3
        .equ XEN_ELFNOTE_PADDR_OFFSET, 4
        .equ XEN_ELFNOTE_XEN_VERSION, 5
        .equ XEN_ELFNOTE_GUEST_OS, 6
        .equ XEN_ELFNOTE_LOADER, 8
        .equ XEN_ELFNOTE_FEATURES, 10
        .include "hypercall.inc"

.macro note type
        .balign 4
        .long   2f - 1f
        .long   4f - 3f
        .long   \type
1:      .asciz  "Xen"
2:      .balign 4
3:
.endm
.macro endnote
4:      .balign 4
.endm

        .section .text.head, "ax"
        .globl  _start
_start:                                 # rsi = start_info, rsp = boot stack
        mov     %rsi, start_info(%rip)
        call    sym_free_pfn
        mov     %rax, next_free(%rip)   # alloc_page hands out pages below the top one
        call    test_main
        lea     s_result(%rip), %rdi
        call    puts
        lea     s_success(%rip), %rdi
        cmpq    $0, failures(%rip)
        je      1f
        lea     s_failure(%rip), %rdi
1:      call    puts
        # SCHEDOP_shutdown(SHUTDOWN_poweroff)
        movl    $SHUTDOWN_poweroff, shutdown_reason(%rip)
        mov     $SCHEDOP_shutdown, %edi
        lea     shutdown_reason(%rip), %rsi
        call    hypercall_page + HYPERCALL_sched_op * 32
        ud2

        .text
# puts(rdi = NUL-terminated string): console_io(CONSOLEIO_write)
        .globl  puts
puts:
        mov     %rdi, %rdx
        xor     %esi, %esi
1:      cmpb    $0, (%rdx,%rsi)
        je      2f
        inc     %rsi
        jmp     1b
2:      mov     $CONSOLEIO_write, %edi
        call    hypercall_page + HYPERCALL_console_io * 32
        ret

# put_hex(rdi = value): 16 hex digits
        .globl  put_hex
put_hex:
        lea     hexbuf(%rip), %rsi
        mov     $16, %ecx
1:      rol     $4, %rdi
        mov     %edi, %eax
        and     $0xf, %eax
        cmp     $10, %eax
        jb      2f
        add     $('a' - '0' - 10), %eax
2:      add     $'0', %eax
        mov     %al, (%rsi)
        inc     %rsi
        dec     %ecx
        jnz     1b
        movb    $0, (%rsi)
        lea     hexbuf(%rip), %rdi
        jmp     puts

# The symbols cases use: a free frame (the top page of RAM), the bootstrap L4.
# start_info fields: nr_pages 32, pt_base 88, mfn_list 104.
        .globl  sym_free_pfn, sym_free_mfn, sym_free_va, sym_l4_mfn, mfn_of_pfn
sym_free_pfn:
        mov     start_info(%rip), %rax
        mov     32(%rax), %rax
        dec     %rax
        ret
mfn_of_pfn:                             # rdi = pfn -> rax = mfn (the p2m list)
        mov     start_info(%rip), %rax
        mov     104(%rax), %rax
        mov     (%rax,%rdi,8), %rax
        ret
sym_free_mfn:
        call    sym_free_pfn
        mov     %rax, %rdi
        jmp     mfn_of_pfn
sym_free_va:
        call    sym_free_pfn
        mov     %rax, %rdi
        jmp     pfn_va
sym_l4_mfn:
        mov     start_info(%rip), %rax
        mov     88(%rax), %rdi
        movabs  $VIRT_BASE, %rax
        sub     %rax, %rdi
        shr     $12, %rdi
        jmp     mfn_of_pfn

# --- what test guests need to build pagetables ---------------------------------
        .globl  pfn_va, alloc_page, set_mapping, mmuext1, mmu_update1, expect_zero, say
        .globl  s_newline
# pfn_va(rdi = pfn) -> rax = the page's address in the kernel's mapping of RAM
pfn_va:
        mov     %rdi, %rax
        shl     $12, %rax
        movabs  $VIRT_BASE, %rdi
        add     %rdi, %rax
        ret

# alloc_page() -> rax = pfn of a zeroed page, taken from the top of RAM down
alloc_page:
        decq    next_free(%rip)
        mov     next_free(%rip), %rdi
        call    pfn_va
        mov     %rax, %rdi
        xor     %eax, %eax
        mov     $PAGE_WORDS, %ecx
        rep stosq
        mov     next_free(%rip), %rax
        ret

# set_mapping(rdi = pfn, rsi = flags) -> rax = rc: remap the kernel's mapping of
# a page (read-only before it becomes a pagetable, writable after)
set_mapping:
        push    %rbx
        push    %r12
        mov     %rdi, %rbx
        mov     %rsi, %r12
        call    mfn_of_pfn
        shl     $12, %rax
        or      %r12, %rax
        mov     %rax, %r12
        mov     %rbx, %rdi
        call    pfn_va
        mov     %rax, %rdi
        mov     %r12, %rsi
        mov     $UVMF_INVLPG, %edx
        call    hypercall_page + HYPERCALL_update_va_mapping * 32
        pop     %r12
        pop     %rbx
        ret

# mmuext1(edi = cmd, rsi = arg1) -> rax = rc: one mmuext_op
mmuext1:
        mov     %edi, mmuext_buf(%rip)
        movl    $0, mmuext_buf+4(%rip)
        mov     %rsi, mmuext_buf+8(%rip)
        movq    $0, mmuext_buf+16(%rip)
        lea     mmuext_buf(%rip), %rdi
        mov     $1, %esi
        xor     %edx, %edx
        mov     $DOMID_SELF, %r10d
        jmp     hypercall_page + HYPERCALL_mmuext_op * 32

# mmu_update1(rdi = ptr, rsi = val) -> rax = rc: one mmu_update request
mmu_update1:
        mov     %rdi, mu_buf(%rip)
        mov     %rsi, mu_buf+8(%rip)
        lea     mu_buf(%rip), %rdi
        mov     $1, %esi
        xor     %edx, %edx
        mov     $DOMID_SELF, %r10d
        jmp     hypercall_page + HYPERCALL_mmu_update * 32

# expect_zero(rax = rc, rdi = what): if rc is not 0, report it and count a failure
expect_zero:
        test    %rax, %rax
        jnz     1f
        ret
1:      push    %rax
        push    %rdi
        lea     s_unexpected(%rip), %rdi
        call    puts
        pop     %rdi
        call    puts
        mov     (%rsp), %rdi
        call    put_hex
        lea     s_newline(%rip), %rdi
        call    puts
        incq    failures(%rip)
        pop     %rax
        ret

# say(rdi = message): a line of output
say:
        call    puts
        lea     s_newline(%rip), %rdi
        jmp     puts

        .section .text.hypercall_page, "ax"
        .balign 4096
        .globl  hypercall_page
hypercall_page:
        .fill   4096, 1, 0xc3           # the hypervisor writes the stubs

        .section .rodata
s_result:  .asciz "Test result: "
s_success: .asciz "SUCCESS\n"
s_failure: .asciz "FAILURE\n"
s_unexpected: .asciz "error: unexpected result from "
s_newline: .asciz "\n"

        .data
        .globl  start_info, failures, scratch
start_info:     .quad 0
failures:       .quad 0
shutdown_reason: .long 0
        .balign 16
scratch:        .skip 256
hexbuf:         .skip 24
next_free:      .quad 0
mmuext_buf:     .skip 24
mu_buf:         .skip 16

        .section .note.Xen, "a"
        note XEN_ELFNOTE_GUEST_OS
        .asciz  "pvlab-tests"
        endnote
        note XEN_ELFNOTE_XEN_VERSION
        .asciz  "xen-3.0"
        endnote
        note XEN_ELFNOTE_LOADER
        .asciz  "generic"
        endnote
        note XEN_ELFNOTE_VIRT_BASE
        .quad   VIRT_BASE
        endnote
        note XEN_ELFNOTE_PADDR_OFFSET
        .quad   VIRT_BASE   # p_paddr is p_vaddr: libelf loads at p_paddr + VIRT_BASE - PADDR_OFFSET
        endnote
        note XEN_ELFNOTE_ENTRY
        .quad   _start
        endnote
        note XEN_ELFNOTE_HYPERCALL_PAGE
        .quad   hypercall_page
        endnote
        note XEN_ELFNOTE_FEATURES
        .asciz  "!writable_page_tables"
        endnote
