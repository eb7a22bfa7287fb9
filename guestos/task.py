"""Tasks: the task table in kernel data, a run queue per cpu (a task stays on
the cpu it was given), and the switch between tasks on a timer tick, a yield,
a sleep or an exit.

A task's life: NEW (its pgd built, still unpinned) -> RUNNABLE (pgd pinned)
<-> RUNNING <-> SLEEPING or BLOCKED -> DEAD (pgd unpinned) -> FREE (pages
freed), or ZOMBIE first if the task that spawned it may wait for it (Linux's
EXIT_ZOMBIE: only the slot and the exit code are left, until wait4 reaps
it; a parent that exits lets its zombies go). A guest option holds a chosen
task in NEW or DEAD for a while, so that an unpinned pgd is on the pgd_list
at a chosen moment (a save must cope).

A SLEEPING task wakes at its time (the tick); a BLOCKED one waits for an
event named by its wait channel (input on the console, a child's exit) and
is woken by whoever makes it (``wake_up_process``). A system call that
blocks is restarted when the task wakes, as Linux restarts one that returns
-ERESTARTSYS: its saved rip goes back over the ``syscall`` instruction and
its rax is the call's number again, so nothing of the wait is kept but the
state and the channel.

A task's user registers live in its task struct while it does not run; the
kernel has no stack of its own per task (the per-cpu stack is empty whenever
the cpu is in user mode or idle), so switching is: save the interrupted
registers, load the next task's, iret.
"""

from __future__ import annotations

from collections.abc import Callable

from guestos.evtchn import NO_PORT, ipi_evtchn, notify_remote_via_evtchn
from guestos.frame import iret_to
from guestos.hypercall import mmuext, shutdown_args
from guestos.idle import cpu_idle
from guestos.kdata import AREAS, MAX_CPUS, MAX_TASKS, kernel, per_cpu, percpu
from guestos.layout import Layout, Ref
from guestos.mm import nr_free_pages, pfn_to_mfn
from guestos.pgd import pgd_free, pgd_list_add, pgd_pin, pgd_pinned, pgd_unpin
from guestos.printk import printk
from guestos.time import NSEC_PER_MSEC, now, tick_resume_local
from guestos.user import load_program, pages_needed, program_names
from hypervisor.public.arch_x86 import FLAT_USER_CS64, FLAT_USER_SS64
from hypervisor.public.errno import EAGAIN, ENOENT
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.sched import SHUTDOWN_poweroff
from hypervisor.public.xen import MMUEXT_NEW_USER_BASEPTR, Hypercall

FREE, NEW, RUNNABLE, RUNNING, SLEEPING, DEAD, BLOCKED, ZOMBIE = range(8)
# what a BLOCKED task waits for (Linux's wait queues, one each)
WAIT_NONE, WAIT_TTY_READ, WAIT_CHILD = range(3)

# the user registers a task struct keeps (rsp, rip, rflags from its frames)
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")
SAVED = (*GPRS, "rsp", "rip", "rflags")

TASK = Layout("task", [
    ("state", "u64"),
    ("pid", "u64"),
    ("cpu", "u64"),
    ("pgd", "u64"),        # pfn of the task's user L4
    ("wake_at", "u64"),    # virtual ns: the end of a sleep or of a hold
    ("exit_code", "u64"),
    *((r, "u64") for r in SAVED),
    ("parent", "u64"),     # pid of the task that spawned it and may wait4 it; 0: none
    ("wait_chan", "u64"),  # WAIT_*: what a BLOCKED task waits for
    ("files", "u64"),      # its open files: a byte per descriptor (guestos/fs.py)
])
TASK_SIZE = AREAS["tasks"].size // MAX_TASKS
assert TASK.size <= TASK_SIZE
RFLAGS_IF = 0x200

# the scheduler's globals
SCHED = Layout("sched", [
    ("tasks_live", "u64"),
    ("next_pid", "u64"),
    ("next_cpu", "u64"),       # where the next spawned task goes
    ("freezing", "u64"),       # the freezer holds user tasks: no cpu picks one
    ("hold_build_pid", "u64"), # options hold=: stop a task's construction or teardown
    ("hold_build_ms", "u64"),  #   half way, leaving its pgd unpinned a while
    ("hold_exit_pid", "u64"),
    ("hold_exit_ms", "u64"),
    ("free_at_boot", "u64"),   # free pages before the first task: none may leak
])
assert SCHED.size <= AREAS["sched"].size


