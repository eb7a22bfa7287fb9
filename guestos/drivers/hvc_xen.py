"""The console as a PM device (Linux's drivers/tty/hvc/hvc_xen.c). Its ring
and port come from start_info again in the post-suspend, before anything is
printed (guestos/xencons.py), so it needs no callback; it is device 0, which
option pmfail=0:PHASE can fail."""

from __future__ import annotations

from guestos.init import device_initcall
from guestos.pm import dev_pm_ops, device_register
from guestos.symbols import export
from hypervisor.public.native import NativeCpu

xencons_pm_ops = export(dev_pm_ops("xencons"), "guestos.drivers.hvc_xen.xencons_pm_ops")


@device_initcall
def xen_cons_init(cpu: NativeCpu, cmdline: str) -> None:
    device_register(cpu, xencons_pm_ops)
