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

# xen_memory_reservation.mem_flags
XENMEMF_populate_on_demand = 1 << 16
XENMEMF_exact_node_request = 1 << 17
XENMEMF_vnode = 1 << 18
NUMA_NO_NODE = 0xFF


def XENMEMF_address_bits(x: int) -> int:  # noqa: N802 (Xen's macro names)
    return x


def XENMEMF_get_address_bits(x: int) -> int:  # noqa: N802
    return x & 0xFF


def XENMEMF_node(x: int) -> int:  # noqa: N802
    return (x + 1) << 8


def XENMEMF_get_node(x: int) -> int:  # noqa: N802
    return ((x >> 8) - 1) & 0xFF


def XENMEMF_exact_node(n: int) -> int:  # noqa: N802
    return XENMEMF_node(n) | XENMEMF_exact_node_request


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


class xen_memory_exchange(ctypes.LittleEndianStructure):
    """struct xen_memory_exchange (memory.h), 72 bytes on x86-64."""
    _fields_ = [
        ("in_", xen_memory_reservation),    # "in" in C
        ("out", xen_memory_reservation),
        ("nr_exchanged", ctypes.c_uint64),
    ]
