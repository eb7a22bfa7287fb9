"""Portable hypercall cases for the hypercalls an unmodified guest makes at boot (set_gdt,
grant tables, sysctl and domctl from a guest).
The step format is described in tests/hypercalls/portable.py; the shared
constants are in tests/hypercalls/steps.py."""

from __future__ import annotations

CASES: dict[str, list[tuple]] = {}
