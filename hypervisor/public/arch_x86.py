"""x86-64 parts of the public ABI (arch-x86/xen.h, arch-x86/xen-x86_64.h), and
the x86 pagetable-entry bits PV guests write into their own tables."""

import ctypes

# flat segments in the Xen-reserved part of every GDT (GDT page 14)
FLAT_RING3_CS32 = 0xE023
FLAT_RING3_CS64 = 0xE033
FLAT_RING3_DS32 = 0xE02B
FLAT_RING3_DS64 = 0x0000
FLAT_RING3_SS32 = 0xE02B
FLAT_RING3_SS64 = 0xE02B
FLAT_KERNEL_CS64 = FLAT_RING3_CS64
FLAT_KERNEL_DS64 = FLAT_RING3_DS64
FLAT_KERNEL_SS64 = FLAT_RING3_SS64
FLAT_USER_CS64 = FLAT_RING3_CS64
FLAT_USER_DS64 = FLAT_RING3_DS64
FLAT_USER_SS64 = FLAT_RING3_SS64
# a PV guest's GDT is its own below this page; Xen's flat selectors above
FIRST_RESERVED_GDT_PAGE = 14
FIRST_RESERVED_GDT_ENTRY = FIRST_RESERVED_GDT_PAGE * 4096 // 8

HYPERVISOR_VIRT_START = 0xFFFF800000000000
HYPERVISOR_VIRT_END = 0xFFFF880000000000
MACH2PHYS_VIRT_START = 0xFFFF800000000000
MACH2PHYS_VIRT_END = 0xFFFF804000000000
ROOT_PAGETABLE_FIRST_XEN_SLOT = 256
ROOT_PAGETABLE_LAST_XEN_SLOT = 271

# pagetable entry bits
_PAGE_PRESENT = 0x001
_PAGE_RW = 0x002
_PAGE_USER = 0x004
_PAGE_PWT = 0x008
_PAGE_PCD = 0x010
_PAGE_ACCESSED = 0x020
_PAGE_DIRTY = 0x040
_PAGE_PSE = 0x080
_PAGE_PAT = 0x080
_PAGE_GLOBAL = 0x100
_PAGE_NX = 1 << 63
_PAGE_GNTTAB = 1 << 62  # a grant mapping's mark: an L1 entry from a guest may not carry it
PTE_FRAME_MASK = 0x000FFFFFFFFFF000
# bit 52, one of the available bits: Xen's mark on an L1 entry the guest made
# without _PAGE_USER (a kernel page; x86_64/page.h)
_PAGE_GUEST_KERNEL = 1 << 52

# the segment-base MSRs a 64-bit PV kernel reads and writes (Xen emulates them)
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_SHADOW_GS_BASE = 0xC0000102

X86_EFLAGS_MBS = 1 << 1  # reads as one on every x86
X86_EFLAGS_TF = 1 << 8
X86_EFLAGS_IF = 1 << 9
X86_EFLAGS_IOPL = 3 << 12
X86_EFLAGS_NT = 1 << 14
X86_EFLAGS_RF = 1 << 16
X86_EFLAGS_VM = 1 << 17

# trap_info.flags: the gate's DPL in bits 0-1 (TI_GET_DPL), and bit 2 (TI_GET_IF)
# to mask events on entry, as an interrupt gate clears IF
TI_DPL_MASK = 3
TI_IF = 1 << 2

# entries in a pagetable of any level (x86-64, 4 KiB pages): each level
# translates PAGETABLE_ORDER bits of a virtual address, above the page offset
L1_PAGETABLE_ENTRIES = 512
PAGETABLE_ORDER = 9
_PAGE_OFFSET_BITS = 12


def table_offset(va: int, level: int) -> int:
    """The slot of ``va`` in its level-``level`` table (Xen's
    l1_table_offset .. l4_table_offset)."""
    shift = _PAGE_OFFSET_BITS + PAGETABLE_ORDER * (level - 1)
    return (va >> shift) & (L1_PAGETABLE_ENTRIES - 1)

