# How Xen delivers and emulates traps for a 64-bit PV guest, checked from a
# plain PV kernel (tests/traps.elf) in the manner of the Xen Test Framework's
# selftest: each check arms a resume address, runs one instruction, and
# compares what the trap handler saw (vector, error code, RIP) or the
# instruction's result with Xen's. Sources are in xen.git: arch/x86/traps.c
# (do_general_protection, do_int3, do_invalid_op), arch/x86/pv/traps.c
# (pv_inject_event), pv/emul-priv-op.c, pv/emul-inv-op.c, pv/mm.h.
        .include "hypercall.inc"

        .equ FLAT_KERNEL_CS, 0xe033
        .equ FLAT_USER_CS, 0xe033       # the same selector: RPL 3 in an iret
        .equ FLAT_USER_SS, 0xe02b       # frame means guest user mode
        .equ FLAT_KERNEL_SS, 0xe02b
        .equ VEC_PERMITTED, 0x9d        # a gate of DPL 1: kernel mode may int
        .equ VEC_REFUSED, 0x9e          # a gate of DPL 0: #GP at the int
        .equ SELECTOR_IDT, 2
        .equ MSR_GS_BASE, 0xc0000101
        .equ MSR_SHADOW_GS_BASE, 0xc0000102
        .equ MSR_UNKNOWN, 0x1234
        .equ XEN_CR0, 0x80050033        # PE MP ET NE WP AM PG, TS clear
        .equ PV_CR4, 0x220              # PAE OSFXSR: the CPU's visible bits
        .equ UNMAPPED, 0x2000           # below the kernel: never mapped
        .equ PTE_KERNEL_RW, 0x63        # present, rw, A, D: no _PAGE_USER
        .equ NO_VECTOR, -1

# A trap handler: restore rcx and r11 from the bounce frame, note the vector,
# the error code and the frame's RIP, and iret to the armed resume address
# (disarmed on use: an exception nothing armed for ends the test).
.macro handler vec, has_err
h_\vec:
        pop     %rcx
        pop     %r11
        .if \has_err
        popq    ex_error(%rip)
        .endif
        cmpq    $0, ex_resume(%rip)
        jne     1f
        mov     $\vec, %edi
        jmp     unexpected
1:      movq    $\vec, ex_vector(%rip)
        push    %rax
        mov     8(%rsp), %rax
        mov     %rax, ex_rip(%rip)
        mov     16(%rsp), %rax          # the mode it came from: CS's RPL
        and     $3, %eax
        mov     %rax, ex_rpl(%rip)
        andq    $~3, 16(%rsp)           # resume in guest kernel mode
        mov     ex_resume(%rip), %rax
        mov     %rax, 8(%rsp)
        movq    $0, ex_resume(%rip)
        pop     %rax
        push    $0                      # iret flags
        jmp     hypercall_page + HYPERCALL_iret * 32
.endm

# arm resume: where the next handler returns to; no exception seen yet
.macro arm resume
        lea     \resume(%rip), %rax
        mov     %rax, ex_resume(%rip)
        movq    $NO_VECTOR, ex_vector(%rip)
        movq    $NO_VECTOR, ex_error(%rip)
        movq    $0, ex_rip(%rip)
.endm

# enter_user target: iret to guest user mode at target, on the user stack;
# the handler of the trap that follows resumes in kernel mode, on that stack,
# so the resume address restores the kernel's (leave_user)
.macro enter_user target
        mov     %rsp, saved_rsp(%rip)
        push    $FLAT_USER_SS
        lea     ustack_top(%rip), %rax
        push    %rax
        push    $0x202                  # rflags: IF
        push    $FLAT_USER_CS
        lea     \target(%rip), %rax
        push    %rax
        push    $0                      # iret flags
        jmp     hypercall_page + HYPERCALL_iret * 32
.endm
.macro leave_user
        mov     saved_rsp(%rip), %rsp
.endm

# check what, got, want (got: a register or memory operand; want: immediate
# or register): count a failure and say so if they differ
.macro check what, got, want
        mov     \got, %rsi
        mov     \want, %rdx
        lea     \what(%rip), %rdi
        call    expect
.endm

        .text
        .globl  test_main
test_main:
        push    %rbx
        push    %r12
        lea     trap_table(%rip), %rdi
        call    hypercall_page + HYPERCALL_set_trap_table * 32
        lea     s_set_trap_table(%rip), %rdi
        call    expect_zero

        # a #GP from wrmsr is the first exception this guest takes: Unicorn
        # must not make a double fault of it
        arm     1f
        mov     $MSR_GS_BASE, %ecx
        xor     %eax, %eax
        mov     $0x8000, %edx           # bit 47 set, 48-63 clear: not canonical