def sched(cpu: NativeCpu) -> Ref:
    return SCHED.at(cpu, AREAS["sched"].va(cpu))


NO_TASK = 0xFFFFFFFFFFFFFFFF  # a cpu runs no task (the idle loop)

# each cpu's run queue (Linux's struct rq)
RQ = Layout("rq", [
    ("current", "u64"),        # task slot of the running task; NO_TASK: idle
    ("need_resched", "u64"),
    ("last", "u64"),           # slot that ran last, for round robin
    ("user_pgd", "u64"),       # pfn of the user L4 installed on this cpu (0: none)
])
assert RQ.size <= AREAS["sched_percpu"].size // MAX_CPUS


def cpu_rq(cpu: NativeCpu, n: int | None = None) -> Ref:
    return per_cpu(cpu, "sched_percpu", RQ, n)


def init_rq(cpu: NativeCpu, n: int) -> None:
    """At boot: cpu n runs nothing, and round robin starts at the first slot."""
    rq = cpu_rq(cpu, n)
    rq.current, rq.last = NO_TASK, MAX_TASKS - 1


def task(cpu: NativeCpu, slot: int) -> Ref:
    return TASK.at(cpu, AREAS["tasks"].va(cpu) + slot * TASK_SIZE)


def current(cpu: NativeCpu) -> Ref | None:
    cur = cpu_rq(cpu).current
    return task(cpu, cur) if cur != NO_TASK else None


def slots_on(cpu: NativeCpu, n: int) -> list[int]:
    """Slots of the live tasks of cpu n."""
    return [s for s in range(MAX_TASKS)
            if task(cpu, s).state != FREE and task(cpu, s).cpu == n]


# --- creation and exit --------------------------------------------------------------

def spawn(cpu: NativeCpu, name: str, args: tuple[int, int, int], on_cpu: int | None = None,
          parent: int = 0) -> int:
    """Create a task running program ``name`` (a child of task ``parent``,
    0: of none): returns its pid, or -ENOENT (no such program) or -EAGAIN (no
    free task slot or memory)."""
    k, sc = kernel(cpu), sched(cpu)
    if name not in program_names(cpu):
        return -ENOENT
    slot = next((s for s in range(MAX_TASKS) if task(cpu, s).state == FREE), None)
    if slot is None or nr_free_pages(cpu) < pages_needed(cpu, name):
        return -EAGAIN
    aspace, entry = load_program(cpu, name)
    t = task(cpu, slot)
    pid = sc.next_pid + 1
    sc.next_pid = pid
    if on_cpu is None:
        on_cpu = sc.next_cpu % k.nr_cpus
        sc.next_cpu = on_cpu + 1
    t.pid, t.cpu, t.pgd, t.exit_code, t.wake_at = pid, on_cpu, aspace.l4, 0, 0
    t.parent, t.wait_chan, t.files = parent, WAIT_NONE, 0
    for r in GPRS:
        setattr(t, r, 0)
    t.rdi, t.rsi, t.rdx = args
    t.rip, t.rsp, t.rflags = entry, aspace.stack_top, RFLAGS_IF | 0x2
    pgd_list_add(cpu, aspace.l4)
    t.state = NEW
    sc.tasks_live = sc.tasks_live + 1
    if sc.hold_build_pid == pid:
        # construction stops here a while: the pgd is on the list, unpinned
        t.wake_at = now(cpu) + sc.hold_build_ms * NSEC_PER_MSEC
        printk(cpu, f"task {pid}: construction held for {sc.hold_build_ms} ms, pgd unpinned")
    else:
        _finish_construction(cpu, t)
    return pid


def _finish_construction(cpu: NativeCpu, t: Ref) -> None:
    pgd_pin(cpu, t.pgd)  # pinned before first use
    t.state = RUNNABLE


