"""memory_op (xen/include/public/memory.h)."""

import ctypes

XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_maximum_ram_page = 2
XENMEM_current_reservation = 3
XENMEM_maximum_reservation = 4
XENMEM_machphys_mfn_list = 5
XENMEM_populate_physmap = 6
XENMEM_add_to_physmap = 7
XENMEM_memory_map = 9
XENMEM_machine_memory_map = 10
XENMEM_exchange = 11
XENMEM_maximum_gpfn = 14

MEMOP_EXTENT_SHIFT = 6
MEMOP_CMD_MASK = (1 << MEMOP_EXTENT_SHIFT) - 1


class xen_memory_reservation(ctypes.LittleEndianStructure):
    """struct xen_memory_reservation (memory.h), 32 bytes on x86-64."""
    _fields_ = [
        ("extent_start", ctypes.c_uint64),   # guest handle: xen_pfn_t *
        ("nr_extents", ctypes.c_uint64),
        ("extent_order", ctypes.c_uint32),
        ("mem_flags", ctypes.c_uint32),
        ("domid", ctypes.c_uint16),
    ]
