# The pagetable stress guest (tests/stress.elf): builds address spaces the way
# a PV kernel does, over and over, in shapes drawn from a seeded generator:
#
#   build the tables while they are plain pages (L4, L3, L2, 1-4 L1s, data),
#   make them read-only in the kernel's mapping (update_va_mapping one by one,
#   or one mmu_update batch on the bootstrap L1 entries),
#   pin (the L4 alone, or each L1 first), NEW_BASEPTR to the new L4, touch the
#   data through the new mapping, NEW_BASEPTR back,
#   and later unpin, make the pages writable again, sometimes give a data
#   frame back to Xen and populate a new one (as a balloon driver does).
#
# Six slots are in use round-robin, so several pinned trees live at once; one
# build in eight stops before the pin and leaves its tables built but unpinned
# until the slot comes round again. Shapes vary: shared L1s, an L1 mapped
# read-only inside its own tree, L1s pinned on their own.
#
# Command line: "ITERATIONS [SEED]" (decimal; default 200 and 1).
# Output: a progress line every twentieth of the run ("stress: 5000 of 100000
# iterations (5%)": a long run shows how far it has come), then the totals and a
# checksum of everything read through the built mappings (independent of the
# machine frames, so the same for every hypervisor seed), and the runtime's
# "Test result:" line: FAILURE if a hypercall or a read gave another result.
        .include "hypercall.inc"

        .equ NSLOTS, 6
        .equ SLOT_PAGES, 40
        .equ R_L4, 0                    # page roles within a slot
        .equ R_L3, 1
        .equ R_L2, 2
        .equ R_L1, 3                    # 3..6
        .equ R_DATA, 7                  # 7..38
        .equ MAX_L1, 4
        .equ TABLE, PTE_RW
        .equ KERNEL_L4_SLOT, 511        # VIRT_BASE's slot, copied into every tree
        .equ M2P, 0xffff800000000000
        .equ FRAME_MASK, 0x000ffffffffff000
        .equ TOUCH_MAGIC, 0x5a5a5a5a5a5a5a5a
        .equ SI_PT_BASE, 88
        .equ SI_NR_PT_FRAMES, 96
        .equ SI_CMD_LINE, 128
        .equ BOOT_STACK_PAGES, 4

        # struct slot
        .equ SL_STATE, 0                # EMPTY, BUILT (unpinned), PINNED
        .equ SL_BASE, 8                 # first pfn of the slot's pages
        .equ SL_ROT, 16                 # role -> page rotation
        .equ SL_NL1, 24
        .equ SL_NDATA, 32
        .equ SL_FLAGS, 40
        .equ SL_UVA, 48                 # where the tree maps its data
        .equ SL_ITER, 56
        .equ SL_SIZE, 64
        .equ EMPTY, 0
        .equ BUILT, 1
        .equ PINNED, 2
        .equ F_PIN_L1S, 1               # shape flags
        .equ F_SHARE, 2
        .equ F_ROSELF, 4
        .equ F_BALLOON, 8
        .equ F_BATCH, 16
        .equ F_NOPIN, 32

        .text
        .globl  test_main
test_main:
        push    %rbx
        push    %r12
        call    parse_cmdline
        call    init_slots
        cmpq    $STATUS_SUCCESS, test_status(%rip)
        ja      9f              # a failure or error already
        xor     %ebx, %ebx              # iteration
1:      cmp     iterations(%rip), %rbx
        jae     3f
        mov     %rbx, %rax
        xor     %edx, %edx
        mov     $NSLOTS, %ecx
        div     %rcx
        imul    $SL_SIZE, %rdx, %r12
        lea     slots(%rip), %rax
        add     %rax, %r12              # r12 = the slot
        mov     %r12, %rdi
        call    teardown
        mov     %r12, %rdi
        mov     %rbx, %rsi
        call    build
        cmpq    $STATUS_SUCCESS, test_status(%rip)
        ja      9f              # a failure or error already
        inc     %rbx
        mov     %rbx, %rax
        xor     %edx, %edx
        divq    progress_step(%rip)
        test    %rdx, %rdx
        jnz     1b
        call    say_progress
        jmp     1b
