"""ELF note types of a guest image (xen/include/public/elfnote.h), and pvlab's own."""

import enum


class XenElfNote(enum.IntEnum):
    INFO = 0
    ENTRY = 1
    HYPERCALL_PAGE = 2
    VIRT_BASE = 3
    PADDR_OFFSET = 4
    XEN_VERSION = 5
    GUEST_OS = 6
    GUEST_VERSION = 7
    LOADER = 8
    PAE_MODE = 9
    FEATURES = 10
    BSD_SYMTAB = 11
    HV_START_LOW = 12
    L1_MFN_VALID = 13
    SUSPEND_CANCEL = 14
    INIT_P2M = 15
    MOD_START_PFN = 16
    SUPPORTED_FEATURES = 17
    PHYS32_ENTRY = 18
    PHYS32_RELOC = 19


# pvlab's own notes, under the note name "pvlab"
PVLAB_NOTE_NAME = "pvlab"
PVLAB_NOTE_KERNEL = 1       # string: the Python module that is the guest kernel
PVLAB_NOTE_NATIVE_TEXT = 2  # u64 VA, u64 size of the native entry range
