"""xen_version's argument buffers (xen/include/public/version.h); the XENVER_*
commands are in hypervisor.public.xen."""

import ctypes

XEN_EXTRAVERSION_LEN = 16
XEN_CAPABILITIES_INFO_LEN = 1024
XEN_CHANGESET_INFO_LEN = 64
XEN_COMMANDLINE_LEN = 1024
XEN_DOMAIN_HANDLE_LEN = 16  # xen_domain_handle_t, the toolstack's UUID

# XENVER_get_features submap 0 (xen/include/public/features.h)
XENFEAT_writable_page_tables = 0
XENFEAT_writable_descriptor_tables = 1
XENFEAT_auto_translated_physmap = 2
XENFEAT_supervisor_mode_kernel = 3
XENFEAT_pae_pgdir_above_4gb = 4
XENFEAT_mmu_pt_update_preserve_ad = 5
XENFEAT_highmem_assist = 6
XENFEAT_gnttab_map_avail_bits = 7
XENFEAT_hvm_callback_vector = 8
XENFEAT_hvm_safe_pvclock = 9
XENFEAT_hvm_pirqs = 10
XENFEAT_dom0 = 11
XENFEAT_grant_map_identity = 12
XENFEAT_memory_op_vnode_supported = 13
XENFEAT_ARM_SMCCC_supported = 14
XENFEAT_linux_rsdp_unrestricted = 15
XENFEAT_not_direct_mapped = 16
XENFEAT_direct_mapped = 17
XENFEAT_runstate_phys_area = 18
XENFEAT_vcpu_time_phys_area = 19
XENFEAT_dm_msix_all_writes = 20
XENFEAT_NR_SUBMAPS = 1


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
