# Writable pagetables: a PV guest kernel writes an entry of one of its own L1
# pagetables through the read-only mapping it has of that table, and the
# hypervisor emulates the write as Xen does (arch/x86/pv/ro-page-fault.c,
# reached from fixup_page_fault in arch/x86/traps.c once the guest has enabled
# VMASST_TYPE_writable_pagetables). The L1 used is the bootstrap one that maps
# a page of the guest's RAM; the guest finds it by walking its own tables.
# Each check prints "ptwr: <what>: ok" or counts a failure.
        .include "hypercall.inc"

        .equ HYPERCALL_set_trap_table, 0
        .equ HYPERCALL_vm_assist, 21
        .equ HYPERCALL_iret, 23
        .equ VMASST_CMD_enable, 0
        .equ VMASST_TYPE_writable_pagetables, 2
        .equ MMUEXT_INVLPG_LOCAL, 7
        .equ MACH2PHYS_VIRT_START, 0xffff800000000000
        .equ PFEC_PRESENT_WRITE, 3
        .equ FRAME_MASK, 0x000ffffffffff000
        # a user page's entry as Xen keeps it (adjust_guest_l1e adds _PAGE_GLOBAL),
        # so that it reads back as written
        .equ PAGE_GLOBAL, 0x100

        .text
        .globl  test_main