2:      wrmsr
1:      check   s_wrmsr_noncanon_vec, ex_vector(%rip), $13
        check   s_wrmsr_noncanon_err, ex_error(%rip), $0
        lea     2b(%rip), %rbx
        check   s_wrmsr_noncanon_rip, ex_rip(%rip), %rbx

        # emul-priv-op.c write_msr / read_msr: the segment bases are emulated
        arm     1f
        mov     $MSR_GS_BASE, %ecx
        mov     $0x56789000, %eax
        mov     $0x1234, %edx
        wrmsr
        xor     %eax, %eax
        xor     %edx, %edx
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, %rbx
1:      check   s_gs_base_vec, ex_vector(%rip), $NO_VECTOR
        movabs  $0x123456789000, %rax
        check   s_gs_base, %rbx, %rax
        arm     1f
        mov     $MSR_SHADOW_GS_BASE, %ecx
        mov     $0x1000, %eax
        xor     %edx, %edx
        wrmsr
        xor     %eax, %eax
        rdmsr
        mov     %rax, %rbx
1:      check   s_shadow_gs_base, %rbx, $0x1000
        arm     1f
        mov     $MSR_SHADOW_GS_BASE, %ecx
        xor     %eax, %eax
        wrmsr
1:      check   s_shadow_gs_base_vec, ex_vector(%rip), $NO_VECTOR

        # read_msr: an MSR Xen does not emulate is a #GP(0)
        arm     1f
        mov     $MSR_UNKNOWN, %ecx
2:      rdmsr
1:      check   s_rdmsr_unknown_vec, ex_vector(%rip), $13
        check   s_rdmsr_unknown_err, ex_error(%rip), $0
        lea     2b(%rip), %rbx
        check   s_rdmsr_unknown_rip, ex_rip(%rip), %rbx

        # read_cr: CR3 is the kernel L4's machine address, CR0 Xen's, CR4 the
        # visible bits
        call    sym_l4_mfn
        shl     $12, %rax
        mov     %rax, %r12
        arm     1f
        mov     %cr3, %rbx
1:      check   s_cr3, %rbx, %r12
        check   s_cr3_vec, ex_vector(%rip), $NO_VECTOR
        arm     1f
        mov     %cr0, %rbx
1:      check   s_cr0, %rbx, $XEN_CR0
        arm     1f
        mov     %cr4, %rbx
1:      check   s_cr4, %rbx, $PV_CR4

        # pv_inject_event: a #PF in guest kernel mode has the user bit clear
        arm     1f
2:      mov     UNMAPPED, %eax
1:      check   s_pf_vec, ex_vector(%rip), $14
        check   s_pf_err, ex_error(%rip), $0
        lea     2b(%rip), %rbx
        check   s_pf_rip, ex_rip(%rip), %rbx
        arm     1f
        mov     %cr2, %rbx
1:      check   s_pf_cr2, %rbx, $UNMAPPED

        # do_int3: #BP whatever the gate's DPL (ours is 0), RIP after it
        arm     1f
        int3
2:
1:      check   s_int3_vec, ex_vector(%rip), $3
        lea     2b(%rip), %rbx
        check   s_int3_rip, ex_rip(%rip), %rbx

        # permit_softint: a DPL-1 gate from kernel mode, RIP after the int
        arm     1f
        int     $VEC_PERMITTED
2:
1:      check   s_int_ok_vec, ex_vector(%rip), $VEC_PERMITTED
        lea     2b(%rip), %rbx
        check   s_int_ok_rip, ex_rip(%rip), %rbx

        # a DPL-0 gate: #GP naming the gate, at the int itself
        arm     1f
2:      int     $VEC_REFUSED
1:      check   s_int_refused_vec, ex_vector(%rip), $13
        check   s_int_refused_err, ex_error(%rip), $(VEC_REFUSED << 3 | SELECTOR_IDT)
        lea     2b(%rip), %rbx
        check   s_int_refused_rip, ex_rip(%rip), %rbx

        # emul-inv-op.c: the forced-emulation prefix runs CPUID, Xen's leaves
        arm     1f
        mov     $0x40000000, %eax
        xor     %ecx, %ecx
        ud2
        .ascii  "xen"
        cpuid
1:      mov     %rbx, %r12
        check   s_fep_max, %rax, $0x40000005
        check   s_fep_sig, %r12, $0x566e6558
        check   s_fep_vec, ex_vector(%rip), $NO_VECTOR

        # do_invalid_op: a ud2 alone is a #UD at the ud2
        arm     1f
2:      ud2
1:      check   s_ud_vec, ex_vector(%rip), $6
        lea     2b(%rip), %rbx
        check   s_ud_rip, ex_rip(%rip), %rbx

        call    kernel_page
        call    user_mode
        xor     %edi, %edi              # every check passed unless one failed
        call    xtf_success
        pop     %r12
        pop     %rbx
        ret

