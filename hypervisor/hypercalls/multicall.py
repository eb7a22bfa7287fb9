"""multicall (xen/common/multicall.c, arch/x86/pv/hypercall.c): a batch of
hypercalls in one trap, each entry's result written back beside it."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, EINVAL
from hypervisor.public.xen import MULTICALL_ENTRY_SIZE, Hypercall

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

# struct multicall_entry (xen.h): op, result, args[6]
_ENTRY = struct.Struct("<QQ6Q")
_RESULT_OFFSET = 8


def do_multicall(vcpu: Vcpu, call_list: int, nr_calls: int, *_: int) -> int | None:
    hv = vcpu.domain.hypervisor
    if vcpu.in_multicall:
        return -EINVAL  # "Multicall reentry is disallowed"
    vcpu.in_multicall = True
    try:
        for i in range(nr_calls & 0xFFFFFFFF):
            entry = call_list + i * MULTICALL_ENTRY_SIZE
            try:
                op, _result, *args = _ENTRY.unpack(
                    hv.copy_from_guest(vcpu, entry, MULTICALL_ENTRY_SIZE))
            except GuestFault:
                return -EFAULT
            rc = hv.hypercall(vcpu, op, args)
            if not vcpu.domain.is_running:
                return None  # the call crashed or shut the domain down
            if op == Hypercall.iret:
                return None  # iret ends the batch (XSA-213): the guest state is the frame's
            try:
                hv.copy_to_guest(vcpu, entry + _RESULT_OFFSET,
                                 ((rc or 0) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
            except GuestFault:
                return -EFAULT
    finally:
        vcpu.in_multicall = False
    return 0