test_main:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        lea     traps(%rip), %rax
        mov     %rax, %rdi
        call    hypercall_page + HYPERCALL_set_trap_table * 32
        lea     s_traps(%rip), %rdi
        call    expect_zero

        call    alloc_page
        mov     %rax, %r12              # X: the page whose mapping is rewritten
        call    alloc_page
        mov     %rax, %r13              # Y: the page it is pointed at
        mov     %r12, %rdi
        call    pfn_va
        mov     %rax, %rbx              # va of X
        movq    $MARK_X, (%rax)
        mov     %r13, %rdi
        call    pfn_va
        movq    $MARK_Y, (%rax)
        mov     %rbx, %rdi
        call    l1e_va
        mov     %rax, %r14              # the L1 entry mapping X, through the RO map
        mov     (%r14), %r15            # its value now
        mov     %r15, orig_pte(%rip)
        mov     %r13, %rdi
        call    mfn_of_pfn
        shl     $12, %rax
        or      $PTE_RW | PAGE_GLOBAL, %rax
        mov     %rax, pte_y(%rip)       # X's address mapped onto Y

        # 1. Without VMASST_TYPE_writable_pagetables the write is a plain #PF
        mov     pte_y(%rip), %rax
        movq    $3, pf_skip(%rip)
        mov     %rax, (%r14)            # 3 bytes: 49 89 06
        call    expect_one_pf
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        lea     s_no_assist(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_no_assist(%rip), %rdi
        call    fail
2:
        mov     $VMASST_CMD_enable, %edi
        mov     $VMASST_TYPE_writable_pagetables, %esi
        call    hypercall_page + HYPERCALL_vm_assist * 32
        lea     s_vm_assist(%rip), %rdi
        call    expect_zero

        # 2. mov r64 to the L1 entry: emulated; the new mapping is used
        mov     pte_y(%rip), %rax
        movq    $3, pf_skip(%rip)
        mov     %rax, (%r14)            # 49 89 06
        call    expect_no_pf
        jne     1f
        call    flush_x
        mov     (%r14), %rax
        cmp     pte_y(%rip), %rax
        jne     1f
        cmpq    $MARK_Y, (%rbx)
        jne     1f
        lea     s_mov(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_mov(%rip), %rdi
        call    fail
2:
        # 3. lock cmpxchg that matches: the entry is swapped back, ZF set
        mov     pte_y(%rip), %rax
        mov     %r15, %rcx
        movq    $5, pf_skip(%rip)
        lock cmpxchg %rcx, (%r14)       # f0 49 0f b1 0e
        setz    zf_seen(%rip)
        call    expect_no_pf
        jne     1f
        cmpb    $1, zf_seen(%rip)
        jne     1f
        call    flush_x
        cmp     (%r14), %r15
        jne     1f
        cmpq    $MARK_X, (%rbx)
        jne     1f
        lea     s_cmpxchg(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_cmpxchg(%rip), %rdi
        call    fail
2:
        # 4. lock cmpxchg that does not match: nothing written, ZF clear, rax
        # loaded with the entry
        mov     $0x1234, %eax
        mov     pte_y(%rip), %rcx
        movq    $5, pf_skip(%rip)
        lock cmpxchg %rcx, (%r14)
        setz    zf_seen(%rip)
        call    expect_no_pf
        jne     1f
        cmpb    $0, zf_seen(%rip)
        jne     1f
        cmp     %rax, %r15
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        lea     s_cmpxchg_miss(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_cmpxchg_miss(%rip), %rdi
        call    fail
2:
        # 5. an entry that maps a pagetable (the L1 itself) writable is refused:
        # the #PF reaches the guest's handler, the entry is unchanged
        mov     %r14, %rdi
        movabs  $VIRT_BASE, %rax
        sub     %rax, %rdi
        shr     $12, %rdi               # the L1's pfn
        call    mfn_of_pfn
        shl     $12, %rax
        or      $PTE_RW, %rax
        movq    $3, pf_skip(%rip)
        mov     %rax, (%r14)            # 49 89 06
        call    expect_one_pf
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        mov     pf_error(%rip), %rax
        and     $PFEC_PRESENT_WRITE, %eax
        cmp     $PFEC_PRESENT_WRITE, %eax
        jne     1f
        lea     s_refused(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_refused(%rip), %rdi
        call    fail
2:
        # 6. a 4-byte write of the low half: widened with the high half
        mov     %r15, %rax
        and     $~2, %eax               # clear _PAGE_RW: X read-only
        movq    $3, pf_skip(%rip)
        mov     %eax, (%r14)            # 41 89 06
        call    expect_no_pf
        jne     1f
        mov     %r15, %rcx
        and     $~2, %rcx
        cmp     (%r14), %rcx
        jne     1f
        mov     %r15d, (%r14)           # and back: 45 89 3e
        call    expect_no_pf
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        lea     s_half(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_half(%rip), %rdi
        call    fail
2:
        # 7. xchg (locked by itself): the old entry comes back in the register
        mov     pte_y(%rip), %rax
        movq    $3, pf_skip(%rip)
        xchg    %rax, (%r14)            # 49 87 06
        call    expect_no_pf
        jne     1f
        cmp     %rax, %r15
        jne     1f
        mov     (%r14), %rax
        cmp     pte_y(%rip), %rax
        jne     1f
        mov     %r15, %rax
        xchg    %rax, (%r14)
        call    expect_no_pf
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        lea     s_xchg(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_xchg(%rip), %rdi
        call    fail
2:
        # 8. mov imm32 to m64: a zero entry unmaps X; then the entry comes back
        movq    $7, pf_skip(%rip)
        movq    $0, (%r14)              # 49 c7 06 00 00 00 00
        call    expect_no_pf
        jne     1f
        cmpq    $0, (%r14)
        jne     1f
        movq    $3, pf_skip(%rip)
        mov     %r15, (%r14)            # 4d 89 3e
        call    expect_no_pf
        jne     1f
        call    flush_x
        cmp     (%r14), %r15
        jne     1f
        cmpq    $MARK_X, (%rbx)
        jne     1f
        lea     s_imm(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_imm(%rip), %rdi
        call    fail
2:
        # 9. lock and / or of a byte (Linux's clear_bit / set_bit): read-only
        # and back
        mov     %r15, %rcx
        and     $~2, %rcx
        movq    $5, pf_skip(%rip)
        lock andb $0xfd, (%r14)         # f0 41 80 26 fd
        call    expect_no_pf
        jne     1f
        cmp     (%r14), %rcx
        jne     1f
        lock orb $2, (%r14)             # f0 41 80 0e 02
        call    expect_no_pf
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        lea     s_and_or(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_and_or(%rip), %rdi
        call    fail
2:
        # 10. lock btr / bts (test_and_clear_bit / test_and_set_bit): CF is
        # the bit's old value
        mov     %r15, %rcx
        and     $~2, %rcx
        movq    $6, pf_skip(%rip)
        lock btrq $1, (%r14)            # f0 49 0f ba 36 01
        setc    cf_seen(%rip)
        call    expect_no_pf
        jne     1f
        cmpb    $1, cf_seen(%rip)
        jne     1f
        cmp     (%r14), %rcx
        jne     1f
        lock btsq $1, (%r14)            # f0 49 0f ba 2e 01
        setc    cf_seen(%rip)
        call    expect_no_pf
        jne     1f
        cmpb    $0, cf_seen(%rip)
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        lea     s_bt(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_bt(%rip), %rdi
        call    fail
2:
        # 11. 1- and 2-byte stores: widened like the 4-byte one
        mov     %r15, %rax
        and     $~2, %eax
        movq    $3, pf_skip(%rip)
        mov     %al, (%r14)             # 41 88 06
        call    expect_no_pf
        jne     1f
        mov     %r15, %rcx
        and     $~2, %rcx
        cmp     (%r14), %rcx
        jne     1f
        mov     %r15, %rax
        movq    $4, pf_skip(%rip)
        mov     %ax, (%r14)             # 66 41 89 06
        call    expect_no_pf
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        lea     s_narrow(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_narrow(%rip), %rdi
        call    fail
2:
        # 12. a read-modify-write whose result is refused (PCD is not for a
        # PV guest): #PF, the entry unchanged
        movq    $5, pf_skip(%rip)
        lock orb $0x10, (%r14)          # f0 41 80 0e 10
        call    expect_one_pf
        jne     1f
        cmp     (%r14), %r15
        jne     1f
        lea     s_rmw_refused(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_rmw_refused(%rip), %rdi
        call    fail
2:
        # 13. a read-only page that is no pagetable: the write still faults
        mov     %r13, %rdi
        mov     $PTE_RO, %esi
        call    set_mapping
        lea     s_remap(%rip), %rdi
        call    expect_zero
        mov     %r13, %rdi
        call    pfn_va
        mov     %rax, %r12              # (X's pfn is no longer needed)
        movq    $4, pf_skip(%rip)
        mov     %r12, (%r12)            # 4d 89 24 24
        call    expect_one_pf
        jne     1f
        cmpq    $MARK_Y, (%r12)
        jne     1f
        lea     s_not_l1(%rip), %rdi
        call    ok
        jmp     2f
1:      lea     s_not_l1(%rip), %rdi
        call    fail
2:      mov     %r13, %rdi
        mov     $PTE_RW, %esi
        call    set_mapping
        lea     s_remap(%rip), %rdi
        call    expect_zero

        cmp     (%r14), %r15            # whatever happened, X is mapped as before
        je      3f
        mov     %r15, %rsi
        mov     %rbx, %rdi
        mov     $UVMF_INVLPG, %edx
        call    hypercall_page + HYPERCALL_update_va_mapping * 32
3:      pop     %r15
        xor     %edi, %edi              # every check passed unless one failed
        call    xtf_success
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

# l1e_va(rdi = va) -> rax = the address of the L1 entry that maps va, in the
# kernel's (read-only) mapping of its pagetables: walk L4, L3, L2 through the
# M2P to find each table's pfn
l1e_va:
        push    %rbx
        push    %r12
        mov     %rdi, %rbx
        mov     start_info(%rip), %rax
        mov     88(%rax), %r12          # pt_base: the L4
        mov     $39, %ecx
1:      mov     %rbx, %rax
        shr     %cl, %rax
        and     $511, %eax
        mov     (%r12,%rax,8), %rax
        movabs  $FRAME_MASK, %rdx
        and     %rdx, %rax
        shr     $12, %rax
        movabs  $MACH2PHYS_VIRT_START, %rdx
        mov     (%rdx,%rax,8), %rdi
        call    pfn_va
        mov     %rax, %r12
        sub     $9, %ecx
        cmp     $21, %ecx
        jae     1b
        mov     %rbx, %rax
        shr     $12, %rax
        and     $511, %eax
        lea     (%r12,%rax,8), %rax
        pop     %r12
        pop     %rbx
        ret

# flush_x: invalidate X's translation (rbx), as a guest must after changing it
flush_x:
        mov     $MMUEXT_INVLPG_LOCAL, %edi
        mov     %rbx, %rsi
        call    mmuext1
        lea     s_invlpg(%rip), %rdi
        jmp     expect_zero

# expect_no_pf / expect_one_pf: ZF set if the handler counted no page fault
# (one) since the last check; the count starts again from zero
expect_no_pf:
        cmpq    $0, pf_count(%rip)
        movq    $0, pf_count(%rip)
        ret
expect_one_pf:
        cmpq    $1, pf_count(%rip)
        movq    $0, pf_count(%rip)
        ret

ok:     push    %rdi
        lea     s_prefix(%rip), %rdi
        call    puts
        pop     %rdi
        call    puts
        lea     s_ok(%rip), %rdi
        jmp     puts
fail:   push    %rdi
        lea     s_prefix(%rip), %rdi
        call    puts
        pop     %rdi
        call    puts
        lea     s_fail(%rip), %rdi
        jmp     xtf_failure             # prints the line, the verdict FAILURE

# The #PF handler: count the fault, keep its error code, resume past the
# faulting instruction (pf_skip bytes) through HYPERVISOR_iret, whose stub
# pushes rcx, r11 and rax above the flags word the guest pushes.
# Bounce frame: rcx, r11, error code, rip, cs, rflags, rsp, ss.
pf_handler:
        pop     %rcx
        pop     %r11
        pop     pf_error(%rip)
        incq    pf_count(%rip)
        push    %rax
        mov     pf_skip(%rip), %rax
        add     %rax, 8(%rsp)
        pop     %rax
        push    $0                      # iret flags
        jmp     hypercall_page + HYPERCALL_iret * 32

        .equ MARK_X, 0x5858
        .equ MARK_Y, 0x5959

        .section .rodata
s_traps:        .asciz "set_trap_table "
s_vm_assist:    .asciz "vm_assist (enable writable_pagetables) "
s_remap:        .asciz "update_va_mapping "
s_invlpg:       .asciz "mmuext_op (invlpg) "
s_prefix:       .asciz "ptwr: "
s_ok:           .asciz ": ok\n"
s_fail:         .asciz ": FAILURE"
s_no_assist:    .asciz "without the vm_assist, a write to an L1 faults"
s_mov:          .asciz "mov to an L1 entry maps the new page"
s_cmpxchg:      .asciz "lock cmpxchg that matches writes"
s_cmpxchg_miss: .asciz "lock cmpxchg that misses leaves the entry"
s_refused:      .asciz "an entry mapping a pagetable writable is refused with #PF"
s_half:         .asciz "a 4-byte write is widened"
s_xchg:         .asciz "xchg swaps the entry"
s_imm:          .asciz "mov imm32 clears and restores the entry"
s_and_or:       .asciz "lock and / or of a byte of the entry"
s_bt:           .asciz "lock btr / bts give the old bit in CF"
s_narrow:       .asciz "1- and 2-byte writes are widened"
s_rmw_refused:  .asciz "a read-modify-write to a refused entry faults"
s_not_l1:       .asciz "a write to a read-only page that is no pagetable faults"

        .data
        .balign 16
traps:  .byte   14, 0
        .word   0
        .long   0
        .quad   pf_handler
        .quad   0, 0
pf_count:       .quad 0
pf_error:       .quad 0
pf_skip:        .quad 0
orig_pte:       .quad 0
pte_y:          .quad 0
zf_seen:        .byte 0
cf_seen:        .byte 0