3:      xor     %ebx, %ebx              # tear every slot down at the end
4:      imul    $SL_SIZE, %rbx, %rdi
        lea     slots(%rip), %rax
        add     %rax, %rdi
        call    teardown
        inc     %ebx
        cmp     $NSLOTS, %ebx
        jb      4b
        .irp what, iterations, pins, unpinned_builds, balloons, checksum
        lea     s_\what(%rip), %rdi
        call    puts
        mov     \what(%rip), %rdi
        call    put_hex
        lea     s_newline(%rip), %rdi
        call    puts
        .endr
        xor     %edi, %edi
        call    xtf_success             # unless something failed on the way
9:      pop     %r12
        pop     %rbx
        ret

# say_progress(rbx = iterations done): "stress: N of TOTAL iterations (P%)"
say_progress:
        lea     s_progress(%rip), %rdi
        call    puts
        mov     %rbx, %rdi
        call    put_dec
        lea     s_of(%rip), %rdi
        call    puts
        mov     iterations(%rip), %rdi
        call    put_dec
        lea     s_iterations_pct(%rip), %rdi
        call    puts
        imul    $100, %rbx, %rax
        xor     %edx, %edx
        divq    iterations(%rip)
        mov     %rax, %rdi
        call    put_dec
        lea     s_pct_end(%rip), %rdi
        jmp     puts

# "ITERATIONS [SEED]" from start_info.cmd_line; a progress line every
# twentieth of the iterations (every one if there are fewer than 20)
parse_cmdline:
        mov     start_info(%rip), %rsi
        add     $SI_CMD_LINE, %rsi
        call    parse_decimal
        test    %rax, %rax
        jz      1f
        mov     %rax, iterations(%rip)
1:      call    parse_decimal
        test    %rax, %rax
        jz      2f
        mov     %rax, rng(%rip)
2:      mov     iterations(%rip), %rax
        xor     %edx, %edx
        mov     $20, %ecx
        div     %rcx
        test    %rax, %rax
        jnz     3f
        inc     %rax
3:      mov     %rax, progress_step(%rip)
        ret

# parse_decimal(rsi = text) -> rax = value (0 if none), rsi past it
parse_decimal:
        xor     %eax, %eax
1:      cmpb    $' ', (%rsi)
        jne     2f
        inc     %rsi
        jmp     1b
2:      movzbl  (%rsi), %ecx
        sub     $'0', %ecx
        cmp     $9, %ecx
        ja      3f
        imul    $10, %rax
        add     %rcx, %rax
        inc     %rsi
        jmp     2b
3:      ret

# The slots' pages sit just below the top page of RAM; they must not reach
# down into what the domain builder laid out (image, p2m, tables, stack).
init_slots:
        call    sym_free_pfn
        sub     $NSLOTS * SLOT_PAGES, %rax
        mov     %rax, %rdx
        mov     start_info(%rip), %rcx
        mov     SI_PT_BASE(%rcx), %rax
        movabs  $VIRT_BASE, %rdi
        sub     %rdi, %rax
        shr     $12, %rax
        add     SI_NR_PT_FRAMES(%rcx), %rax
        add     $BOOT_STACK_PAGES, %rax
        cmp     %rax, %rdx
        jae     1f
        lea     s_too_small(%rip), %rdi
        call    xtf_error               # the test cannot run here: ERROR
        ret
1:      lea     slots(%rip), %rdi
        mov     $NSLOTS, %ecx
2:      movq    $EMPTY, SL_STATE(%rdi)
        mov     %rdx, SL_BASE(%rdi)
        add     $SLOT_PAGES, %rdx
        add     $SL_SIZE, %rdi
        dec     %ecx
        jnz     2b
        ret

# rand() -> rax: a 64-bit LCG (Knuth's MMIX constants), high bits first
rand:
        mov     rng(%rip), %rax
        movabs  $6364136223846793005, %rcx
        imul    %rcx, %rax
        movabs  $1442695040888963407, %rcx
        add     %rcx, %rax
        mov     %rax, rng(%rip)
        rol     $32, %rax
        ret

