"""What a domU may ask of the allocator in a memory op: the extent order and
the mem_flags of a xen_memory_reservation (xen/common/memory.c
construct_memop_from_reservation, propagate_node, max_order)."""

from __future__ import annotations

from hypervisor.public.memory import (
    NUMA_NO_NODE,
    XENMEMF_exact_node_request,
    XENMEMF_get_address_bits,
    XENMEMF_get_node,
    XENMEMF_vnode,
)

DOMU_MAX_ORDER = 9  # CONFIG_DOMU_MAX_ORDER on x86: 2 MiB extents at most
PAGE_SHIFT = 12


def propagate_node_ok(mem_flags: int) -> bool:
    """propagate_node for a domU: a node is only a hint, an exact node request
    is refused."""
    return (XENMEMF_get_node(mem_flags) == NUMA_NO_NODE
            or not mem_flags & XENMEMF_exact_node_request)


def mem_flags_ok(mem_flags: int) -> bool:
    """construct_memop_from_reservation for a domU with no virtual NUMA:
    address_bits of PAGE_SHIFT or fewer is refused; a vnode request is ignored
    (no vnuma), any other node goes through propagate_node. Fewer address bits
    than the machine needs are accepted and not honoured here (one pool)."""
    bits = XENMEMF_get_address_bits(mem_flags)
    if bits and bits <= PAGE_SHIFT:
        return False
    return bool(mem_flags & XENMEMF_vnode) or propagate_node_ok(mem_flags)