# adjust_guest_l1e: a page the kernel maps without _PAGE_USER still works
# (all guest code runs at CPL3); the mapping is put back afterwards.
kernel_page:
        push    %rbx
        call    alloc_page
        mov     %rax, %rbx
        mov     %rbx, %rdi
        mov     $PTE_KERNEL_RW, %esi
        call    set_mapping
        lea     s_kernel_map(%rip), %rdi
        call    expect_zero
        mov     %rbx, %rdi
        call    pfn_va
        mov     %rax, %rcx
        arm     1f
        movq    $0x5a5a, (%rcx)
        mov     (%rcx), %rdx
1:      check   s_kernel_page_vec, ex_vector(%rip), $NO_VECTOR
        mov     %rbx, %rdi
        mov     $PTE_RW, %esi
        call    set_mapping
        lea     s_kernel_unmap(%rip), %rdi
        call    expect_zero
        pop     %rbx
        ret

# unexpected(edi = vector): an exception no check armed for; report, power off
unexpected:
        push    %rdi
        lea     s_unexpected_exc(%rip), %rdi
        call    puts
        pop     %rdi
        call    put_hex
        lea     s_newline(%rip), %rdi
        call    puts
        xor     %edi, %edi
        call    xtf_failure
        call    xtf_report_status
        movl    $SHUTDOWN_poweroff, scratch(%rip)
        mov     $SCHEDOP_shutdown, %edi
        lea     scratch(%rip), %rsi
        call    hypercall_page + HYPERCALL_sched_op * 32
        ud2

# The rules that depend on the guest's mode, from guest user mode: the user L4
# is the kernel's own (every entry has _PAGE_USER), traps come back to
# kstack_top (stack_switch).
user_mode:
        push    %rbx
        call    sym_l4_mfn
        mov     %rax, %rsi
        mov     $MMUEXT_NEW_USER_BASEPTR, %edi
        call    mmuext1
        lea     s_user_baseptr(%rip), %rdi
        call    expect_zero
        mov     $FLAT_KERNEL_SS, %edi
        lea     kstack_top(%rip), %rsi
        call    hypercall_page + HYPERCALL_stack_switch * 32
        lea     s_stack_switch(%rip), %rdi
        call    expect_zero

        # permit_softint: user mode needs a gate of DPL 3
        arm     1f
        enter_user 2f
2:      int     $VEC_PERMITTED
1:      leave_user
        check   s_user_int_rpl, ex_rpl(%rip), $3
        check   s_user_int_vec, ex_vector(%rip), $13
        check   s_user_int_err, ex_error(%rip), $(VEC_PERMITTED << 3 | SELECTOR_IDT)
        lea     2b(%rip), %rbx
        check   s_user_int_rip, ex_rip(%rip), %rbx

        # pv_inject_event: a #PF in user mode has the user bit set
        arm     1f
        enter_user 2f
2:      mov     UNMAPPED, %eax
1:      leave_user
        check   s_user_pf_vec, ex_vector(%rip), $14
        check   s_user_pf_err, ex_error(%rip), $4

        # nothing privileged is emulated in user mode (mode_ring0)
        arm     1f
        enter_user 2f
2:      mov     %cr3, %rax
1:      leave_user
        check   s_user_cr3_vec, ex_vector(%rip), $13
        check   s_user_cr3_err, ex_error(%rip), $0

        # the forced-emulation prefix works in either mode; a ud2 brings it back
        arm     1f
        enter_user 2f
2:      mov     $0x40000000, %eax
        xor     %ecx, %ecx
        ud2
        .ascii  "xen"
        cpuid
        ud2
1:      leave_user
        check   s_user_fep, %rax, $0x40000005
        check   s_user_fep_vec, ex_vector(%rip), $6

        xor     %esi, %esi              # no user L4 again
        mov     $MMUEXT_NEW_USER_BASEPTR, %edi
        call    mmuext1
        lea     s_user_baseptr(%rip), %rdi
        call    expect_zero
        pop     %rbx
        ret

# expect(rdi = what, rsi = got, rdx = want)
expect:
        cmp     %rsi, %rdx
        jne     1f
        ret
1:      push    %rdx
        push    %rsi
        push    %rdi
        lea     s_failure_of(%rip), %rdi
        call    puts
        pop     %rdi
        call    puts
        lea     s_got(%rip), %rdi
        call    puts
        pop     %rdi
        call    put_hex
        lea     s_want(%rip), %rdi
        call    puts
        pop     %rdi
        call    put_hex
        lea     s_newline(%rip), %rdi
        call    puts
        xor     %edi, %edi
        jmp     xtf_failure

        handler 3, 0
        handler 6, 0
        handler 13, 1
        handler 14, 1
        handler VEC_PERMITTED, 0
        handler VEC_REFUSED, 0

        .data
        .balign 8