# vcpu_guest_context.flags
VGCF_i387_valid = 1 << 0
VGCF_in_kernel = 1 << 2
VGCF_failsafe_disables_events = 1 << 3
VGCF_syscall_disables_events = 1 << 4
VGCF_online = 1 << 5
# iret_context.flags
VGCF_in_syscall = 1 << 8


class cpu_user_regs(ctypes.LittleEndianStructure):
    """struct cpu_user_regs (xen-x86_64.h), 200 bytes."""
    _fields_ = [
        ("r15", ctypes.c_uint64), ("r14", ctypes.c_uint64), ("r13", ctypes.c_uint64),
        ("r12", ctypes.c_uint64), ("rbp", ctypes.c_uint64), ("rbx", ctypes.c_uint64),
        ("r11", ctypes.c_uint64), ("r10", ctypes.c_uint64), ("r9", ctypes.c_uint64),
        ("r8", ctypes.c_uint64), ("rax", ctypes.c_uint64), ("rcx", ctypes.c_uint64),
        ("rdx", ctypes.c_uint64), ("rsi", ctypes.c_uint64), ("rdi", ctypes.c_uint64),
        ("error_code", ctypes.c_uint32), ("entry_vector", ctypes.c_uint32),
        ("rip", ctypes.c_uint64),
        ("cs", ctypes.c_uint16), ("_pad0", ctypes.c_uint16 * 1),
        ("saved_upcall_mask", ctypes.c_uint8), ("_pad1", ctypes.c_uint8 * 3),
        ("rflags", ctypes.c_uint64), ("rsp", ctypes.c_uint64),
        ("ss", ctypes.c_uint16), ("_pad2", ctypes.c_uint16 * 3),
        ("es", ctypes.c_uint16), ("_pad3", ctypes.c_uint16 * 3),
        ("ds", ctypes.c_uint16), ("_pad4", ctypes.c_uint16 * 3),
        ("fs", ctypes.c_uint16), ("_pad5", ctypes.c_uint16 * 3),
        ("gs", ctypes.c_uint16), ("_pad6", ctypes.c_uint16 * 3),
    ]


class trap_info(ctypes.LittleEndianStructure):
    """struct trap_info (arch-x86/xen.h), 16 bytes."""
    _fields_ = [("vector", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("cs", ctypes.c_uint16), ("address", ctypes.c_uint64)]


class vcpu_guest_context(ctypes.LittleEndianStructure):
    """struct vcpu_guest_context (arch-x86/xen.h), 5168 bytes on x86-64."""
    _fields_ = [
        ("fpu_ctxt", ctypes.c_uint8 * 512),
        ("flags", ctypes.c_uint64),
        ("user_regs", cpu_user_regs),
        ("trap_ctxt", trap_info * 256),
        ("ldt_base", ctypes.c_uint64),
        ("ldt_ents", ctypes.c_uint64),
        ("gdt_frames", ctypes.c_uint64 * 16),
        ("gdt_ents", ctypes.c_uint64),
        ("kernel_ss", ctypes.c_uint64),
        ("kernel_sp", ctypes.c_uint64),
        ("ctrlreg", ctypes.c_uint64 * 8),
        ("debugreg", ctypes.c_uint64 * 8),
        ("event_callback_eip", ctypes.c_uint64),
        ("failsafe_callback_eip", ctypes.c_uint64),
        ("syscall_callback_eip", ctypes.c_uint64),
        ("vm_assist", ctypes.c_uint64),
        ("fs_base", ctypes.c_uint64),
        ("gs_base_kernel", ctypes.c_uint64),
        ("gs_base_user", ctypes.c_uint64),
    ]


class iret_context(ctypes.LittleEndianStructure):
    """struct iret_context (xen-x86_64.h): the HYPERVISOR_iret frame, 72 bytes."""
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("rax", "r11", "rcx", "flags", "rip", "cs", "rflags", "rsp", "ss")]