# role_pfn(rdi = slot, esi = role) -> rax = pfn of that role's page
role_pfn:
        mov     SL_ROT(%rdi), %rax
        add     %rsi, %rax
        xor     %edx, %edx
        mov     $SLOT_PAGES, %ecx
        div     %rcx
        mov     SL_BASE(%rdi), %rax
        add     %rdx, %rax
        ret

role_va:                                # (rdi = slot, esi = role) -> rax = kernel va
        call    role_pfn
        mov     %rax, %rdi
        jmp     pfn_va

role_pte:                               # (rdi = slot, esi = role, rdx = flags) -> rax = pte
        push    %rdx
        call    role_pfn
        mov     %rax, %rdi
        call    mfn_of_pfn
        pop     %rdx
        shl     $12, %rax
        or      %rdx, %rax
        ret

# stamp(rdi = slot, esi = data index) -> rax: what a data page holds at offset 0
stamp:
        push    %rsi
        add     $R_DATA, %esi
        call    role_pfn
        pop     %rsi
        mov     SL_ITER(%rdi), %rcx
        shl     $20, %rcx
        shl     $4, %rax
        xor     %rcx, %rax
        xor     %rsi, %rax
        ret

# data_uva(rdi = slot, esi = data index) -> rax = its address in the tree
data_uva:
        mov     %rsi, %rax
        xor     %edx, %edx
        divq    SL_NDATA(%rdi)          # rax = L1 index j, rdx = entry e
        shl     $21, %rax
        shl     $12, %rdx
        add     %rdx, %rax
        add     SL_UVA(%rdi), %rax
        ret

# nr_tables(rdi = slot) -> rax: L4, L3, L2 and the L1s
nr_tables:
        mov     SL_NL1(%rdi), %rax
        add     $R_L1, %rax
        ret

nr_data:                                # (rdi = slot) -> rax
        mov     SL_NL1(%rdi), %rax
        imul    SL_NDATA(%rdi), %rax
        ret

# set_entry(rdi = slot, esi = role of the table, edx = index, rcx = value)
set_entry:
        push    %rdx
        push    %rcx
        call    role_va
        pop     %rcx
        pop     %rdx
        mov     %rcx, (%rax,%rdx,8)
        ret

# --- build ----------------------------------------------------------------------
# build(rdi = slot, rsi = iteration)
build:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %rdi, %r12
        mov     %rsi, SL_ITER(%r12)
        call    rand                    # the shape
        mov     %rax, %rbx
        mov     %ebx, %eax
        and     $3, %eax
        inc     %eax
        mov     %rax, SL_NL1(%r12)
        mov     %ebx, %eax
        shr     $2, %eax
        and     $7, %eax
        inc     %eax
        mov     %rax, SL_NDATA(%r12)
        mov     %ebx, %eax
        shr     $5, %eax
        and     $(F_PIN_L1S | F_SHARE | F_ROSELF | F_BALLOON | F_BATCH), %eax
        mov     %rbx, %rcx
        shr     $33, %rcx
        test    $7, %ecx
        jnz     1f
        or      $F_NOPIN, %eax          # one build in eight stays unpinned
1:      mov     %rax, SL_FLAGS(%r12)
        mov     %rbx, %rax
        shr     $10, %rax
        and     $0xff, %eax
        xor     %edx, %edx
        mov     $SLOT_PAGES, %ecx
        div     %rcx
        mov     %rdx, SL_ROT(%r12)
        mov     %rbx, %rax              # uva = l4slot (1..128) << 39 | l3slot << 30
        shr     $18, %rax
        and     $127, %eax
        inc     %eax
        shl     $39, %rax
        mov     %rbx, %rcx
        shr     $25, %rcx
        and     $511, %ecx
        shl     $30, %rcx
        or      %rcx, %rax
        mov     %rax, SL_UVA(%r12)

        # zero the table pages; stamp the data pages
        xor     %r13d, %r13d
