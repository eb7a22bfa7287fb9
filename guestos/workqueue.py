"""The system workqueues (Linux's system_freezable_wq and system_wq,
kernel/workqueue.c, reduced).

A work item is an exported function ``fn(cpu, now)``; ``queue_work`` marks
it pending in a table in kernel data. Running clears the mark first, so an
item that has more to do queues itself again.

An item on the freezable queue (the default) runs on cpu0, from its timer
tick, while freezable workers are not frozen: the freezer stops them for a
suspend and the thaw runs what was queued meanwhile. A native call cannot be
preempted and there is no worker thread to wake, so ``flush_work`` runs such
an item at once when it may (an interrupt handler that queues work uses it).

An item queued with ``freezable=False`` (system_wq) runs frozen or not: on
the cpu that queued it, at the end of that cpu's next event upcall, after
the upcall's yield (as an irq thread runs: other vcpus run meanwhile, as a
kworker waits to be scheduled), or from cpu0's tick. A driver whose users
are such items must stop them itself at its freeze (``cancel_work``).
"""

from __future__ import annotations

from collections.abc import Callable

from guestos.kdata import AREAS
from guestos.layout import Layout, Ref
from guestos.symbols import NO_SYMBOL, symbol, symbol_number
from hypervisor.public.native import NativeCpu

MAX_WORK = 8
WQ = Layout("workqueue", [("frozen", "u64")])  # the freezer stopped the workers
FREEZABLE = 0                 # work_struct.on_cpu of an item on system_freezable_wq
WORK = Layout("work_struct", [
    ("func", "u64"),
    ("pending", "u64"),
    ("on_cpu", "u64"),        # FREEZABLE, or 1 + the cpu that queued it on system_wq
])
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


def queue_work(cpu: NativeCpu, fn: WorkFunc, freezable: bool = True) -> None:
    """Mark ``fn`` pending: on system_freezable_wq, or (``freezable=False``)
    on system_wq, for this cpu's kworker."""
    w = _slot(cpu, fn)
    w.pending, w.on_cpu = 1, FREEZABLE if freezable else 1 + cpu.vcpu_id


def cancel_work(cpu: NativeCpu, fn: WorkFunc) -> bool:
    """cancel_work_sync: ``fn`` no longer pending; whether it was. A native
    call runs whole, so no cpu is half way through the item: nothing to
    wait for."""
    number = symbol_number(fn)
    for i in range(MAX_WORK):
        w = _work(cpu, i)
        if w.func == number:
            was, w.pending = bool(w.pending), 0
            return was
    return False


def workqueue_frozen(cpu: NativeCpu) -> bool:
    return bool(workqueue(cpu).frozen)


def freeze_workqueues(cpu: NativeCpu) -> None:
    workqueue(cpu).frozen = 1


def thaw_workqueues(cpu: NativeCpu) -> None:
    workqueue(cpu).frozen = 0


def flush_work(cpu: NativeCpu, fn: WorkFunc, t_now: int) -> None:
    """Run ``fn`` now if it is pending on the freezable queue and the
    workers are not frozen (an item on system_wq is left to its kworker)."""
    w = _slot(cpu, fn)
    if w.pending and w.on_cpu == FREEZABLE and not workqueue_frozen(cpu):
        w.pending = 0
        fn(cpu, t_now)


def _run(cpu: NativeCpu, w: Ref, t_now: int) -> None:
    w.pending = 0
    fn: WorkFunc = symbol(w.func)  # type: ignore[assignment]
    fn(cpu, t_now)


def run_workqueue(cpu: NativeCpu, t_now: int) -> None:
    """From cpu0's timer tick and the thaw: the pending items, in slot order;
    while the workers are frozen, only those on system_wq."""
    frozen = workqueue_frozen(cpu)
    for i in range(MAX_WORK):
        w = _work(cpu, i)
        if w.pending and not (frozen and w.on_cpu == FREEZABLE):
            _run(cpu, w, t_now)


def _table(cpu: NativeCpu) -> bytes:
    return cpu.read(AREAS["workqueue"].va(cpu) + WQ.size, MAX_WORK * WORK.size)


def cpu_work_pending(cpu: NativeCpu) -> bool:
    """Whether this cpu's kworker has an item of system_wq to run (the table
    read at once: every upcall asks)."""
    table, mine = _table(cpu), 1 + cpu.vcpu_id
    pend_off, pend_s = WORK.fields["pending"]
    cpu_off, cpu_s = WORK.fields["on_cpu"]
    return any(pend_s.unpack_from(table, base + pend_off)[0]
               and cpu_s.unpack_from(table, base + cpu_off)[0] == mine
               for base in range(0, len(table), WORK.size))


def run_cpu_work(cpu: NativeCpu, t_now: int) -> None:
    """This cpu's kworker, at the end of an upcall: the items of system_wq it
    queued (each once: one that queues itself again waits for the next)."""
    mine = 1 + cpu.vcpu_id
    due = [w for w in (_work(cpu, i) for i in range(MAX_WORK))
           if w.pending and w.on_cpu == mine]
    for w in due:
        _run(cpu, w, t_now)