def _release(cpu: NativeCpu, t: Ref) -> None:
    """The end of a teardown: free the pgd and every page it maps; the slot
    too, unless a parent may still wait for the exit code."""
    pgd_free(cpu, t.pgd)
    t.pgd = 0
    t.state = ZOMBIE if t.parent else FREE
    sc = sched(cpu)
    sc.tasks_live = sc.tasks_live - 1


def find_task(cpu: NativeCpu, pid: int) -> Ref | None:
    """The task ``pid`` (in any state but FREE), or None."""
    for s in range(MAX_TASKS):
        t = task(cpu, s)
        if t.state != FREE and t.pid == pid:
            return t
    return None


def wake_up_process(cpu: NativeCpu, t: Ref) -> None:
    """A BLOCKED task can run again (Linux's try_to_wake_up): runnable, and
    its cpu asked to reschedule, by an IPI if it is another cpu."""
    t.state, t.wait_chan = RUNNABLE, WAIT_NONE
    if t.cpu == cpu.vcpu_id:
        cpu_rq(cpu).need_resched = 1
        return
    port = ipi_evtchn(cpu, t.cpu)
    if port != NO_PORT:
        notify_remote_via_evtchn(cpu, port)


def wake_up_waiters(cpu: NativeCpu, chan: int, pid: int | None = None) -> None:
    """Wake the tasks BLOCKED on ``chan`` (only task ``pid`` if given)."""
    for s in range(MAX_TASKS):
        t = task(cpu, s)
        if t.state == BLOCKED and t.wait_chan == chan and pid in (None, t.pid):
            wake_up_process(cpu, t)


def exit_notify(cpu: NativeCpu, t: Ref) -> None:
    """Linux's exit_notify: the exiting task's children are no one's (its
    zombies are let go), and a parent blocked in wait4 is woken; with no
    parent left, no one will reap this task."""
    for s in range(MAX_TASKS):
        child = task(cpu, s)
        if child.state != FREE and child.parent == t.pid:
            if child.state == ZOMBIE:
                child.state = FREE
            child.parent = 0
    parent = find_task(cpu, t.parent) if t.parent else None
    if parent is None or parent.state in (DEAD, ZOMBIE):
        t.parent = 0
    else:
        wake_up_waiters(cpu, WAIT_CHILD, parent.pid)


# what else a task's exit lets go (Linux's exit_files and the like): code
# registered by the subsystems above this one when they are imported
_exit_hooks: list[Callable[[NativeCpu, Ref], None]] = []


def register_exit_hook(hook: Callable[[NativeCpu, Ref], None]) -> None:
    _exit_hooks.append(hook)


def exit_current(cpu: NativeCpu, code: int) -> TailCall:
    """The running task exits: what it holds is let go, its pgd comes off
    this cpu, is unpinned, freed."""
    t = current(cpu)
    assert t is not None
    sc = sched(cpu)
    printk(cpu, f"task {t.pid} exited with code {code}")
    for hook in _exit_hooks:
        hook(cpu, t)
    exit_notify(cpu, t)
    install_user_l4(cpu, 0)
    pgd_unpin(cpu, t.pgd)
    t.exit_code = code
    t.state = DEAD
    cpu_rq(cpu).current = NO_TASK
    if sc.hold_exit_pid == t.pid:
        t.wake_at = now(cpu) + sc.hold_exit_ms * NSEC_PER_MSEC
        printk(cpu, f"task {t.pid}: teardown held for {sc.hold_exit_ms} ms, pgd unpinned")
    else:
        _release(cpu, t)
    return schedule(cpu)


# --- saving and resuming user context -----------------------------------------------

def save_user_context(cpu: NativeCpu, t: Ref, frame: tuple[int, ...],
                      rax: int | None = None) -> None:
    """Keep the interrupted user registers: the live ones, and from the bounce
    frame (rcx, r11, rip, cs, rflags, rsp, ss) the ones Xen saved there."""
    regs = cpu.regs()
    rcx, r11, rip, _cs, rflags, rsp, _ss = frame
    for r in GPRS:
        setattr(t, r, regs[r])
    t.rcx, t.r11, t.rip, t.rflags, t.rsp = rcx, r11, rip, rflags, rsp
    if rax is not None:
        t.rax = rax


