"""Page-frame info types (xen/include/public/domctl.h, XEN_DOMCTL_PFINFO_*), as
XEN_DOMCTL_getpageframeinfo3 reports them and the migration stream carries
them: the top nibble of a PAGE_DATA pfn entry is the type >> 28."""

from __future__ import annotations

import ctypes

PFINFO_LTAB_SHIFT = 28
PFINFO_NOTAB = 0x0 << 28
PFINFO_L1TAB = 0x1 << 28
PFINFO_L2TAB = 0x2 << 28
PFINFO_L3TAB = 0x3 << 28
PFINFO_L4TAB = 0x4 << 28
PFINFO_LTABTYPE_MASK = 0x7 << 28
PFINFO_LPINTAB = 0x1 << 31
PFINFO_BROKEN = 0xD << 28  # broken page
PFINFO_XALLOC = 0xE << 28  # allocate only, no data (Xen 4.2 to 4.5)
PFINFO_XTAB = 0xF << 28    # invalid page: not in the p2m
PFINFO_LTAB_MASK = 0xF << 28

# TSC modes (xen/include/public/arch-x86/xen.h)
TSC_MODE_DEFAULT = 0
TSC_MODE_ALWAYS_EMULATE = 1
TSC_MODE_NEVER_EMULATE = 2

# The domctl hypercall's header (struct xen_domctl): cmd, interface_version,
# domain, then a 128-byte union; the whole is 144 bytes.
XEN_DOMCTL_INTERFACE_VERSION = 0x00000017
XEN_DOMCTL_SIZE = 144
XEN_DOMCTL_createdomain = 1
XEN_DOMCTL_assign_device = 37
XEN_DOMCTL_test_assign_device = 45
XEN_DOMCTL_deassign_device = 47
XEN_DOMCTL_vm_event_op = 56

XEN_DOMCTL_shadow_op = 10

# XEN_DOMCTL_shadow_op's operations (log-dirty mode for live migration)
XEN_DOMCTL_SHADOW_OP_OFF = 0              # disable, free the bitmap
XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY = 2  # legacy: ENABLE with ENABLE_LOG_DIRTY
XEN_DOMCTL_SHADOW_OP_CLEAN = 11           # return the bitmap and clean it for the next round
XEN_DOMCTL_SHADOW_OP_PEEK = 12            # return the bitmap, leave it as it is
XEN_DOMCTL_SHADOW_OP_ENABLE = 32          # with XEN_DOMCTL_SHADOW_ENABLE_* in mode
XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY = 1 << 2
XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL = 1 << 0  # CLEAN/PEEK mode: the last round


class xen_domctl_shadow_op_stats(ctypes.LittleEndianStructure):
    _fields_ = [("fault_count", ctypes.c_uint32), ("dirty_count", ctypes.c_uint32)]


class xen_domctl_shadow_op(ctypes.LittleEndianStructure):
    """XEN_DOMCTL_shadow_op's argument: ``pages`` is the bitmap's size in
    bits going in (pfns), the bits produced coming out."""

    _fields_ = [
        ("op", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("mb", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),  # XEN_GUEST_HANDLE_64(uint8)
        ("pages", ctypes.c_uint64),
        ("stats", xen_domctl_shadow_op_stats),
    ]
