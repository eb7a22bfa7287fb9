# The runtime of pvlab's x86 test guests, in the manner of the Xen Test
# Framework: Xen ELF notes, a hypercall page, an entry that saves start_info
# and calls test_main, console output, and the verdict: a test reports through
# xtf_success / xtf_skip / xtf_error / xtf_failure, the worst wins, and the last
# line is "Test result: <verdict>" before the domain powers off.

        .include "hypercall.inc"
        .include "elfnote.inc"

        .section .text.head, "ax"
        .globl  _start
_start:                                 # rsi = start_info, rsp = boot stack
        mov     %rsi, start_info(%rip)
        call    sym_free_pfn
        mov     %rax, next_free(%rip)   # alloc_page hands out pages below the top one
        call    test_main
        call    xtf_report_status
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

# put_dec(rdi = value): its decimal digits, no leading zeros
        .globl  put_dec, put_sdec
put_dec:
        mov     %rdi, %rax
        lea     decbuf+20(%rip), %rsi
        movb    $0, (%rsi)
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %rcx
        add     $'0', %dl
        dec     %rsi
        mov     %dl, (%rsi)
        test    %rax, %rax
        jnz     1b
        mov     %rsi, %rdi
        jmp     puts

# put_sdec(rdi = value): as a signed number (an errno shows as -22)
put_sdec:
        test    %rdi, %rdi
        jns     put_dec
        push    %rdi
        lea     s_minus(%rip), %rdi
        call    puts
        pop     %rdi
        neg     %rdi
        jmp     put_dec

# --- the verdict, as the Xen Test Framework keeps it (common/report.c) ---------
# xtf_success/skip/error/failure(rdi = a line to print, or 0): the verdict
# becomes this one if it is worse (RUNNING < SUCCESS < SKIP < ERROR < FAILURE),
# so a skip is never reported as a success and a failure is never hidden.
        .globl  xtf_success, xtf_skip, xtf_error, xtf_failure, xtf_report_status
xtf_success:
        mov     $STATUS_SUCCESS, %eax
        jmp     set_status
xtf_skip:
        mov     $STATUS_SKIP, %eax
        jmp     set_status
xtf_error:
        mov     $STATUS_ERROR, %eax
        jmp     set_status
xtf_failure:
        mov     $STATUS_FAILURE, %eax
set_status:
        cmp     test_status(%rip), %rax
        jbe     1f
        mov     %rax, test_status(%rip)
1:      test    %rdi, %rdi
        jnz     say
        ret

# xtf_report_status(): "Test result: <verdict>" as the last line; a test that
# reported nothing is an ERROR
xtf_report_status:
        cmpq    $STATUS_SUCCESS, test_status(%rip)
        jae     1f
        lea     s_no_status(%rip), %rdi
        call    xtf_error
1:      lea     s_result(%rip), %rdi
        call    puts
        mov     test_status(%rip), %rax
        lea     status_names(%rip), %rdx
        mov     (%rdx,%rax,8), %rdi
        jmp     say

# check_rc(rax = result, rdi = "case.step", rsi = wanted, edx = 1 to check it):
# prints "rc case.step <hex>"; a result other than the wanted one prints both
# and is a FAILURE
        .globl  check_rc, save_buffer
check_rc:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        mov     %rax, %rbx
        mov     %rdi, %r12
        mov     %rsi, %r13
        mov     %edx, %r14d
        lea     s_rc(%rip), %rdi
        call    puts
        mov     %r12, %rdi
        call    puts
        lea     s_space(%rip), %rdi
        call    puts
        mov     %rbx, %rdi
        call    put_hex
        lea     s_newline(%rip), %rdi
        call    puts
        test    %r14d, %r14d
        jz      1f
        cmp     %r13, %rbx
        je      1f
        lea     s_failure(%rip), %rdi
        call    puts
        mov     %r12, %rdi
        call    puts
        lea     s_got(%rip), %rdi
        call    puts
        mov     %rbx, %rdi
        call    put_sdec
        lea     s_wanted(%rip), %rdi
        call    puts
        mov     %r13, %rdi
        call    put_sdec
        lea     s_newline(%rip), %rdi
        call    puts
        xor     %edi, %edi
        call    xtf_failure
1:      mov     %rbx, %rax
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