def install_user_l4(cpu: NativeCpu, pgd: int) -> None:
    """Make pgd (a pfn; 0: none) this cpu's user L4. The kernel remembers the
    pfn, not the mfn: after a restore every mfn is new."""
    rq = cpu_rq(cpu)
    if rq.user_pgd != pgd:
        mmuext(cpu, MMUEXT_NEW_USER_BASEPTR, pfn_to_mfn(cpu, pgd) if pgd else 0)
        rq.user_pgd = pgd


def _resume(cpu: NativeCpu, slot: int) -> TailCall:
    t = task(cpu, slot)
    rq = cpu_rq(cpu)
    if not pgd_pinned(cpu, t.pgd):
        pgd_pin(cpu, t.pgd)
    install_user_l4(cpu, t.pgd)
    rq.current = slot
    rq.last = slot
    rq.need_resched = 0
    t.state = RUNNING
    cpu.set_regs(**{r: getattr(t, r) for r in GPRS if r not in ("rax", "rcx", "r11")})
    return iret_to(cpu, t.rax, t.rip, FLAT_USER_CS64, t.rflags, t.rsp, FLAT_USER_SS64,
                   t.rcx, t.r11, stack=percpu(cpu).stack_top)


# --- the scheduler ------------------------------------------------------------------

def pick_next(cpu: NativeCpu) -> int | None:
    """Round robin over this cpu's runnable tasks, starting after the last one
    run; none while the freezer holds them."""
    if sched(cpu).freezing:
        return None
    mine = [s for s in slots_on(cpu, cpu.vcpu_id) if task(cpu, s).state == RUNNABLE]
    if not mine:
        return None
    last = cpu_rq(cpu).last
    later = [s for s in mine if s > last]
    return (later or mine)[0]


def schedule(cpu: NativeCpu) -> TailCall:
    """Run the next runnable task of this cpu, or idle. The current task, if
    any, has been saved (and is RUNNABLE, SLEEPING or gone)."""
    tick_resume_local(cpu)
    cpu_rq(cpu).current = NO_TASK
    nxt = pick_next(cpu)
    if nxt is not None:
        return _resume(cpu, nxt)
    if sched(cpu).tasks_live == 0:
        return kernel_power_off(cpu)
    return cpu_idle(cpu)


def kernel_power_off(cpu: NativeCpu) -> TailCall:
    """The last task is gone: the domain is done."""
    sc = sched(cpu)
    printk(cpu, f"all programs exited: powering off ({nr_free_pages(cpu)} pages free, "
           f"{sc.free_at_boot} before the first task)")
    return TailCall(Hypercall.sched_op, shutdown_args(cpu, SHUTDOWN_poweroff), cpu_idle)


def preempt_current(cpu: NativeCpu, frame: tuple[int, ...]) -> TailCall:
    t = current(cpu)
    assert t is not None
    save_user_context(cpu, t, frame)
    t.state = RUNNABLE
    return schedule(cpu)


def scheduler_tick(cpu: NativeCpu) -> None:
    """On each timer tick of this cpu."""
    wake_due(cpu)


def wake_due(cpu: NativeCpu) -> None:
    """Wake this cpu's sleepers whose time has come, go on with held
    constructions and teardowns, and ask for a switch if another task waits.
    On every tick, and when the thaw kicks the cpu: what came due while the
    tasks were frozen must not wait for the next tick, which a checkpoint
    taken at every tick would freeze again."""
    t_now = now(cpu)
    waiting = False
    frozen = sched(cpu).freezing  # a held construction or teardown is frozen too
    for s in slots_on(cpu, cpu.vcpu_id):
        t = task(cpu, s)
        state = t.state
        if state in (SLEEPING, NEW, DEAD) and t.wake_at <= t_now and not frozen:
            if state == SLEEPING:
                t.state = RUNNABLE
            elif state == NEW:
                printk(cpu, f"task {t.pid}: construction goes on")
                _finish_construction(cpu, t)
            else:
                printk(cpu, f"task {t.pid}: teardown goes on")
                _release(cpu, t)
        if t.state == RUNNABLE:
            waiting = True
    if waiting:
        cpu_rq(cpu).need_resched = 1
