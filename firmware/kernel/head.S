# The pvlab guest image: what a Xen PV kernel image carries (ELF notes, a
# hypercall page), plus the native text range where the Python kernel's entry
# points live and a table of the user programs it can run.

        .equ XEN_ELFNOTE_ENTRY, 1
        .equ XEN_ELFNOTE_HYPERCALL_PAGE, 2
        .equ XEN_ELFNOTE_VIRT_BASE, 3
        .equ XEN_ELFNOTE_PADDR_OFFSET, 4
        .equ XEN_ELFNOTE_XEN_VERSION, 5
        .equ XEN_ELFNOTE_GUEST_OS, 6
        .equ XEN_ELFNOTE_GUEST_VERSION, 7
        .equ XEN_ELFNOTE_LOADER, 8
        .equ XEN_ELFNOTE_PAE_MODE, 9
        .equ XEN_ELFNOTE_FEATURES, 10
        .equ XEN_ELFNOTE_SUSPEND_CANCEL, 14
        .equ PVLAB_NOTE_KERNEL, 1           # the Python module that is the kernel
        .equ PVLAB_NOTE_NATIVE_TEXT, 2      # native entry range: VA, size
        .equ VIRT_BASE, 0xffffffff80000000
        .equ NATIVE_TEXT_SIZE, 16384
        .equ KERNEL_DATA_SIZE, 65536

# A program table entry: its name padded to 16 bytes, then where its ELF is.
.macro program name, n
\n\():  .ascii  "\name"
        .fill   16 - (. - \n\()b), 1, 0
        .quad   \name\()_elf - programs, \name\()_end - \name\()_elf
.endm
# An embedded user program ELF.
.macro blob name
        .balign 16
\name\()_elf:
        .incbin "user/\name\().elf"
\name\()_end:
.endm

# An ELF note: name, type, then the descriptor between 2: and 3:.
.macro note name, type
        .balign 4
        .long   2f - 1f
        .long   4f - 3f
        .long   \type
1:      .asciz  "\name"
2:      .balign 4
3:
.endm
.macro endnote
4:      .balign 4
.endm

        .section .pvlab_header, "a"
        .quad   0x474d4942414c5650          # "PVLABIMG"
        .quad   1                           # header version
        .quad   native_text, NATIVE_TEXT_SIZE
        .quad   hypercall_page
        .quad   programs
        .quad   kernel_data, KERNEL_DATA_SIZE
        .quad   image_end

        .section .text.native, "ax"
        .globl  native_text
native_text:                                # entry i at native_text + 16 * i;
        .fill   NATIVE_TEXT_SIZE, 1, 0xcc   # never executed: a hook runs Python

        .section .text.hypercall_page, "ax"
        .globl  hypercall_page
hypercall_page:                             # the hypervisor writes the stubs
        .fill   4096, 1, 0xc3

        .section .rodata.programs, "a"
        .balign 16
programs:
        .quad   9                           # entries: name[16], offset, size
        program hello, 1
        program counter, 2
        program hashchain, 3
        program dirtier, 4
        program spawner, 5
        program fault, 6
        program sh, 7
        program fdtest, 8
        program portecho, 9
        .balign 16
        blob hello
        blob counter
        blob hashchain
        blob dirtier
        blob spawner
        blob fault
        blob sh
        blob fdtest
        blob portecho

        .section .bss.kernel_data, "aw", @nobits
        .balign 4096
        .globl  kernel_data
kernel_data:
        .skip   KERNEL_DATA_SIZE

        .section .note.Xen, "a"
        note "Xen", XEN_ELFNOTE_GUEST_OS
        .asciz  "pvlab"
        endnote
        note "Xen", XEN_ELFNOTE_GUEST_VERSION
        .asciz  "0.1"
        endnote
        note "Xen", XEN_ELFNOTE_XEN_VERSION
        .asciz  "xen-3.0"
        endnote
        note "Xen", XEN_ELFNOTE_LOADER
        .asciz  "generic"
        endnote
        note "Xen", XEN_ELFNOTE_VIRT_BASE
        .quad   VIRT_BASE
        endnote
        note "Xen", XEN_ELFNOTE_PADDR_OFFSET
        .quad   VIRT_BASE   # p_paddr is p_vaddr: libelf loads at p_paddr + VIRT_BASE - PADDR_OFFSET
        endnote
        note "Xen", XEN_ELFNOTE_ENTRY
        .quad   native_text
        endnote
        note "Xen", XEN_ELFNOTE_HYPERCALL_PAGE
        .quad   hypercall_page
        endnote
        note "Xen", XEN_ELFNOTE_FEATURES
        .asciz  "!writable_page_tables|pae_pgdir_above_4gb"
        endnote
        note "Xen", XEN_ELFNOTE_PAE_MODE
        .asciz  "yes"
        endnote
        note "Xen", XEN_ELFNOTE_SUSPEND_CANCEL
        .quad   1
        endnote

        .section .note.pvlab, "a"
        note "pvlab", PVLAB_NOTE_KERNEL
        .asciz  "guestos"
        endnote
        note "pvlab", PVLAB_NOTE_NATIVE_TEXT
        .quad   native_text, NATIVE_TEXT_SIZE
        endnote
