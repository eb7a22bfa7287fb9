"""console_io (xen/drivers/char/console.c do_console_io).

Which domain may use it is the XSM policy's choice (include/xsm/dummy.h
xsm_console_io), made before the command is looked at. A release build lets
only the console domain in; a debug build (CONFIG_VERBOSE_DEBUG, on with
CONFIG_DEBUG) also lets any domain write. pvlab models the debug build here:
its guests print with console_io write, as the Xen Test Framework's do. So a
domU that is not the console domain (none is, in pvlab) may write, and gets
-EPERM for a read or any other command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, EPERM
from hypervisor.public.xen import CONSOLEIO_write

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

CONSOLE_MAX_WRITE = 1 << 16


def do_console_io(vcpu: Vcpu, cmd: int, count: int, buf: int, *_: int) -> int:
    if cmd != CONSOLEIO_write:
        return -EPERM  # xsm_console_io: XSM_PRIV for a domU
    count &= 0xFFFFFFFF
    try:
        data = vcpu.copy_from_guest(buf, min(count, CONSOLE_MAX_WRITE))
    except GuestFault:
        return -EFAULT
    vcpu.domain.console_write(data)
    return 0