2:      mov     %r12, %rdi
        mov     %r13d, %esi
        call    role_va
        mov     %rax, %rdi
        xor     %eax, %eax
        mov     $PAGE_WORDS, %ecx
        rep stosq
        inc     %r13d
        mov     %r12, %rdi
        call    nr_tables
        cmp     %rax, %r13
        jb      2b
        xor     %r13d, %r13d
3:      mov     %r12, %rdi
        mov     %r13d, %esi
        call    stamp
        mov     %rax, %r14
        mov     %r12, %rdi
        lea     R_DATA(%r13), %esi
        call    role_va
        mov     %r14, (%rax)
        movq    $0, 8(%rax)
        inc     %r13d
        mov     %r12, %rdi
        call    nr_data
        cmp     %rax, %r13
        jb      3b

        # L1[j][e] -> data page j * ndata + e
        xor     %r13d, %r13d
4:      mov     %r12, %rdi
        lea     R_DATA(%r13), %esi
        mov     $PTE_RW, %edx
        call    role_pte
        mov     %rax, %rcx
        mov     %r13, %rax
        xor     %edx, %edx
        divq    SL_NDATA(%r12)
        lea     R_L1(%rax), %esi
        mov     %r12, %rdi
        call    set_entry
        inc     %r13d
        mov     %r12, %rdi
        call    nr_data
        cmp     %rax, %r13
        jb      4b
        testq   $F_ROSELF, SL_FLAGS(%r12)  # L1[0][ndata]: L1[0] itself, read-only
        jz      5f
        mov     %r12, %rdi
        mov     $R_L1, %esi
        mov     $PTE_RO, %edx
        call    role_pte
        mov     %rax, %rcx
        mov     %r12, %rdi
        mov     $R_L1, %esi
        mov     SL_NDATA(%r12), %rdx
        call    set_entry

5:      # L2[j] -> L1[j]; with F_SHARE also L2[nl1] -> L1[0]
        xor     %r13d, %r13d
6:      mov     %r12, %rdi
        lea     R_L1(%r13), %esi
        mov     $TABLE, %edx
        call    role_pte
        mov     %rax, %rcx
        mov     %r12, %rdi
        mov     $R_L2, %esi
        mov     %r13, %rdx
        call    set_entry
        inc     %r13
        cmp     SL_NL1(%r12), %r13
        jb      6b
        testq   $F_SHARE, SL_FLAGS(%r12)
        jz      7f
        mov     %r12, %rdi
        mov     $R_L1, %esi
        mov     $TABLE, %edx
        call    role_pte
        mov     %rax, %rcx
        mov     %r12, %rdi
        mov     $R_L2, %esi
        mov     SL_NL1(%r12), %rdx
        call    set_entry

7:      # L3[l3slot] -> L2, L4[l4slot] -> L3, L4[511] = the kernel's
        mov     %r12, %rdi
        mov     $R_L2, %esi
        mov     $TABLE, %edx
        call    role_pte
        mov     %rax, %rcx
        mov     SL_UVA(%r12), %rdx
        shr     $30, %rdx
        and     $511, %edx
        mov     %r12, %rdi
        mov     $R_L3, %esi
        call    set_entry
        mov     %r12, %rdi
        mov     $R_L3, %esi
        mov     $TABLE, %edx
        call    role_pte
        mov     %rax, %rcx
        mov     SL_UVA(%r12), %rdx
        shr     $39, %rdx
        mov     %r12, %rdi
        mov     $R_L4, %esi
        call    set_entry
        mov     start_info(%rip), %rax
        mov     SI_PT_BASE(%rax), %rax
        mov     KERNEL_L4_SLOT * 8(%rax), %rcx
        mov     %r12, %rdi
        mov     $R_L4, %esi
        mov     $KERNEL_L4_SLOT, %edx
        call    set_entry

        # read-only in the kernel's mapping, then pin (unless this one stays unpinned)
        mov     %r12, %rdi
        mov     $PTE_RO, %esi
        call    remap_tables
        testq   $F_NOPIN, SL_FLAGS(%r12)
        jz      8f
        movq    $BUILT, SL_STATE(%r12)
        incq    unpinned_builds(%rip)
        jmp     9f
