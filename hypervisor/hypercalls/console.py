"""console_io (xen/drivers/char/console.c do_console_io)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, ENOSYS
from hypervisor.public.xen import CONSOLEIO_read, CONSOLEIO_write

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

CONSOLE_MAX_WRITE = 1 << 16


def do_console_io(vcpu: Vcpu, cmd: int, count: int, buf: int, *_: int) -> int:
    if cmd == CONSOLEIO_write:
        count &= 0xFFFFFFFF
        try:
            data = vcpu.copy_from_guest(buf, min(count, CONSOLE_MAX_WRITE))
        except GuestFault:
            return -EFAULT
        vcpu.domain.console_write(data)
        return 0
    if cmd == CONSOLEIO_read:
        return 0  # no input is ever queued for a domU
    return -ENOSYS
