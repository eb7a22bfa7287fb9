"""Grant tables (xen/include/public/grant_table.h): the sub-ops of
grant_table_op, their status codes, and the structures a guest passes."""

from __future__ import annotations

import ctypes

GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6
GNTTABOP_unmap_and_replace = 7
GNTTABOP_set_version = 8
GNTTABOP_get_status_frames = 9
GNTTABOP_get_version = 10
GNTTABOP_swap_grant_ref = 11
GNTTABOP_cache_flush = 12
# the low 12 bits of the command are the sub-op; the rest is an opaque
# argument only GNTTABOP_cache_flush may carry
GNTTABOP_CMD_MASK = (1 << 12) - 1

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_virt_addr = -5
GNTST_permission_denied = -8

GTF_type_mask = 3
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_reading = 1 << 3
GTF_writing = 1 << 4

# the first 8 entries are the toolstack's (console, xenstore): kept across
# a change of version
GNTTAB_NR_RESERVED_ENTRIES = 8


class gnttab_setup_table(ctypes.LittleEndianStructure):
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
        ("frame_list", ctypes.c_uint64),  # XEN_GUEST_HANDLE(xen_pfn_t)
    ]


class gnttab_query_size(ctypes.LittleEndianStructure):
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("nr_frames", ctypes.c_uint32),
        ("max_nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class gnttab_get_status_frames(ctypes.LittleEndianStructure):
    _fields_ = [
        ("nr_frames", ctypes.c_uint32),
        ("dom", ctypes.c_uint16),
        ("status", ctypes.c_int16),
        ("frame_list", ctypes.c_uint64),  # XEN_GUEST_HANDLE(uint64_t)
    ]


class gnttab_get_version(ctypes.LittleEndianStructure):
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("version", ctypes.c_uint32),
    ]


class gnttab_set_version(ctypes.LittleEndianStructure):
    _fields_ = [("version", ctypes.c_uint32)]


class grant_entry_v1(ctypes.LittleEndianStructure):
    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("domid", ctypes.c_uint16),
        ("frame", ctypes.c_uint32),
    ]


class grant_entry_v2(ctypes.LittleEndianStructure):
    """The full_page form of the v2 entry: header, then the frame at byte 8."""

    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("domid", ctypes.c_uint16),
        ("pad0", ctypes.c_uint32),
        ("frame", ctypes.c_uint64),
    ]