8:      testq   $F_PIN_L1S, SL_FLAGS(%r12)
        jz      10f
        mov     $MMUEXT_PIN_L1_TABLE, %esi
        mov     %r12, %rdi
        call    for_each_l1
10:     mov     %r12, %rdi
        mov     $R_L4, %esi
        mov     $MMUEXT_PIN_L4_TABLE, %edx
        call    mmuext_role
        movq    $PINNED, SL_STATE(%r12)
        incq    pins(%rip)
        mov     %r12, %rdi
        call    touch
9:      pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

# mmuext_role(rdi = slot, esi = role, edx = cmd): the op on that page's mfn
mmuext_role:
        push    %rdx
        call    role_pfn
        mov     %rax, %rdi
        call    mfn_of_pfn
        pop     %rdi
        mov     %rax, %rsi
        call    mmuext1
        lea     s_mmuext(%rip), %rdi
        jmp     expect_zero

# for_each_l1(rdi = slot, esi = cmd): pin or unpin every L1
for_each_l1:
        push    %rbx
        push    %r12
        push    %r13
        mov     %rdi, %r12
        mov     %esi, %r13d
        xor     %ebx, %ebx
1:      mov     %r12, %rdi
        lea     R_L1(%rbx), %esi
        mov     %r13d, %edx
        call    mmuext_role
        inc     %rbx
        cmp     SL_NL1(%r12), %rbx
        jb      1b
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

# remap_tables(rdi = slot, rsi = flags): the kernel's mapping of every table
# page, one update_va_mapping each or (F_BATCH) one mmu_update batch
remap_tables:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        mov     %rdi, %r12
        mov     %rsi, %r13
        xor     %ebx, %ebx
        testq   $F_BATCH, SL_FLAGS(%r12)
        jnz     3f
1:      mov     %r12, %rdi
        mov     %ebx, %esi
        call    role_pfn
        mov     %rax, %rdi
        mov     %r13, %rsi
        call    set_mapping
        lea     s_remap(%rip), %rdi
        call    expect_zero
        inc     %ebx
        mov     %r12, %rdi
        call    nr_tables
        cmp     %rax, %rbx
        jb      1b
        jmp     9f
3:      mov     %rbx, %r14              # batch entry
        shl     $4, %r14
        lea     mu_batch(%rip), %rax
        add     %rax, %r14
        mov     %r12, %rdi
        mov     %ebx, %esi
        call    role_va
        mov     %rax, %rdi
        call    kernel_l1e_maddr
        mov     %rax, (%r14)
        mov     %r12, %rdi
        mov     %ebx, %esi
        mov     %r13, %rdx
        call    role_pte
        mov     %rax, 8(%r14)
        inc     %ebx
        mov     %r12, %rdi
        call    nr_tables
        cmp     %rax, %rbx
        jb      3b
        lea     mu_batch(%rip), %rdi
        mov     %rbx, %rsi
        lea     mu_done(%rip), %rdx
        mov     $DOMID_SELF, %r10d
        call    hypercall_page + HYPERCALL_mmu_update * 32
        lea     s_batch(%rip), %rdi
        call    expect_zero
        cmp     mu_done(%rip), %ebx
        je      9f
        lea     s_done(%rip), %rdi
        call    xtf_failure
9:      pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

# kernel_l1e_maddr(rdi = kernel va) -> rax: machine address of the bootstrap
# L1 entry mapping it, found by walking the tables through the read-only M2P
kernel_l1e_maddr:
        mov     start_info(%rip), %rax
        mov     SI_PT_BASE(%rax), %rsi  # table va
        mov     $39, %ecx
        movabs  $FRAME_MASK, %r9
        movabs  $M2P, %r10
        movabs  $VIRT_BASE, %r11
