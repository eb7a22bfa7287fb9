"""Looking into a running guest kernel from a test: an object that reads guest
memory through the kernel's own mapping, shaped like the ``cpu`` the kernel's
functions take, so that the kernel's own accessors (task table, pgd_list, page
flags) read its state for the test."""

from __future__ import annotations

from typing import Any


class KernelView:
    def __init__(self, hv: Any, dom: Any, vcpu_id: int = 0) -> None:
        self._walker = hv.walker
        self._table = dom.vcpus[0].guest_table  # the kernel's L4
        self.vcpu_id = vcpu_id

    def read(self, va: int, size: int) -> bytes:
        return self._walker.read(self._table, va, size)

    def read_u64(self, va: int) -> int:
        return self._walker.read_u64(self._table, va)

    def write(self, va: int, data: bytes) -> None:
        raise AssertionError("a test only looks")

    write_u64 = write


def tasks(view: KernelView) -> list[dict[str, int]]:
    from guestos.kdata import MAX_TASKS
    from guestos.task import FREE, task
    out = []
    for s in range(MAX_TASKS):
        t = task(view, s)
        if t.state != FREE:
            out.append({"pid": t.pid, "state": t.state, "cpu": t.cpu, "pgd": t.pgd})
    return out


def pgds(view: KernelView) -> dict[int, bool]:
    """pgd pfn -> pinned, for every pgd on the kernel's pgd_list."""
    from guestos.pgd import pgd_list, pgd_pinned
    return {p: pgd_pinned(view, p) for p in pgd_list(view)}