# save_buffer(): keep the argument buffer as the hypercall left it (lastbuf),
# for the next step to read; rax is kept
save_buffer:
        push    %rax
        lea     scratch(%rip), %rsi
        lea     lastbuf(%rip), %rdi
        mov     $BUF_WORDS, %ecx
        rep movsq
        pop     %rax
        ret

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

# The page below the top one (a second free page), the bootstrap tables on the
# top page's path, and where the p2m list keeps the top page's frame.
        .globl  sym_spare_pfn, sym_spare_mfn, sym_spare_va, sym_free_l1e, sym_l2_mfn
        .globl  sym_p2m_free, table_mfn
sym_spare_pfn:
        call    sym_free_pfn
        dec     %rax
        ret
sym_spare_mfn:
        call    sym_spare_pfn
        mov     %rax, %rdi
        jmp     mfn_of_pfn
sym_spare_va:
        call    sym_spare_pfn
        mov     %rax, %rdi
        jmp     pfn_va
sym_p2m_free:
        call    sym_free_pfn
        mov     start_info(%rip), %rdx
        mov     104(%rdx), %rdx
        lea     (%rdx,%rax,8), %rax
        ret
sym_l2_mfn:
        call    sym_free_va
        mov     %rax, %rdi
        mov     $2, %esi
        jmp     table_mfn
sym_free_l1e:                           # machine address of the L1 entry mapping free_va
        call    sym_free_va
        push    %rax
        mov     %rax, %rdi
        mov     $1, %esi
        call    table_mfn
        pop     %rdx
        shr     $12, %rdx
        and     $511, %edx
        shl     $12, %rax
        lea     (%rax,%rdx,8), %rax
        ret

# table_mfn(rdi = va, esi = level) -> rax = the mfn of the level's table (4: the
# L4 ... 1: the L1) on va's path in the bootstrap tables, read through the M2P
# and the kernel's mapping of RAM, as a PV kernel walks its own tables
table_mfn:
        push    %rbx
        push    %r12
        push    %r13
        mov     %rdi, %rbx
        mov     %esi, %r12d
        call    sym_l4_mfn
        mov     $4, %r13d
1:      cmp     %r12d, %r13d
        jbe     2f
        movabs  $MACH2PHYS_VIRT_START, %rdx
        mov     (%rdx,%rax,8), %rdi
        call    pfn_va
        lea     -1(%r13), %ecx          # the index's shift: 12 + 9 * (level - 1)
        imul    $9, %ecx
        add     $12, %ecx
        mov     %rbx, %rdx
        shr     %cl, %rdx
        and     $511, %edx
        mov     (%rax,%rdx,8), %rax
        movabs  $PTE_FRAME_MASK, %rdx
        and     %rdx, %rax
        shr     $12, %rax
        dec     %r13d
        jmp     1b
2:      pop     %r13
        pop     %r12
        pop     %rbx
        ret

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

# expect_zero(rax = rc, rdi = what): a result other than 0 is printed and is
# a FAILURE (the hypervisor answered otherwise than Xen does); rax is kept
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
        call    put_sdec
        lea     s_newline(%rip), %rdi
        call    puts
        xor     %edi, %edi
        call    xtf_failure
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
s_unexpected: .asciz "FAILURE: unexpected result from "
s_no_status: .asciz "Test did not report a status"
s_failure: .asciz "FAILURE: "
s_got:     .asciz ": got "
s_wanted:  .asciz ", wanted "
s_rc:      .asciz "rc "
s_space:   .asciz " "
s_minus:   .asciz "-"
s_newline: .asciz "\n"
s_running: .asciz "RUNNING"
s_succ:    .asciz "SUCCESS"
s_skip:    .asciz "SKIP"
s_error:   .asciz "ERROR"
s_fail:    .asciz "FAILURE"
        .balign 8
status_names: .quad s_running, s_succ, s_skip, s_error, s_fail

        .data
        .globl  start_info, test_status, scratch, lastbuf
start_info:     .quad 0
test_status:    .quad STATUS_RUNNING
shutdown_reason: .long 0
        .balign 16
scratch:        .skip BUF_WORDS * 8     # a case's argument buffer
lastbuf:        .skip BUF_WORDS * 8     # ... as the last hypercall left it
hexbuf:         .skip 24
decbuf:         .skip 24
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
