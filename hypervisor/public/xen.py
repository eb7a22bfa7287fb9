"""Core public ABI (xen/include/public/xen.h): hypercall numbers, MMU commands,
VIRQs, domain ids, start_info and shared_info."""

import ctypes
import enum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# ~0: a p2m or M2P entry that names no frame (Xen's INVALID_MFN, Linux's
# INVALID_P2M_ENTRY and Xen's INVALID_M2P_ENTRY are this one value)
INVALID_MFN = (1 << 64) - 1


class Hypercall(enum.IntEnum):
    set_trap_table = 0
    mmu_update = 1
    set_gdt = 2
    stack_switch = 3
    set_callbacks = 4
    fpu_taskswitch = 5
    sched_op_compat = 6
    platform_op = 7
    set_debugreg = 8
    get_debugreg = 9
    update_descriptor = 10
    memory_op = 12
    multicall = 13
    update_va_mapping = 14
    set_timer_op = 15
    event_channel_op_compat = 16
    xen_version = 17
    console_io = 18
    physdev_op_compat = 19
    grant_table_op = 20
    vm_assist = 21
    update_va_mapping_otherdomain = 22
    iret = 23
    vcpu_op = 24
    set_segment_base = 25
    mmuext_op = 26
    xsm_op = 27
    nmi_op = 28
    sched_op = 29
    callback_op = 30
    xenoprof_op = 31
    event_channel_op = 32
    physdev_op = 33
    hvm_op = 34
    sysctl = 35
    domctl = 36
    kexec_op = 37
    tmem_op = 38
    argo_op = 39
    xenpmu_op = 40
    dm_op = 41
    hypfs_op = 42
    arch_0 = 48
    arch_1 = 49
    arch_2 = 50
    arch_3 = 51
    arch_4 = 52
    arch_5 = 53
    arch_6 = 54
    arch_7 = 55


# mmu_update commands: ptr[1:0]
MMU_NORMAL_PT_UPDATE = 0
MMU_MACHPHYS_UPDATE = 1
MMU_PT_UPDATE_PRESERVE_AD = 2
MMU_PT_UPDATE_NO_TRANSLATE = 3
MMU_UPDATE_PREEMPTED = 1 << 31

# mmuext_op commands
MMUEXT_PIN_L1_TABLE = 0
MMUEXT_PIN_L2_TABLE = 1
MMUEXT_PIN_L3_TABLE = 2
MMUEXT_PIN_L4_TABLE = 3
MMUEXT_UNPIN_TABLE = 4
MMUEXT_NEW_BASEPTR = 5
MMUEXT_TLB_FLUSH_LOCAL = 6
MMUEXT_INVLPG_LOCAL = 7
MMUEXT_TLB_FLUSH_MULTI = 8
MMUEXT_INVLPG_MULTI = 9
MMUEXT_TLB_FLUSH_ALL = 10
MMUEXT_INVLPG_ALL = 11
MMUEXT_FLUSH_CACHE = 12
MMUEXT_SET_LDT = 13
MMUEXT_NEW_USER_BASEPTR = 15
MMUEXT_CLEAR_PAGE = 16
MMUEXT_COPY_PAGE = 17
MMUEXT_FLUSH_CACHE_GLOBAL = 18
MMUEXT_MARK_SUPER = 19
MMUEXT_UNMARK_SUPER = 20

# update_va_mapping flags
UVMF_NONE = 0
UVMF_TLB_FLUSH = 1
UVMF_INVLPG = 2
UVMF_FLUSHTYPE_MASK = 3
UVMF_MULTI = 0
UVMF_LOCAL = 0
UVMF_ALL = 1 << 2

# vm_assist commands and types (a bit each in the domain's vm_assist word)
VMASST_CMD_enable = 0
VMASST_CMD_disable = 1
VMASST_TYPE_4gb_segments = 0
VMASST_TYPE_4gb_segments_notify = 1
VMASST_TYPE_writable_pagetables = 2
VMASST_TYPE_pae_extended_cr3 = 3
VMASST_TYPE_architectural_iopl = 4
VMASST_TYPE_runstate_update_flag = 5
VMASST_TYPE_m2p_strict = 32

# console_io
CONSOLEIO_write = 0
CONSOLEIO_read = 1

# xen_version
XENVER_version = 0
XENVER_extraversion = 1
XENVER_compile_info = 2
XENVER_capabilities = 3
XENVER_changeset = 4
XENVER_platform_parameters = 5
XENVER_get_features = 6
XENVER_pagesize = 7
XENVER_guest_handle = 8
XENVER_commandline = 9
XENVER_build_id = 10

# domain ids
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF

# virtual interrupts
VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_CONSOLE = 2
VIRQ_DOM_EXC = 3
VIRQ_TBUF = 4
VIRQ_DEBUGGER = 6
VIRQ_XENOPROF = 7
VIRQ_CON_RING = 8
VIRQ_PCPU_STATE = 9
VIRQ_MEM_EVENT = 10
VIRQ_ARGO = 11
VIRQ_ENOMEM = 12
VIRQ_XENPMU = 13
NR_VIRQS = 24

