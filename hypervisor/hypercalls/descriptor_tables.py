"""set_gdt and update_descriptor (xen/arch/x86/pv/descriptor-tables.c):
a PV guest's GDT is up to 14 frames of its own, which hold the type
PGT_seg_desc_page while they are its GDT. Taking the type checks each
descriptor (check_descriptor), so a frame still mapped writable anywhere, or
one with a descriptor Xen refuses, is -EINVAL, and the old GDT is kept."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from hypervisor.mm.frames import PageType
from hypervisor.mm.memory import PAGE_SHIFT, PAGE_SIZE, MachineMemory
from hypervisor.mm.walker import GuestFault
from hypervisor.public.arch_x86 import FIRST_RESERVED_GDT_ENTRY, FLAT_KERNEL_CS64
from hypervisor.public.errno import EFAULT, EINVAL

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

ENTRIES_PER_FRAME = 512
_SEGMENT_TYPE = 15 << 8
_SEGMENT_S = 1 << 12
_SEGMENT_DPL = 3 << 13
_SEGMENT_P = 1 << 15
_CALL_GATE = 0xC00
GUEST_KERNEL_RPL = 3  # a 64-bit PV kernel runs in ring 3


def check_descriptor(a: int, b: int) -> tuple[int, int] | None:
    """One 8-byte descriptor (low word a, high word b) as Xen keeps it, or
    None if refused: not-present and code/data descriptors pass (DPL raised to
    the guest kernel's ring), type 0 (the upper half of a call gate) passes, a
    call gate passes with DPL 0 (so using it faults into Xen) and its target
    selector checked; any other system descriptor is refused."""
    if not b & _SEGMENT_P:
        return a, b
    dpl = max((b >> 13) & 3, GUEST_KERNEL_RPL)
    b = (b & ~_SEGMENT_DPL) | (dpl << 13)
    if b & _SEGMENT_S:
        return a, b
    if b & _SEGMENT_TYPE == 0:
        return a, b
    if b & _SEGMENT_TYPE != _CALL_GATE:
        return None
    cs = a >> 16
    # guest_gate_selector_okay: a guest GDT selector, Xen's flat kernel CS, or the LDT
    if not (cs >> 3 < FIRST_RESERVED_GDT_ENTRY or cs == FLAT_KERNEL_CS64 or cs & 4):
        return None
    b &= ~_SEGMENT_DPL
    a = (a & 0xFFFF) | (((cs & ~3) | dpl) << 16)
    if b & 0xFF:
        return None  # reserved bits
    return a, b


def segdesc_validator(memory: MachineMemory) -> Callable[[int, int], int]:
    """validate_segdesc_page, for PageTypes.validators: every descriptor of the
    frame checked and kept as check_descriptor leaves it; 0 or -EINVAL."""
    def validate(mfn: int, domid: int) -> int:
        words = memory.frame(mfn)
        for i in range(ENTRIES_PER_FRAME):
            raw = int(words[i])
            checked = check_descriptor(raw & 0xFFFFFFFF, raw >> 32)
            if checked is None:
                return -EINVAL
            words[i] = checked[0] | (checked[1] << 32)
        return 0
    return validate


def do_set_gdt(vcpu: Vcpu, frame_list: int, entries: int, *_: int) -> int:
    entries &= 0xFFFFFFFF
    if entries > FIRST_RESERVED_GDT_ENTRY:
        return -EINVAL
    nr_frames = -(-entries // ENTRIES_PER_FRAME)
    if nr_frames == 0:
        return pv_set_gdt(vcpu, [], 0)  # nothing to read: copy_from_guest of 0 bytes
    try:
        frames = list(struct.unpack(f"<{nr_frames}Q",
                                    vcpu.copy_from_guest(frame_list, 8 * nr_frames)))
    except GuestFault:
        return -EFAULT
    return pv_set_gdt(vcpu, frames, entries)


def pv_set_gdt(vcpu: Vcpu, frames: list[int], entries: int) -> int:
    """Type every new frame before letting go of the old GDT, as pv_set_gdt."""
    types, domid = vcpu.machine.types, vcpu.domain.domid
    for i, mfn in enumerate(frames):
        if types.get_page_and_type(mfn, PageType.seg_desc, domid):
            for taken in frames[:i]:
                types.put_page_and_type(taken)
            return -EINVAL
    pv_destroy_gdt(vcpu)
    vcpu.gdt_frames, vcpu.gdt_ents = frames, entries
    return 0


def pv_destroy_gdt(vcpu: Vcpu) -> None:
    for mfn in vcpu.gdt_frames:
        vcpu.machine.types.put_page_and_type(mfn)
    vcpu.gdt_frames, vcpu.gdt_ents = [], 0


def do_update_descriptor(vcpu: Vcpu, pa: int, desc: int, *_: int) -> int:
    """One descriptor written at machine address ``pa`` of a frame the guest
    owns, checked first (check_descriptor); a frame in use as a GDT or LDT
    takes it in place, any other must be able to take a writable reference
    (so a pagetable in use is refused): -EINVAL for any failure."""
    checked = check_descriptor(desc & 0xFFFFFFFF, desc >> 32)
    if pa % 8 or checked is None:
        return -EINVAL
    types, domid, mfn = vcpu.machine.types, vcpu.domain.domid, pa >> PAGE_SHIFT
    if not types.get_page(mfn, domid):
        return -EINVAL
    in_use = PageType(int(types.frames.type[mfn]))
    ptype = PageType.seg_desc if in_use == PageType.seg_desc else PageType.writable
    rc = types.get_page_type(mfn, ptype, domid)
    if rc == 0:
        vcpu.machine.memory.frame(mfn)[(pa & (PAGE_SIZE - 1)) // 8] = checked[0] | checked[1] << 32
        vcpu.machine.paging.mark_dirty(mfn)  # do_update_descriptor
        types.put_page_type(mfn)
    types.put_page(mfn)
    return -EINVAL if rc else 0
