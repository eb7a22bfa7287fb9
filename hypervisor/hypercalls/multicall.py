"""multicall (xen/common/multicall.c, arch/x86/pv/hypercall.c): a batch of
hypercalls in one trap, each entry's result written back beside it."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, EINVAL
from hypervisor.public.xen import MULTICALL_ENTRY_SIZE, Hypercall, multicall_entry

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

_RESULT = multicall_entry.result


def do_multicall(vcpu: Vcpu, call_list: int, nr_calls: int, *_: int) -> int | None:
    if vcpu.in_multicall:
        return -EINVAL  # "Multicall reentry is disallowed"
    vcpu.in_multicall = True
    try:
        for i in range(nr_calls & 0xFFFFFFFF):
            entry = call_list + i * MULTICALL_ENTRY_SIZE
            try:
                call = multicall_entry.from_buffer_copy(
                    vcpu.copy_from_guest(entry, MULTICALL_ENTRY_SIZE))
            except GuestFault:
                return -EFAULT
            op = call.op
            rc = vcpu.exits.hypercall(vcpu, op, list(call.args))
            if not vcpu.domain.is_running:
                return None  # the call crashed or shut the domain down
            if op == Hypercall.iret:
                return None  # iret ends the batch (XSA-213): the guest state is the frame's
            try:
                vcpu.copy_to_guest(entry + _RESULT.offset,
                                   bytes(ctypes.c_uint64((rc or 0) & 0xFFFFFFFFFFFFFFFF)))
            except GuestFault:
                return -EFAULT
    finally:
        vcpu.in_multicall = False
    return 0