1:      mov     %rdi, %rax
        shr     %cl, %rax
        and     $511, %eax
        mov     (%rsi,%rax,8), %r8
        and     %r9, %r8
        shr     $12, %r8                # r8 = mfn of the next table
        mov     (%r10,%r8,8), %rsi      # its pfn
        shl     $12, %rsi
        add     %r11, %rsi
        sub     $9, %ecx
        cmp     $12, %ecx
        jne     1b
        mov     %rdi, %rax
        shr     $12, %rax
        and     $511, %eax
        shl     $12, %r8
        lea     (%r8,%rax,8), %rax
        ret

# --- use ------------------------------------------------------------------------
# touch(rdi = slot): switch to the tree, read every data page's stamp and write
# a mark beside it, check the shared and read-only views, switch back, and
# check the marks through the kernel's own mapping
touch:
        push    %rbx
        push    %r12
        push    %r13
        mov     %rdi, %r12
        mov     %r12, %rdi
        mov     $R_L4, %esi
        mov     $MMUEXT_NEW_BASEPTR, %edx
        call    mmuext_role
        xor     %ebx, %ebx
1:      mov     %r12, %rdi
        mov     %ebx, %esi
        call    stamp
        mov     %rax, %r13
        mov     %r12, %rdi
        mov     %ebx, %esi
        call    data_uva
        cmp     (%rax), %r13
        jne     8f
        movabs  $TOUCH_MAGIC, %rcx
        xor     %r13, %rcx
        mov     %rcx, 8(%rax)
        mov     checksum(%rip), %rcx    # checksum = checksum * 31 + stamp
        imul    $31, %rcx
        add     %r13, %rcx
        mov     %rcx, checksum(%rip)
        inc     %ebx
        mov     %r12, %rdi
        call    nr_data
        cmp     %rax, %rbx
        jb      1b
        testq   $F_SHARE, SL_FLAGS(%r12)   # L2[nl1] shares L1[0]: data 0 again
        jz      2f
        mov     %r12, %rdi
        xor     %esi, %esi
        call    stamp
        mov     SL_NL1(%r12), %rcx
        shl     $21, %rcx
        add     SL_UVA(%r12), %rcx
        cmp     (%rcx), %rax
        jne     8f
2:      testq   $F_ROSELF, SL_FLAGS(%r12)  # L1[0] seen through itself
        jz      3f
        mov     SL_NDATA(%r12), %rcx
        shl     $12, %rcx
        add     SL_UVA(%r12), %rcx
        mov     (%rcx), %r13
        mov     %r12, %rdi
        mov     $R_L1, %esi
        call    role_va
        cmp     (%rax), %r13
        jne     8f
3:      call    sym_l4_mfn
        mov     $MMUEXT_NEW_BASEPTR, %edi
        mov     %rax, %rsi
        call    mmuext1
        lea     s_mmuext(%rip), %rdi
        call    expect_zero
        xor     %ebx, %ebx
4:      mov     %r12, %rdi
        lea     R_DATA(%rbx), %esi
        call    role_va
        movabs  $TOUCH_MAGIC, %rcx
        xor     (%rax), %rcx
        cmp     8(%rax), %rcx
        jne     8f
        inc     %ebx
        mov     %r12, %rdi
        call    nr_data
        cmp     %rax, %rbx
        jb      4b
        jmp     9f
8:      lea     s_mismatch(%rip), %rdi
        call    xtf_failure
9:      pop     %r13
        pop     %r12
        pop     %rbx
        ret

# --- teardown -------------------------------------------------------------------
# teardown(rdi = slot): unpin, make the pages writable, maybe balloon a frame
teardown:
        push    %r12
        mov     %rdi, %r12
        cmpq    $EMPTY, SL_STATE(%r12)
        je      9f
        cmpq    $PINNED, SL_STATE(%r12)
        jne     1f
        mov     %r12, %rdi
        mov     $R_L4, %esi
        mov     $MMUEXT_UNPIN_TABLE, %edx
        call    mmuext_role
        testq   $F_PIN_L1S, SL_FLAGS(%r12)
        jz      1f
        mov     %r12, %rdi
        mov     $MMUEXT_UNPIN_TABLE, %esi
        call    for_each_l1
