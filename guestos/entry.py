"""The native entry table: the order here *is* the ABI with the image (entry i
is at native_text + 16 * i, entry 0 is the boot entry) and with saved images
(a sleeping VCPU's rip is an entry's address), so entries are only ever
appended. Code that guest memory points at otherwise is named by symbol
(guestos/symbols.py)."""

from __future__ import annotations

from collections.abc import Callable

from guestos import boot, manage, stop_machine, suspend, syscalls, traps, upcall
from guestos.idle import cpu_idle


def native_entries() -> list[Callable[..., object]]:
    return [
        boot.start_kernel,          # 0: ENTRY
        boot.secondary_start,
        cpu_idle,
        upcall.hypervisor_callback,
        upcall.failsafe_callback,
        syscalls.syscall_entry,
        traps.divide_error,
        traps.breakpoint,
        traps.invalid_op,
        traps.general_protection,
        traps.page_fault,
        stop_machine.multi_cpu_stop,
        manage.suspend_freeze_wait,
        suspend.xen_suspend_resumed,
        upcall.irq_thread_resume,
    ]
