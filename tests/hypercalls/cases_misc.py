"""Portable hypercall cases for event channels, sched_op, vcpu_op, callbacks, traps,
xen_version, console_io and vm_assist.
The step format is described in tests/hypercalls/portable.py; the shared
constants are in tests/hypercalls/steps.py."""

from __future__ import annotations

CASES: dict[str, list[tuple]] = {}
