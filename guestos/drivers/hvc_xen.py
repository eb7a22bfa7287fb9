"""The console as a PM device (Linux's drivers/tty/hvc/hvc_xen.c). Its ring
and port come from start_info again in the post-suspend, before anything is
printed (guestos/xencons.py); in a new domain its restore gives the
console's irq, if a reader bound it, the new port (Linux's
xen_console_resume). It is device 0, which option pmfail=0:PHASE can fail."""

from __future__ import annotations

from guestos.init import device_initcall
from guestos.pm import dev_pm_ops, device_register
from guestos.symbols import export
from guestos.tty import xen_console_resume
from hypervisor.public.native import NativeCpu


def xencons_restore_noirq(cpu: NativeCpu, instance: int) -> int:
    xen_console_resume(cpu)
    return 0


xencons_pm_ops = export(dev_pm_ops("xencons", restore_noirq=xencons_restore_noirq),
                        "guestos.drivers.hvc_xen.xencons_pm_ops")


@device_initcall
def xen_cons_init(cpu: NativeCpu, cmdline: str) -> None:
    device_register(cpu, xencons_pm_ops)
