"""stop_machine, as Linux's kernel/stop_machine.c has it (multi_cpu_stop).

``stop_machine(cpu, fn, then)`` brings every online cpu into a spin
loop that steps through the states PREPARE, DISABLE_IRQ, RUN, EXIT together:
a state advances only when every cpu has acknowledged it. In DISABLE_IRQ each
cpu masks its events; in RUN the chosen cpu runs ``fn`` while the others spin,
masked, and they are released (EXIT) only after ``fn`` is done. Then every cpu
restores its event mask and goes back to its tasks; the cpu that asked goes
on with ``then``.

Here a cpu enters the loop from the event upcall: the asking cpu sends an IPI
to every other cpu, and the upcall's way out (guestos/upcall.py) sees a
stop_machine under way, saves the interrupted task and comes here instead. The
spin is a yield with this function as its continuation (every wait in the
kernel is one), so a cpu spinning here can be saved and restored like any
other.

``fn`` and ``then`` are exported functions (guestos/symbols.py), kept as
symbol numbers: the control block is in kernel data. ``fn`` returns an int,
or ends with a blocking hypercall whose continuation later calls ``fn_done``
(the suspend hypercall does).

Option ``stopmachinebug=ack`` plants a race, for ``pvlab explore`` to find: an
off-by-one in the acknowledgement count, so that every state before EXIT
advances when all cpus but one have acknowledged it. With three cpus or more,
in the schedules where the last cpu answers the IPI late, ``fn`` runs while
that cpu is not yet in the stopper, or the chosen cpu finds RUN already over
and ``fn`` never runs.
"""

from __future__ import annotations

from collections.abc import Callable

from guestos.evtchn import set_upcall_mask, upcall_masked
from guestos.kdata import AREAS, MAX_CPUS, kernel, per_cpu, percpu
from guestos.layout import Layout, Ref
from guestos.printk import printk
from guestos.smp import xen_send_IPI_one
from guestos.symbols import export, symbol, symbol_number
from guestos.task import schedule
from hypervisor.public.errno import EBUSY
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.sched import SCHEDOP_yield
from hypervisor.public.xen import Hypercall

NONE, PREPARE, DISABLE_IRQ, RUN, EXIT = range(5)
STATE_NAMES = ("NONE", "PREPARE", "DISABLE_IRQ", "RUN", "EXIT")

STOP = Layout("stop_machine", [
    ("active", "u64"),
    ("state", "u64"),
    ("ack", "u64"),        # acknowledgements still missing for this state
    ("nthreads", "u64"),
    ("fn", "u64"),         # symbol number of fn(cpu)
    ("cpu", "u64"),        # where fn runs
    ("caller", "u64"),     # the cpu that asked, which goes on with `then`
    ("then", "u64"),       # symbol number of then(cpu)
    ("result", "u64"),
    ("seq", "u64"),        # one number per stop_machine: a cpu joins each once
    ("test_at_ms", "u64"), # option stopmachine=MS: a demonstration run at MS (0: none)
    ("bug_ack", "u64"),    # option stopmachinebug=ack: the planted race below
])
assert STOP.size <= AREAS["stop_machine"].size

# each cpu's stopper
STOP_CPU = Layout("cpu_stopper", [
    ("stop_state", "u64"),      # the last state this cpu acknowledged
    ("in_stopper", "u64"),      # 1 while this cpu spins here
    ("stop_saved_mask", "u64"), # its event mask before the stop masked it
    ("stop_seq", "u64"),        # the stop_machine this cpu joined last
])
assert STOP_CPU.size <= AREAS["stop_percpu"].size // MAX_CPUS


def cpu_stopper(cpu: NativeCpu, n: int | None = None) -> Ref:
    return per_cpu(cpu, "stop_percpu", STOP_CPU, n)


StopFn = Callable[[NativeCpu], "int | TailCall"]
Continuation = Callable[[NativeCpu], TailCall]


def stopper(cpu: NativeCpu) -> Ref:
    return STOP.at(cpu, AREAS["stop_machine"].va(cpu))


# --- a demonstration fn, and the usual continuation -----------------------------------

@export
def check_the_others_spin(cpu: NativeCpu) -> int:
    """Report, for every other online cpu, whether it is in the stopper with
    its events masked (they all must be)."""
    k = kernel(cpu)
    bad = [n for n in range(k.cpus_up) if n != cpu.vcpu_id
           and not (cpu_stopper(cpu, n).in_stopper and upcall_masked(cpu, n))]
    others = ",".join(str(n) for n in range(k.cpus_up) if n != cpu.vcpu_id) or "none"
    if bad:
        printk(cpu, f"stop_machine: FAILURE: cpus {bad} are not spinning masked")
        return 1
    printk(cpu, f"stop_machine: fn ran on cpu{cpu.vcpu_id} while cpus {others} "
           "spun with events masked")
    return 0