# start_info flags
SIF_PRIVILEGED = 1 << 0
SIF_INITDOMAIN = 1 << 1
SIF_MULTIBOOT_MOD = 1 << 2
SIF_MOD_START_PFN = 1 << 3
SIF_VIRT_P2M_4TOOLS = 1 << 4

XEN_LEGACY_MAX_VCPUS = 32
NR_EVENT_CHANNELS = 64 * 64  # 2-level ABI, 64-bit guest


domid_t = ctypes.c_uint16
xen_pfn_t = ctypes.c_uint64  # a pfn or mfn in a guest's list (memory_op's extents)


class multicall_entry(ctypes.LittleEndianStructure):
    """struct multicall_entry (xen.h), 64 bytes on x86-64: a hypercall and
    its result, written back in place."""
    _fields_ = [("op", ctypes.c_uint64), ("result", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]


MULTICALL_ENTRY_SIZE = ctypes.sizeof(multicall_entry)


class mmu_update(ctypes.LittleEndianStructure):
    """struct mmu_update (xen.h)."""
    _fields_ = [("ptr", ctypes.c_uint64), ("val", ctypes.c_uint64)]


class _mmuext_arg1(ctypes.Union):
    _fields_ = [("mfn", ctypes.c_uint64), ("linear_addr", ctypes.c_uint64)]


class _mmuext_arg2(ctypes.Union):
    _fields_ = [("nr_ents", ctypes.c_uint32), ("vcpumask", ctypes.c_uint64),
                ("src_mfn", ctypes.c_uint64)]


class mmuext_op(ctypes.LittleEndianStructure):
    """struct mmuext_op (xen.h)."""
    _fields_ = [("cmd", ctypes.c_uint32), ("arg1", _mmuext_arg1), ("arg2", _mmuext_arg2)]


class _domU(ctypes.LittleEndianStructure):
    _fields_ = [("mfn", ctypes.c_uint64), ("evtchn", ctypes.c_uint32)]


class _console(ctypes.Union):
    _fields_ = [("domU", _domU)]


class start_info(ctypes.LittleEndianStructure):
    """struct start_info (xen.h), 1168 bytes on x86-64."""
    _fields_ = [
        ("magic", ctypes.c_char * 32),
        ("nr_pages", ctypes.c_uint64),
        ("shared_info", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("store_mfn", ctypes.c_uint64),
        ("store_evtchn", ctypes.c_uint32),
        ("console", _console),
        ("pt_base", ctypes.c_uint64),
        ("nr_pt_frames", ctypes.c_uint64),
        ("mfn_list", ctypes.c_uint64),
        ("mod_start", ctypes.c_uint64),
        ("mod_len", ctypes.c_uint64),
        ("cmd_line", ctypes.c_char * 1024),
        ("first_p2m_pfn", ctypes.c_uint64),
        ("nr_p2m_frames", ctypes.c_uint64),
    ]


class vcpu_time_info(ctypes.LittleEndianStructure):
    """struct vcpu_time_info (xen.h), 32 bytes."""
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("tsc_timestamp", ctypes.c_uint64),
        ("system_time", ctypes.c_uint64),
        ("tsc_to_system_mul", ctypes.c_uint32),
        ("tsc_shift", ctypes.c_int8),
        ("flags", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8 * 2),
    ]


class arch_vcpu_info(ctypes.LittleEndianStructure):
    """struct arch_vcpu_info (arch-x86/xen.h)."""
    _fields_ = [("cr2", ctypes.c_uint64), ("pad", ctypes.c_uint64)]


class vcpu_info(ctypes.LittleEndianStructure):
    """struct vcpu_info (xen.h), 64 bytes."""
    _fields_ = [
        ("evtchn_upcall_pending", ctypes.c_uint8),
        ("evtchn_upcall_mask", ctypes.c_uint8),
        ("evtchn_pending_sel", ctypes.c_uint64),
        ("arch", arch_vcpu_info),
        ("time", vcpu_time_info),
    ]


class arch_shared_info(ctypes.LittleEndianStructure):
    """struct arch_shared_info (arch-x86/xen.h)."""
    _fields_ = [
        ("max_pfn", ctypes.c_uint64),
        ("pfn_to_mfn_frame_list_list", ctypes.c_uint64),
        ("nmi_reason", ctypes.c_uint64),
        ("p2m_cr3", ctypes.c_uint64),
        ("p2m_vaddr", ctypes.c_uint64),
        ("p2m_generation", ctypes.c_uint64),
    ]


class shared_info(ctypes.LittleEndianStructure):
    """struct shared_info (xen.h), 3136 bytes on x86-64."""
    _fields_ = [
        ("vcpu_info", vcpu_info * XEN_LEGACY_MAX_VCPUS),
        ("evtchn_pending", ctypes.c_uint64 * 64),
        ("evtchn_mask", ctypes.c_uint64 * 64),
        ("wc_version", ctypes.c_uint32),
        ("wc_sec", ctypes.c_uint32),
        ("wc_nsec", ctypes.c_uint32),
        ("wc_sec_hi", ctypes.c_uint32),
        ("arch", arch_shared_info),
    ]
