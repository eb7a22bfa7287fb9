"""What a guest does with set_gdt and its grant table beyond single results
(the portable cases in tests/hypercalls/cases_boot.py give those): the
descriptors a GDT frame holds are checked and fixed up as Xen's
check_descriptor does (xen/arch/x86/pv/descriptor-tables.c), and a grant
table's frame is the guest's to map, its first entries kept across a change
of version (xen/common/grant_table.c gnttab_set_version)."""

from __future__ import annotations

import struct

from hypervisor.public.errno import EBUSY, EINVAL
from hypervisor.public.grant_table import (
    GNTTABOP_get_status_frames,
    GNTTABOP_set_version,
    GNTTABOP_setup_table,
    GTF_permit_access,
    GTF_reading,
)
from hypervisor.public.xen import DOMID_SELF, Hypercall
from tests.hypercalls.guest import run_case
from tests.hypercalls.steps import RO, RW

CODE64_DPL0 = 0x00AF9A000000FFFF   # present, S, code, L, DPL 0
TSS64 = 0x0000890000000067        # present, system, 64-bit TSS: not for a PV guest


def _set_gdt(g, mfn: int, entries: int) -> int:
    buf = g.scratch
    g.cpu.write(buf, struct.pack("<Q", mfn))
    return g.cpu.hypercall(Hypercall.set_gdt, buf, entries)


def test_gdt_descriptors_are_checked_and_their_dpl_raised():
    def case(g):
        pfn, mfn = g.alloc()
        g.write_entry(pfn, 0, CODE64_DPL0)
        g.write_entry(pfn, 1, TSS64)
        assert g.set_ro(pfn) == 0
        refused = _set_gdt(g, mfn, 2)
        assert g.set_ro(pfn, ro=False) == 0  # refused: the frame is free to map again
        g.write_entry(pfn, 1, 0)
        assert g.set_ro(pfn) == 0
        taken = _set_gdt(g, mfn, 2)
        seen = g.cpu.read_u64(g.va(pfn))
        assert _set_gdt(g, 0, 0) == 0
        return refused, taken, (seen >> 45) & 3
    assert run_case(case) == (-EINVAL, 0, 3)  # a kernel's descriptor gets DPL 3


def test_the_grant_table_frame_is_mapped_and_keeps_reserved_entries_across_versions():
    def case(g):
        buf = g.scratch
        g.cpu.write(buf, struct.pack("<IIhxxxxxxQ", DOMID_SELF, 1, 0, buf + 64))
        assert g.cpu.hypercall(Hypercall.grant_table_op, GNTTABOP_setup_table, buf, 1) == 0
        frame = g.cpu.read_u64(buf + 64)
        pfn, _ = g.alloc()
        va = g.va(pfn)
        assert g.update_va_mapping(va, (frame << 12) | RW) == 0
        reserved = struct.pack("<HHI", GTF_permit_access | GTF_reading, 0, 0x1234)
        g.cpu.write(va, reserved)
        g.cpu.write(va + 8 * 8, struct.pack("<HHI", GTF_permit_access, 0, 0x99))  # entry 8

        def set_version(v: int) -> int:
            g.cpu.write(buf, struct.pack("<I", v))
            return g.cpu.hypercall(Hypercall.grant_table_op, GNTTABOP_set_version, buf, 1)
        assert set_version(2) == 0
        v2 = struct.unpack("<HHIQ", g.cpu.read(va, 16))
        assert set_version(1) == 0
        v1 = g.cpu.read(va, 8), g.cpu.read(va + 8 * 8, 8)
        assert g.set_ro(pfn, ro=False) == 0
        return v2, v1
    v2, (entry0, entry8) = run_case(case)
    assert v2 == (GTF_permit_access, 0, 0, 0x1234)  # GTF_reading went to the status frame
    assert entry0 == struct.pack("<HHI", GTF_permit_access | GTF_reading, 0, 0x1234)
    assert entry8 == bytes(8)  # the rest is cleared


def test_a_mapped_status_frame_keeps_the_table_at_version_2():
    """gnttab_unpopulate_status_frames: -EBUSY while the guest maps one."""
    def case(g):
        buf = g.scratch

        def call(op: int, data: bytes) -> int:
            g.cpu.write(buf, data)
            return g.cpu.hypercall(Hypercall.grant_table_op, op, buf, 1)
        assert call(GNTTABOP_set_version, struct.pack("<I", 2)) == 0
        assert call(GNTTABOP_get_status_frames,
                    struct.pack("<IHhQ", 1, DOMID_SELF, 0, buf + 64)) == 0
        status_frame = g.cpu.read_u64(buf + 64)
        pfn, _ = g.alloc()
        assert g.update_va_mapping(g.va(pfn), (status_frame << 12) | RO) == 0
        busy = call(GNTTABOP_set_version, struct.pack("<I", 1))
        assert g.set_ro(pfn, ro=False) == 0  # its own page again: the status frame unmapped
        return busy, call(GNTTABOP_set_version, struct.pack("<I", 1))
    assert run_case(case) == (-EBUSY, 0)


def test_update_descriptor_writes_the_checked_descriptor():
    def case(g):
        pfn, mfn = g.alloc()
        rc = g.cpu.hypercall(Hypercall.update_descriptor, (mfn << 12) + 8, CODE64_DPL0)
        return rc, g.cpu.read_u64(g.va(pfn) + 8)
    rc, written = run_case(case)
    assert rc == 0
    assert written == CODE64_DPL0 | 3 << 45  # DPL raised to the guest kernel's ring
