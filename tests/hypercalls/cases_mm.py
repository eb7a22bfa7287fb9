"""Portable hypercall cases for mmu_update, update_va_mapping, mmuext_op and memory_op.
The step format is described in tests/hypercalls/portable.py; the shared
constants are in tests/hypercalls/steps.py."""

from __future__ import annotations

CASES: dict[str, list[tuple]] = {}
