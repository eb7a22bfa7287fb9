"""The native entry table: the order here *is* the ABI with the image (entry i
is at native_text + 16 * i, entry 0 is the boot entry) and with saved images,
so entries are only ever appended."""

from __future__ import annotations

from collections.abc import Callable


def native_entries() -> list[Callable[..., object]]:
    from guestos import boot, events, manage, stop_machine, suspend, syscalls, traps
    return [
        boot.start_kernel,          # 0: ENTRY
        boot.secondary_start,
        boot.cpu_idle,
        events.hypervisor_callback,
        events.failsafe_callback,
        syscalls.syscall_entry,
        traps.divide_error,
        traps.breakpoint,
        traps.invalid_op,
        traps.general_protection,
        traps.page_fault,
        stop_machine.multi_cpu_stop,
        manage.suspend_freeze_wait,
        suspend.xen_suspend_resumed,
    ]
