"""xen_version's argument buffers (xen/include/public/version.h); the XENVER_*
commands are in hypervisor.public.xen."""

import ctypes

XEN_EXTRAVERSION_LEN = 16
XEN_CAPABILITIES_INFO_LEN = 1024
XEN_CHANGESET_INFO_LEN = 64


class xen_compile_info(ctypes.LittleEndianStructure):
    """XENVER_compile_info, 144 bytes."""
    _fields_ = [("compiler", ctypes.c_char * 64), ("compile_by", ctypes.c_char * 16),
                ("compile_domain", ctypes.c_char * 32), ("compile_date", ctypes.c_char * 32)]


class xen_platform_parameters(ctypes.LittleEndianStructure):
    """XENVER_platform_parameters: where the hypervisor's range starts; 8 bytes."""
    _fields_ = [("virt_start", ctypes.c_uint64)]


class xen_feature_info(ctypes.LittleEndianStructure):
    """XENVER_get_features: one 32-bit word of feature flags; 8 bytes."""
    _fields_ = [("submap_idx", ctypes.c_uint32), ("submap", ctypes.c_uint32)]
