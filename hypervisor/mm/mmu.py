"""The MMU hypercalls: mmu_update, update_va_mapping and mmuext_op
(xen/arch/x86/pv/mm.c and mm.c: do_mmu_update, __do_update_va_mapping,
do_mmuext_op).

Each takes many operations in one call, stops at the first that fails, reports
how many were done through ``pdone``, and returns 0 or the failing op's errno.
Every change to a pagetable flushes the TLBs that could hold a stale entry: the
Unicorn TLB of each VCPU of the domain and the shared software walker's.

Foreign domains: a PV domU may name only itself. ``DOMID_SELF`` is the way;
its own numeric id is "Cannot specify itself as foreign domain" (-ESRCH); an
unknown domain is -ESRCH; an existing other domain (or DOMID_IO / DOMID_XEN) is
refused by XSM's default policy (-EPERM), or for mmuext_op, if it is not a PV
guest at all, -EINVAL.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hypervisor.mm.frames import PageType
from hypervisor.mm.pagetable import LEVEL_TYPE, adjust_guest_entry, is_guest_l4_slot
from hypervisor.mm.walker import GuestFault, addr_ok
from hypervisor.public.arch_x86 import _PAGE_ACCESSED, _PAGE_DIRTY
from hypervisor.public.errno import EACCES, EFAULT, EINVAL, ENOSYS, EOPNOTSUPP, EPERM, ESRCH
from hypervisor.public.xen import (
    DOMID_IO,
    DOMID_SELF,
    DOMID_XEN,
    MMU_MACHPHYS_UPDATE,
    MMU_NORMAL_PT_UPDATE,
    MMU_PT_UPDATE_NO_TRANSLATE,
    MMU_PT_UPDATE_PRESERVE_AD,
    MMU_UPDATE_PREEMPTED,
    MMUEXT_CLEAR_PAGE,
    MMUEXT_COPY_PAGE,
    MMUEXT_FLUSH_CACHE,
    MMUEXT_FLUSH_CACHE_GLOBAL,
    MMUEXT_INVLPG_ALL,
    MMUEXT_INVLPG_LOCAL,
    MMUEXT_INVLPG_MULTI,
    MMUEXT_MARK_SUPER,
    MMUEXT_NEW_BASEPTR,
    MMUEXT_NEW_USER_BASEPTR,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L4_TABLE,
    MMUEXT_SET_LDT,
    MMUEXT_TLB_FLUSH_ALL,
    MMUEXT_TLB_FLUSH_LOCAL,
    MMUEXT_TLB_FLUSH_MULTI,
    MMUEXT_UNMARK_SUPER,
    MMUEXT_UNPIN_TABLE,
    UVMF_ALL,
    UVMF_FLUSHTYPE_MASK,
    UVMF_INVLPG,
    UVMF_LOCAL,
    UVMF_TLB_FLUSH,
    mmu_update,
    mmuext_op,
)

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.domain import Domain
    from hypervisor.machine import Machine

_MULTI_OPS = (MMUEXT_TLB_FLUSH_MULTI, MMUEXT_INVLPG_MULTI)
_AD_BITS = _PAGE_ACCESSED | _PAGE_DIRTY
LDT_MAX_ENTS = 8192
FOREIGN = object()  # a page owner that is not the caller (refused by XSM)
_MMU_UPDATE_SIZE = ctypes.sizeof(mmu_update)
_MMUEXT_OP_SIZE = ctypes.sizeof(mmuext_op)


class Mmu:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.types = machine.types
        self.frames = machine.frames
        self.memory = machine.memory
        self.paging = machine.paging

    # --- helpers -------------------------------------------------------------------

    def get_pg_owner(self, vcpu: Vcpu, domid: int) -> Domain | object | None:
        """Xen's get_pg_owner: the caller, a foreign owner, or None (-ESRCH)."""
        if domid == DOMID_SELF:
            return vcpu.domain
        if domid == vcpu.domain.domid:
            return None  # "Cannot specify itself as foreign domain"
        if domid in (DOMID_IO, DOMID_XEN) or vcpu.domain.domain_by_id(domid) is not None:
            return FOREIGN
        return None  # "Unknown domain"

    def table_level(self, mfn: int) -> int:
        """The level of a validated, in-use pagetable frame, or 0."""
        ft = self.frames
        t = int(ft.type[mfn])
        if 1 <= t <= 4 and ft.validated[mfn] and ft.type_count[mfn] > 0:
            return t
        return 0

    def owned(self, mfn: int, dom: Domain) -> bool:
        return 0 < mfn < self.frames.nr_frames and self.frames.owner[mfn] == dom.domid

    def mod_entry(self, dom: Domain, table_mfn: int, slot: int, new: int) -> int:
        """Replace one entry of a validated table: take the new entry's
        references, write it, then drop the old one's (Xen's mod_lN_entry)."""
        level = self.table_level(table_mfn)
        if level == 4 and not is_guest_l4_slot(slot):
            return -EINVAL  # "L4 update in Xen-private area"
        table = self.memory.frame(table_mfn)
        old = int(table[slot])
        new = adjust_guest_entry(level, new)
        rc = self.types.get_entry(level, new, dom.domid, table_mfn)
        if rc:
            return rc
        table[slot] = new
        # a write to a guest pagetable dirties it (sh_validate_guest_entry);
        # an L1's old entry may carry the D bit of a store through it
        self.paging.mark_dirty(table_mfn)
        if level == 1:
            self.paging.l1_entry_written(table_mfn, slot, old, dom.domid)
        self.types.put_entry(level, old, table_mfn)
        return 0

    def normal_update(self, dom: Domain, maddr: int, val: int, preserve_ad: bool) -> int:
        mfn = maddr >> 12
        if not self.owned(mfn, dom):
            return -EINVAL  # "Could not get page for normal update"
        slot = (maddr & 0xFFF) >> 3
        if preserve_ad:
            old = self.paging.guest_entry(mfn, slot, int(self.memory.frame(mfn)[slot]))
            val |= old & _AD_BITS
        if self.table_level(mfn):
            return self.mod_entry(dom, mfn, slot, val)
        # not a pagetable in use: Xen takes a writable type ref and just writes
        if self.types.get_page_type(mfn, PageType.writable, dom.domid):
            return -EINVAL
        self.memory.frame(mfn)[slot] = val
        self.paging.mark_dirty(mfn)
        self.types.put_page_type(mfn)
        return 0

    def _vcpumask_ok(self, vcpu: Vcpu, ptr: int) -> bool:
        """A vcpu bitmap (UVMF_MULTI / *_MULTI ops) must be readable."""
        try:
            vcpu.copy_from_guest(ptr, 8)
        except GuestFault:
            return False
        return True

    @staticmethod
    def _final_result(count: int, reqs: int, foreigndom: int) -> int | None:
        """A continuation made only to carry a final result passes a NULL list,
        MMU_UPDATE_PREEMPTED as its count and the result as foreigndom (Xen's
        do_mmu_update / do_mmuext_op after an old_guest_table put)."""
        if count == MMU_UPDATE_PREEMPTED and not reqs:
            return ctypes.c_int32(foreigndom & 0xFFFFFFFF).value
        return None

    def _resume(self, vcpu: Vcpu, count: int, pdone: int) -> tuple[int, int]:
        """A call re-issued as a continuation carries MMU_UPDATE_PREEMPTED in
        its count and its progress so far in *pdone (Xen's convention)."""
        done = 0
        if count & MMU_UPDATE_PREEMPTED:
            count &= ~MMU_UPDATE_PREEMPTED
            if pdone:
                try:
                    done = ctypes.c_uint32.from_buffer_copy(vcpu.copy_from_guest(pdone, 4)).value
                except GuestFault:
                    done = 0
        return count, done

    def _report(self, vcpu: Vcpu, pdone: int, done: int, rc: int) -> int:
        if pdone:
            try:
                vcpu.copy_to_guest(pdone, bytes(ctypes.c_uint32(done)))
            except GuestFault:
                pass  # as in Xen, a bad pdone does not change the result
        return rc

    # --- mmu_update ----------------------------------------------------------------

    def mmu_update(self, vcpu: Vcpu, reqs: int, count: int, pdone: int, foreigndom: int,
                   *_: int) -> int:
        dom = vcpu.domain
        count &= 0xFFFFFFFF
        final = self._final_result(count, reqs, foreigndom)
        if final is not None:
            return final
        count, done = self._resume(vcpu, count, pdone)
        if not addr_ok(reqs):
            return -EFAULT  # guest_handle_okay, before the owners are looked at
        pt_dom = (foreigndom >> 16) & 0xFFFF
        pt_foreign = False
        if pt_dom:
            pt_owner = dom.domain_by_id(pt_dom - 1)
            if pt_owner is None:
                return -ESRCH
            pt_foreign = pt_owner is not dom
        pg_owner = self.get_pg_owner(vcpu, foreigndom & 0xFFFF)
        if pg_owner is None:
            return self._report(vcpu, pdone, done, -ESRCH)
        rc = 0
        i = 0
        for i in range(count):
            try:
                req = mmu_update.from_buffer_copy(
                    vcpu.copy_from_guest(reqs + _MMU_UPDATE_SIZE * i, _MMU_UPDATE_SIZE))
            except GuestFault:
                rc = -EFAULT
                break
            rc = self._one_update(dom, req.ptr, req.val, pt_foreign or pg_owner is FOREIGN)
            if rc:
                break
        else:
            i = count
        if count:
            dom.flush_tlbs()
        return self._report(vcpu, pdone, done + i, rc)

    def _one_update(self, dom: Domain, ptr: int, val: int, foreign: bool) -> int:
        """One request; its command is ptr & (sizeof(l1_pgentry_t) - 1), so
        4..7 are unknown (-ENOSYS)."""
        cmd = ptr & 7
        if cmd in (MMU_NORMAL_PT_UPDATE, MMU_PT_UPDATE_PRESERVE_AD,
                   MMU_PT_UPDATE_NO_TRANSLATE):
            if foreign:
                return -EPERM  # xsm_mmu_update: a domU acts on itself only
            return self.normal_update(dom, ptr - cmd, val, cmd == MMU_PT_UPDATE_PRESERVE_AD)
        if cmd == MMU_MACHPHYS_UPDATE:
            mfn = ptr >> 12
            if foreign:
                return -EPERM
            if not self.owned(mfn, dom):
                return -EINVAL  # "Could not get page for mach->phys update"
            self.machine.set_m2p(mfn, val)
            self.paging.mark_pfn_dirty(dom.domid, val)
            return 0
        return -ENOSYS

    # --- update_va_mapping -----------------------------------------------------------

    def update_va_mapping(self, vcpu: Vcpu, va: int, val: int, flags: int, *_: int) -> int:
        dom = vcpu.domain
        maddr = self.machine.walker.l1e_maddr(vcpu.guest_table, va)
        if maddr is None:
            return -EINVAL  # no L1 maps va
        l1 = maddr >> 12
        if not self.owned(l1, dom) or self.table_level(l1) != 1:
            return -EINVAL
        rc = self.mod_entry(dom, l1, (maddr & 0xFFF) >> 3, val)
        if rc:
            return rc
        # only UVMF_TLB_FLUSH and UVMF_INVLPG read a vcpu bitmap; type 3
        # matches no case of __do_update_va_mapping's switch
        target = flags & ~UVMF_FLUSHTYPE_MASK
        if flags & UVMF_FLUSHTYPE_MASK in (UVMF_TLB_FLUSH, UVMF_INVLPG) \
                and target not in (UVMF_LOCAL, UVMF_ALL) and not self._vcpumask_ok(vcpu, target):
            return -EFAULT
        dom.flush_tlbs()
        return 0

    def update_va_mapping_otherdomain(self, vcpu: Vcpu, va: int, val: int, flags: int,
                                      domid: int, *_: int) -> int:
        """As update_va_mapping, with the page owner named (Xen's
        do_update_va_mapping_otherdomain): get_pg_owner, then XSM, which lets
        a domU name only itself."""
        pg_owner = self.get_pg_owner(vcpu, domid & 0xFFFF)
        if pg_owner is None:
            return -ESRCH
        if pg_owner is FOREIGN:
            return -EPERM  # xsm_update_va_mapping (XSM_TARGET)
        return self.update_va_mapping(vcpu, va, val, flags)

    # --- mmuext_op -----------------------------------------------------------------

    def mmuext_op(self, vcpu: Vcpu, ops: int, count: int, pdone: int, foreigndom: int,
                  *_: int) -> int:
        dom = vcpu.domain
        count &= 0xFFFFFFFF
        final = self._final_result(count, ops, foreigndom)
        if final is not None:
            return final
        count, done = self._resume(vcpu, count, pdone)
        if not addr_ok(ops):
            return -EFAULT  # guest_handle_okay, before the owner is looked at
        pg_owner = self.get_pg_owner(vcpu, foreigndom & 0xFFFF)
        if pg_owner is None:
            return -ESRCH
        if pg_owner is FOREIGN:
            # DOMID_IO / DOMID_XEN are not PV guests; another domain is refused by XSM
            return -EINVAL if foreigndom & 0xFFFF in (DOMID_IO, DOMID_XEN) else -EPERM
        rc = 0
        i = 0
        for i in range(count):
            try:
                op = mmuext_op.from_buffer_copy(
                    vcpu.copy_from_guest(ops + _MMUEXT_OP_SIZE * i, _MMUEXT_OP_SIZE))
            except GuestFault:
                rc = -EFAULT
                break
            rc = self._one_op(vcpu, dom, op.cmd, op.arg1.mfn, op.arg2.src_mfn)
            if rc:
                break
        else:
            i = count
        if count:
            dom.flush_tlbs()
        return self._report(vcpu, pdone, done + i, rc)

    def _one_op(self, vcpu: Vcpu, dom: Domain, cmd: int, arg1: int, arg2: int) -> int:
        """One mmuext_op (Xen's do_mmuext_op switch): 0 or a negative errno."""
        mfn = arg1
        if MMUEXT_PIN_L1_TABLE <= cmd <= MMUEXT_PIN_L4_TABLE:
            return self._pin(dom, mfn, LEVEL_TYPE[cmd - MMUEXT_PIN_L1_TABLE + 1])
        if cmd == MMUEXT_UNPIN_TABLE:
            return self._unpin(dom, mfn)
        if cmd == MMUEXT_NEW_BASEPTR:
            return self._new_baseptr(vcpu, dom, mfn)
        if cmd == MMUEXT_NEW_USER_BASEPTR:
            return self._new_user_baseptr(vcpu, dom, mfn)
        if cmd in (MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_INVLPG_LOCAL, MMUEXT_TLB_FLUSH_ALL,
                   MMUEXT_INVLPG_ALL):
            return 0  # the flush after the batch covers it
        if cmd in _MULTI_OPS:
            return 0 if self._vcpumask_ok(vcpu, arg2) else -EINVAL
        if cmd == MMUEXT_FLUSH_CACHE:
            return -EACCES  # a domU has no cache-flush permission
        if cmd == MMUEXT_FLUSH_CACHE_GLOBAL:
            return -EINVAL
        if cmd == MMUEXT_SET_LDT:
            return self._set_ldt(vcpu, arg1, arg2 & 0xFFFFFFFF)
        if cmd == MMUEXT_CLEAR_PAGE:
            return self._with_writable(dom, mfn, lambda: self.memory.clear_frame(mfn))
        if cmd == MMUEXT_COPY_PAGE:
            src = arg2
            if not self.owned(src, dom):
                return -EINVAL  # "Error copying from mfn"
            return self._with_writable(
                dom, mfn, lambda: self.memory.frame(mfn).__setitem__(
                    slice(None), self.memory.frame(src)))
        if cmd in (MMUEXT_MARK_SUPER, MMUEXT_UNMARK_SUPER):
            return -EOPNOTSUPP
        return -ENOSYS

    def _pin(self, dom: Domain, mfn: int, ptype: PageType) -> int:
        """MMUEXT_PIN_Ln_TABLE: a type reference the guest holds until it unpins."""
        ft, types = self.frames, self.types
        if not (0 < mfn < ft.nr_frames and types.get_page(mfn, dom.domid)):
            return -EINVAL  # not the owner's frame
        rc = types.get_page_type(mfn, ptype, dom.domid)
        if rc:
            types.put_page(mfn)
            return rc
        if ft.pinned[mfn]:
            types.put_page_and_type(mfn)
            return -EINVAL  # "mfn already pinned"
        ft.pinned[mfn] = True
        self.paging.mark_dirty(mfn)  # a page is dirtied when its pin status is set
        return 0

    def _unpin(self, dom: Domain, mfn: int) -> int:
        ft = self.frames
        if not self.owned(mfn, dom):
            return -EINVAL  # "mfn bad, or bad owner"
        if not ft.pinned[mfn]:
            return -EINVAL  # "mfn not pinned"
        ft.pinned[mfn] = False
        self.types.put_page_and_type(mfn)
        self.paging.mark_dirty(mfn)  # ... and when it is cleared
        return 0

    def _new_baseptr(self, vcpu: Vcpu, dom: Domain, mfn: int) -> int:
        """MMUEXT_NEW_BASEPTR: the kernel's L4, with a type reference on it."""
        if mfn == vcpu.guest_table:
            return 0
        if not self.owned(mfn, dom):
            return -EINVAL
        rc = self.types.get_page_and_type(mfn, PageType.l4, dom.domid)
        if rc:
            return rc
        old, vcpu.guest_table = vcpu.guest_table, mfn
        if vcpu.in_kernel:
            vcpu.load_cr3(mfn)
        if old:
            self.types.put_page_and_type(old)
        return 0

    def _new_user_baseptr(self, vcpu: Vcpu, dom: Domain, mfn: int) -> int:
        """MMUEXT_NEW_USER_BASEPTR: the user L4 (0 for none)."""
        if mfn == vcpu.guest_table_user:
            return 0
        if mfn:
            if not self.owned(mfn, dom):
                return -EINVAL
            rc = self.types.get_page_and_type(mfn, PageType.l4, dom.domid)
            if rc:
                return rc
        old, vcpu.guest_table_user = vcpu.guest_table_user, mfn
        if not vcpu.in_kernel:
            vcpu.load_cr3(mfn)
        if old:
            self.types.put_page_and_type(old)
        return 0

    def _set_ldt(self, vcpu: Vcpu, ptr: int, ents: int) -> int:
        ptr = ptr if ents else 0
        if ents > LDT_MAX_ENTS or (ents and (ptr & 0xFFF or not addr_ok(ptr))):
            return -EINVAL  # "Bad args to SET_LDT"
        vcpu.ldt_base, vcpu.ldt_ents = ptr, ents
        return 0

    def _with_writable(self, dom: Domain, mfn: int, action) -> int:
        """Do ``action`` on a frame that can be a writable page right now: never
        a pagetable (so CLEAR_PAGE and COPY_PAGE cannot forge one)."""
        if not self.owned(mfn, dom):
            return -EINVAL
        types = self.types
        types.get_page(mfn, dom.domid)
        if types.get_page_type(mfn, PageType.writable, dom.domid):
            types.put_page(mfn)
            return -EINVAL
        action()
        self.paging.mark_dirty(mfn)
        types.put_page_and_type(mfn)
        return 0