1:      mov     %r12, %rdi
        mov     $PTE_RW, %esi
        call    remap_tables
        testq   $F_BALLOON, SL_FLAGS(%r12)
        jz      2f
        mov     %r12, %rdi
        mov     $R_DATA, %esi
        call    role_pfn
        mov     %rax, %rdi
        call    balloon
2:      movq    $EMPTY, SL_STATE(%r12)
9:      pop     %r12
        ret

# balloon(rdi = pfn): give its frame back to Xen and populate a new one, as a
# balloon driver's inflate then deflate: unmap, decrease_reservation,
# populate_physmap, p2m and M2P, map again
balloon:
        push    %rbx
        push    %r12
        mov     %rdi, %rbx
        call    pfn_va
        mov     %rax, %r12
        mov     %rax, %rdi
        xor     %esi, %esi
        mov     $UVMF_INVLPG, %edx
        call    hypercall_page + HYPERCALL_update_va_mapping * 32
        lea     s_remap(%rip), %rdi
        call    expect_zero
        mov     %rbx, %rdi
        call    mfn_of_pfn
        mov     %rax, extent(%rip)
        mov     $XENMEM_decrease_reservation, %edi
        call    reservation
        mov     %rbx, extent(%rip)
        mov     $XENMEM_populate_physmap, %edi
        call    reservation
        mov     start_info(%rip), %rax  # p2m[pfn] = the new mfn
        mov     104(%rax), %rax
        mov     extent(%rip), %rcx
        mov     %rcx, (%rax,%rbx,8)
        shl     $12, %rcx
        or      $MMU_MACHPHYS_UPDATE, %rcx
        mov     %rcx, %rdi
        mov     %rbx, %rsi
        call    mmu_update1
        lea     s_machphys(%rip), %rdi
        call    expect_zero
        mov     %rbx, %rdi
        mov     $PTE_RW, %esi
        call    set_mapping
        lea     s_remap(%rip), %rdi
        call    expect_zero
        incq    balloons(%rip)
        pop     %r12
        pop     %rbx
        ret

# reservation(edi = cmd): one order-0 extent at `extent`; anything but 1 is a failure
reservation:
        lea     extent(%rip), %rax
        mov     %rax, resv(%rip)
        movq    $1, resv+8(%rip)
        movq    $0, resv+16(%rip)
        movq    $DOMID_SELF, resv+24(%rip)
        lea     resv(%rip), %rsi
        call    hypercall_page + HYPERCALL_memory_op * 32
        dec     %rax
        lea     s_memory_op(%rip), %rdi
        jmp     expect_zero

        .section .rodata
s_progress:   .asciz "stress: "
s_of:         .asciz " of "
s_iterations_pct: .asciz " iterations ("
s_pct_end:    .asciz "%)\n"
s_iterations: .asciz "stress: iterations "
s_pins:       .asciz "stress: trees pinned and used "
s_unpinned_builds: .asciz "stress: trees left unpinned "
s_balloons:   .asciz "stress: frames ballooned out and back "
s_checksum:   .asciz "stress: checksum "
s_too_small:  .asciz "stress: not enough memory for the slots"
s_mismatch:   .asciz "stress: FAILURE: data read through a built tree is wrong"
s_done:       .asciz "stress: FAILURE: mmu_update batch done count"
s_remap:      .asciz "update_va_mapping "
s_batch:      .asciz "mmu_update (batch) "
s_machphys:   .asciz "mmu_update (machphys) "
s_mmuext:     .asciz "mmuext_op "
s_memory_op:  .asciz "memory_op (1 extent expected) "

        .data
        .balign 8
iterations:      .quad 200
progress_step:   .quad 10
rng:             .quad 1
pins:            .quad 0
unpinned_builds: .quad 0
balloons:        .quad 0
checksum:        .quad 0
mu_done:         .quad 0
extent:          .quad 0
resv:            .skip 32
slots:           .skip NSLOTS * SL_SIZE
mu_batch:        .skip (R_L1 + MAX_L1) * 16
