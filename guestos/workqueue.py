"""The freezable workqueue (Linux's system_freezable_wq, kernel/workqueue.c,
reduced): work items run on cpu0, from its timer tick, while freezable
workers are not frozen; the freezer stops them for a suspend and the thaw
runs what was queued meanwhile.

A work item is an exported function ``fn(cpu, now)``; ``queue_work`` marks
it pending in a table in kernel data. Running clears the mark first, so an
item that has more to do queues itself again. A native call cannot be
preempted and there is no worker thread to wake, so ``flush_work`` runs an
item at once when it may (an interrupt handler that queues work uses it).
"""

from __future__ import annotations

from collections.abc import Callable

from guestos.kdata import AREAS
from guestos.layout import Layout, Ref
from guestos.symbols import NO_SYMBOL, symbol, symbol_number
from hypervisor.public.native import NativeCpu

MAX_WORK = 8
WQ = Layout("workqueue", [("frozen", "u64")])  # the freezer stopped the workers
WORK = Layout("work_struct", [("func", "u64"), ("pending", "u64")])
assert WQ.size + MAX_WORK * WORK.size <= AREAS["workqueue"].size

WorkFunc = Callable[[NativeCpu, int], None]


def workqueue(cpu: NativeCpu) -> Ref:
    return WQ.at(cpu, AREAS["workqueue"].va(cpu))


def _work(cpu: NativeCpu, i: int) -> Ref:
    return WORK.at(cpu, AREAS["workqueue"].va(cpu) + WQ.size + i * WORK.size)


def _slot(cpu: NativeCpu, fn: WorkFunc) -> Ref:
    """The work item of ``fn``, which gets a slot the first time it is queued."""
    number = symbol_number(fn)
    free = None
    for i in range(MAX_WORK):
        w = _work(cpu, i)
        if w.func == number:
            return w
        if free is None and w.func == NO_SYMBOL:
            free = w
    if free is None:
        raise RuntimeError("no free work item")
    free.func = number
    return free


def queue_work(cpu: NativeCpu, fn: WorkFunc) -> None:
    _slot(cpu, fn).pending = 1


def workqueue_frozen(cpu: NativeCpu) -> bool:
    return bool(workqueue(cpu).frozen)


def freeze_workqueues(cpu: NativeCpu) -> None:
    workqueue(cpu).frozen = 1


def thaw_workqueues(cpu: NativeCpu) -> None:
    workqueue(cpu).frozen = 0


def flush_work(cpu: NativeCpu, fn: WorkFunc, t_now: int) -> None:
    """Run ``fn`` now if it is pending and the workers are not frozen."""
    w = _slot(cpu, fn)
    if w.pending and not workqueue_frozen(cpu):
        w.pending = 0
        fn(cpu, t_now)


def run_workqueue(cpu: NativeCpu, t_now: int) -> None:
    """From cpu0's timer tick and the thaw: the pending items, in slot order."""
    if workqueue_frozen(cpu):
        return
    for i in range(MAX_WORK):
        w = _work(cpu, i)
        if w.pending:
            w.pending = 0
            fn: WorkFunc = symbol(w.func)  # type: ignore[assignment]
            fn(cpu, t_now)