ex_vector:      .quad 0
ex_error:       .quad 0
ex_rip:         .quad 0
ex_resume:      .quad 0
ex_rpl:         .quad 0
saved_rsp:      .quad 0
        .balign 16
        .skip   1024
kstack_top:
        .skip   1024
ustack_top:
# trap_info: vector, flags (DPL in bits 0-1), cs, address; ends with address 0
trap_table:
        .irp v, 3, 6, 13, 14, VEC_REFUSED
        .byte   \v, 0
        .short  FLAT_KERNEL_CS
        .long   0
        .quad   h_\v
        .endr
        .byte   VEC_PERMITTED, 1
        .short  FLAT_KERNEL_CS
        .long   0
        .quad   h_VEC_PERMITTED
        .quad   0, 0

        .section .rodata
s_set_trap_table:       .asciz "set_trap_table "
s_failure_of:           .asciz "FAILURE: "
s_unexpected_exc:       .asciz "FAILURE: an exception no check expected, vector "
s_got:                  .asciz ": got "
s_want:                 .asciz ", want "
s_wrmsr_noncanon_vec:   .asciz "wrmsr GS_BASE non-canonical: vector"
s_wrmsr_noncanon_err:   .asciz "wrmsr GS_BASE non-canonical: error code"
s_wrmsr_noncanon_rip:   .asciz "wrmsr GS_BASE non-canonical: rip"
s_gs_base_vec:          .asciz "wrmsr/rdmsr GS_BASE: vector"
s_gs_base:              .asciz "rdmsr GS_BASE"
s_shadow_gs_base:       .asciz "rdmsr SHADOW_GS_BASE"
s_shadow_gs_base_vec:   .asciz "wrmsr SHADOW_GS_BASE: vector"
s_rdmsr_unknown_vec:    .asciz "rdmsr unknown: vector"
s_rdmsr_unknown_err:    .asciz "rdmsr unknown: error code"
s_rdmsr_unknown_rip:    .asciz "rdmsr unknown: rip"
s_cr3:                  .asciz "mov %cr3"
s_cr3_vec:              .asciz "mov %cr3: vector"
s_cr0:                  .asciz "mov %cr0"
s_cr4:                  .asciz "mov %cr4"
s_pf_vec:               .asciz "#PF: vector"
s_pf_err:               .asciz "#PF in kernel mode: error code"
s_pf_rip:               .asciz "#PF: rip"
s_pf_cr2:               .asciz "#PF: mov %cr2"
s_int3_vec:             .asciz "int3 through a DPL-0 gate: vector"
s_int3_rip:             .asciz "int3: rip"
s_int_ok_vec:           .asciz "int through a DPL-1 gate: vector"
s_int_ok_rip:           .asciz "int through a DPL-1 gate: rip"
s_int_refused_vec:      .asciz "int through a DPL-0 gate: vector"
s_int_refused_err:      .asciz "int through a DPL-0 gate: error code"
s_int_refused_rip:      .asciz "int through a DPL-0 gate: rip"
s_fep_vec:              .asciz "forced emulation: vector"
s_fep_max:              .asciz "forced cpuid 0x40000000: eax"
s_fep_sig:              .asciz "forced cpuid 0x40000000: ebx"
s_ud_vec:               .asciz "ud2: vector"
s_ud_rip:               .asciz "ud2: rip"
s_kernel_map:           .asciz "map a page without _PAGE_USER "
s_kernel_unmap:         .asciz "map it back "
s_user_baseptr:         .asciz "MMUEXT_NEW_USER_BASEPTR "
s_stack_switch:         .asciz "stack_switch "
s_user_int_rpl:         .asciz "user int through a DPL-1 gate: from user mode"
s_user_int_vec:         .asciz "user int through a DPL-1 gate: vector"
s_user_int_err:         .asciz "user int through a DPL-1 gate: error code"
s_user_int_rip:         .asciz "user int through a DPL-1 gate: rip"
s_user_pf_vec:          .asciz "user #PF: vector"
s_user_pf_err:          .asciz "user #PF: error code"
s_user_cr3_vec:         .asciz "user mov %cr3: vector"
s_user_cr3_err:         .asciz "user mov %cr3: error code"
s_user_fep:             .asciz "user forced cpuid 0x40000000: eax"
s_user_fep_vec:         .asciz "user forced cpuid then ud2: vector"
s_kernel_page_vec:      .asciz "write through a mapping without _PAGE_USER: vector"
