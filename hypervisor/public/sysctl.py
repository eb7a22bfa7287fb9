"""The sysctl hypercall's header (xen/include/public/sysctl.h, struct
xen_sysctl): cmd, interface_version, then a 128-byte union; 136 bytes."""

XEN_SYSCTL_INTERFACE_VERSION = 0x00000015
XEN_SYSCTL_SIZE = 136
