"""The MMU hypercalls: mmu_update, update_va_mapping and mmuext_op
(xen/arch/x86/mm.c do_mmu_update, __do_update_va_mapping, do_mmuext_op).

Each takes many operations in one call, stops at the first that fails, reports
how many were done through ``pdone``, and returns 0 or the failing op's errno.
Every change to a pagetable flushes the TLBs that could hold a stale entry: the
Unicorn TLB of each VCPU of the domain and the shared software walker's.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor.mm.frames import PageType
from hypervisor.mm.pagetable import LEVEL_TYPE, is_guest_l4_slot
from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS, EPERM, ESRCH
from hypervisor.public.xen import (
    DOMID_SELF,
    MMU_MACHPHYS_UPDATE,
    MMU_NORMAL_PT_UPDATE,
    MMUEXT_INVLPG_ALL,
    MMUEXT_INVLPG_LOCAL,
    MMUEXT_INVLPG_MULTI,
    MMUEXT_NEW_BASEPTR,
    MMUEXT_NEW_USER_BASEPTR,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L4_TABLE,
    MMUEXT_TLB_FLUSH_ALL,
    MMUEXT_TLB_FLUSH_LOCAL,
    MMUEXT_TLB_FLUSH_MULTI,
    MMUEXT_UNPIN_TABLE,
)

if TYPE_CHECKING:
    from hypervisor.core import Hypervisor
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.domain import Domain

_TLB_OPS = {MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_TLB_FLUSH_MULTI, MMUEXT_TLB_FLUSH_ALL,
            MMUEXT_INVLPG_LOCAL, MMUEXT_INVLPG_MULTI, MMUEXT_INVLPG_ALL}


class Mmu:
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor
        self.types = hypervisor.machine.types
        self.frames = hypervisor.machine.frames
        self.memory = hypervisor.machine.memory

    # --- helpers -------------------------------------------------------------------

    def _foreign_ok(self, vcpu: Vcpu, foreigndom: int) -> int:
        fd = foreigndom & 0xFFFF
        if fd != DOMID_SELF or foreigndom >> 16:
            return -ESRCH  # no foreign (or explicitly named own) domains for PV guests here
        return 0

    def table_level(self, mfn: int) -> int:
        """The level of a validated pagetable frame, or 0."""
        ft = self.frames
        t = int(ft.type[mfn])
        if 1 <= t <= 4 and ft.validated[mfn] and ft.type_count[mfn] > 0:
            return t
        return 0

    def mod_entry(self, dom: Domain, table_mfn: int, slot: int, new: int) -> int:
        """Replace one entry of a validated table: take the new entry's
        references, write it, then drop the old one's (Xen's mod_lN_entry)."""
        level = self.table_level(table_mfn)
        if level == 4 and not is_guest_l4_slot(slot):
            return -EINVAL  # "L4 update in Xen-private area"
        table = self.memory.frame(table_mfn)
        old = int(table[slot])
        rc = self.types.get_entry(level, new, dom.domid, table_mfn)
        if rc:
            return rc
        table[slot] = new
        self.types.put_entry(level, old)
        return 0

    def normal_update(self, dom: Domain, maddr: int, val: int) -> int:
        mfn = maddr >> 12
        ft = self.frames
        if not 0 < mfn < ft.nr_frames or ft.owner[mfn] != dom.domid:
            return -EINVAL  # "Could not get page for normal update"
        slot = (maddr & 0xFFF) >> 3
        if self.table_level(mfn):
            return self.mod_entry(dom, mfn, slot, val)
        # not a pagetable: Xen takes a writable type ref and just writes
        if self.types.get_page_type(mfn, PageType.writable, dom.domid):
            return -EINVAL
        self.memory.frame(mfn)[slot] = val
        self.types.put_page_type(mfn)
        return 0

    # --- hypercalls ----------------------------------------------------------------

    def mmu_update(self, vcpu: Vcpu, reqs: int, count: int, pdone: int, foreigndom: int) -> int:
        dom = vcpu.domain
        count &= 0x7FFFFFFF  # MMU_UPDATE_PREEMPTED is our own continuation flag
        rc = self._foreign_ok(vcpu, foreigndom)
        done = 0
        if rc == 0:
            for i in range(count):
                try:
                    raw = self.hv.copy_from_guest(vcpu, reqs + 16 * i, 16)
                    ptr, val = struct.unpack("<QQ", raw)
                except GuestFault:
                    rc = -EFAULT
                    break
                cmd = ptr & 3
                if cmd == MMU_NORMAL_PT_UPDATE:
                    rc = self.normal_update(dom, ptr & ~3, val)
                elif cmd == MMU_MACHPHYS_UPDATE:
                    mfn = ptr >> 12
                    if not 0 < mfn < self.frames.nr_frames or self.frames.owner[mfn] != dom.domid:
                        rc = -EINVAL
                    else:
                        self.hv.machine.set_m2p(mfn, val)
                else:
                    rc = -ENOSYS
                if rc:
                    break
                done += 1
        self.hv.flush_tlbs(dom)
        return self._report(vcpu, pdone, done, rc)

    def update_va_mapping(self, vcpu: Vcpu, va: int, val: int, flags: int) -> int:
        dom = vcpu.domain
        maddr = self.hv.walker.l1e_maddr(vcpu.guest_table, va)
        if maddr is None:
            return -EINVAL
        l1 = maddr >> 12
        if self.frames.owner[l1] != dom.domid or self.table_level(l1) != 1:
            return -EINVAL
        rc = self.mod_entry(dom, l1, (maddr & 0xFFF) >> 3, val)
        if rc == 0:
            self.hv.flush_tlbs(dom)
        return rc

    def mmuext_op(self, vcpu: Vcpu, ops: int, count: int, pdone: int, foreigndom: int) -> int:
        dom = vcpu.domain
        count &= 0x7FFFFFFF
        rc = self._foreign_ok(vcpu, foreigndom)
        done = 0
        if rc == 0:
            for i in range(count):
                try:
                    cmd, _pad, arg1, _arg2 = struct.unpack(
                        "<IIQQ", self.hv.copy_from_guest(vcpu, ops + 24 * i, 24))
                except GuestFault:
                    rc = -EFAULT
                    break
                rc = self._one_op(vcpu, dom, cmd, arg1)
                if rc:
                    break
                done += 1
        self.hv.flush_tlbs(dom)
        return self._report(vcpu, pdone, done, rc)

    def _one_op(self, vcpu: Vcpu, dom: Domain, cmd: int, mfn: int) -> int:
        ft = self.frames
        types = self.types
        owned = 0 < mfn < ft.nr_frames and ft.owner[mfn] == dom.domid
        if MMUEXT_PIN_L1_TABLE <= cmd <= MMUEXT_PIN_L4_TABLE:
            if not owned:
                return -EINVAL
            if ft.pinned[mfn]:
                return -EINVAL  # "mfn already pinned"
            rc = types.get_page_and_type(mfn, LEVEL_TYPE[cmd - MMUEXT_PIN_L1_TABLE + 1], dom.domid)
            if rc:
                return rc
            ft.pinned[mfn] = True
            return 0
        if cmd == MMUEXT_UNPIN_TABLE:
            if not owned or not ft.pinned[mfn]:
                return -EINVAL  # "mfn bad, or bad owner" / "mfn not pinned"
            ft.pinned[mfn] = False
            types.put_page_and_type(mfn)
            return 0
        if cmd == MMUEXT_NEW_BASEPTR:
            if not owned:
                return -EINVAL
            rc = types.get_page_and_type(mfn, PageType.l4, dom.domid)
            if rc:
                return rc
            old, vcpu.guest_table = vcpu.guest_table, mfn
            if vcpu.in_kernel:
                vcpu.load_cr3(mfn)
            if old:
                types.put_page_and_type(old)
            return 0
        if cmd == MMUEXT_NEW_USER_BASEPTR:
            if mfn:
                if not owned:
                    return -EINVAL
                rc = types.get_page_and_type(mfn, PageType.l4, dom.domid)
                if rc:
                    return rc
            old, vcpu.guest_table_user = vcpu.guest_table_user, mfn
            if not vcpu.in_kernel:
                vcpu.load_cr3(mfn)
            if old:
                types.put_page_and_type(old)
            return 0
        if cmd in _TLB_OPS:
            return 0  # the flush after the batch covers it
        return -ENOSYS

    def _report(self, vcpu: Vcpu, pdone: int, done: int, rc: int) -> int:
        if pdone:
            try:
                self.hv.copy_to_guest(vcpu, pdone, struct.pack("<I", done))
            except GuestFault:
                return -EFAULT
        return rc


__all__ = ["Mmu", "EPERM"]
