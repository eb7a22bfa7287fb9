# A PV guest that starts at virtual address 0 and names neither VIRT_BASE nor
# ENTRY: Xen's libelf then takes virt_base 0 and the ELF header's e_entry
# (xen.git common/libelf/libelf-dominfo.c, elf_xen_addr_calc_check). Its notes
# sit in a section that no segment covers, where libelf looks when no PT_NOTE
# segment holds a Xen note (elf_xen_parse). It shuts down with reason reboot,
# which nothing but its own entry code asks for.

        .equ SHUTDOWN_reboot, 1
        .include "hypercall.inc"
        .include "elfnote.inc"

        .text
        .globl  _start
_start:                                 # at virtual address 0
        pushq   $SHUTDOWN_reboot
        mov     %rsp, %rsi
        mov     $SCHEDOP_shutdown, %edi
        call    hypercall_page + HYPERCALL_sched_op * 32
        ud2

        .balign 4096
hypercall_page:
        .skip   4096

        # not allocated: in no segment, found only among the sections
        .section .note.Xen, "", @note
        note XEN_ELFNOTE_XEN_VERSION
        .asciz  "xen-3.0"
        endnote
        note XEN_ELFNOTE_LOADER
        .asciz  "generic"
        endnote
        note XEN_ELFNOTE_HYPERCALL_PAGE
        .quad   hypercall_page
        endnote