@export
def reschedule(cpu: NativeCpu) -> TailCall:
    return schedule(cpu)


# --- the protocol ------------------------------------------------------------------

def stop_machine(cpu: NativeCpu, fn: StopFn, then: Continuation, on_cpu: int = 0) -> int:
    """Start a stop_machine from this cpu (in the kernel, from an event handler):
    ``fn`` runs on ``on_cpu``, then this cpu goes on with ``then``; both are
    exported functions. Returns 0, or -EBUSY if one is under way. The cpus
    enter it on their way out of the upcall."""
    sm = stopper(cpu)
    if sm.active:
        return -EBUSY
    n = kernel(cpu).cpus_up
    sm.active, sm.state, sm.nthreads, sm.ack = 1, PREPARE, n, n
    sm.fn, sm.then = symbol_number(fn), symbol_number(then)
    sm.cpu, sm.caller, sm.result = on_cpu, cpu.vcpu_id, 0
    sm.seq = sm.seq + 1
    for other in range(n):
        if other != cpu.vcpu_id:
            xen_send_IPI_one(cpu, other)
    return 0


def wanted(cpu: NativeCpu) -> bool:
    """Is a stop_machine under way that this cpu has not joined yet? A cpu that
    has already left it (EXIT acknowledged, the others not yet) must not join
    again: it would acknowledge EXIT twice and strand the others."""
    sm = stopper(cpu)
    pc = cpu_stopper(cpu)
    return bool(sm.active) and not pc.in_stopper and pc.stop_seq != sm.seq \
        and cpu.vcpu_id < sm.nthreads


def enter(cpu: NativeCpu) -> TailCall:
    """Join: the cpu's task (if any) has been saved; spin from an empty stack."""
    pc = cpu_stopper(cpu)
    pc.in_stopper, pc.stop_state, pc.stop_seq = 1, NONE, stopper(cpu).seq
    cpu.set_regs(rsp=percpu(cpu).stack_top)
    return multi_cpu_stop(cpu)


def _ack(cpu: NativeCpu) -> None:
    sm = stopper(cpu)
    sm.ack = sm.ack - 1
    if sm.ack == (1 if sm.bug_ack and sm.state != EXIT else 0):
        if sm.state == EXIT:
            sm.active, sm.state = 0, NONE
        else:
            sm.ack, sm.state = sm.nthreads, sm.state + 1


def multi_cpu_stop(cpu: NativeCpu) -> TailCall:
    """One turn of the spin loop (a native entry: the continuation of the yield)."""
    sm = stopper(cpu)
    pc = cpu_stopper(cpu)
    cur = sm.state if sm.active else NONE
    if pc.stop_state == EXIT:
        return _leave(cpu)  # acknowledged EXIT last time round: done
    if cur != pc.stop_state and cur != NONE:
        pc.stop_state = cur
        # each cpu's step, for the trace (pvlab plot timeline), not the console
        cpu.trace_marker(f"stop_machine {STATE_NAMES[cur]}")
        if cur == DISABLE_IRQ:
            pc.stop_saved_mask = upcall_masked(cpu)
            set_upcall_mask(cpu, 1)
        elif cur == RUN and cpu.vcpu_id == sm.cpu:
            fn: StopFn = symbol(sm.fn)  # type: ignore[assignment]
            result = fn(cpu)
            if isinstance(result, TailCall):
                return result  # its continuation calls fn_done
            sm.result = result
        _ack(cpu)
        if cur == EXIT:
            return _leave(cpu)
    return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), multi_cpu_stop)


def fn_done(cpu: NativeCpu, result: int) -> TailCall:
    """The end of a fn that blocked: acknowledge RUN and spin on."""
    sm = stopper(cpu)
    sm.result = result
    cpu.set_regs(rsp=percpu(cpu).stack_top)
    _ack(cpu)
    return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), multi_cpu_stop)


def _leave(cpu: NativeCpu) -> TailCall:
    pc = cpu_stopper(cpu)
    caller = stopper(cpu).caller == cpu.vcpu_id
    then: Continuation = symbol(stopper(cpu).then)  # type: ignore[assignment]
    pc.in_stopper, pc.stop_state = 0, NONE
    set_upcall_mask(cpu, pc.stop_saved_mask)
    return then(cpu) if caller else schedule(cpu)

