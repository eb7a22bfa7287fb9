"""Page-frame info types (xen/include/public/domctl.h, XEN_DOMCTL_PFINFO_*), as
XEN_DOMCTL_getpageframeinfo3 reports them and the migration stream carries
them: the top nibble of a PAGE_DATA pfn entry is the type >> 28."""

from __future__ import annotations

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
