"""Every VCPU of every domain, scheduled on one host thread, with two clocks.

* deterministic (the default): a slice is a number of instructions
  (``emu_start(count=N)``) and time is instructions retired, 1 instruction =
  1 ns. Each VCPU has its own clock, and the scheduler runs a runnable VCPU
  whose clock is behind, so VCPUs advance as if in parallel. Its choices come
  from a random stream of its own, seeded with the schedule seed (by default
  the machine's seed) and drawn only at these decisions, so a run, with every
  interleaving and race in it, follows from the two seeds bit for bit:
  - which VCPU runs next: any runnable one whose clock is less than one
    slice ahead of the furthest behind (so none runs more than about two
    slices ahead of another), picked at random;
  - how long its slice is: from half to one and a half times the slice;
  - how late a blocked VCPU wakes when an event is sent to it: from 0 to
    WAKE_DELAY_NS after the sender's time, as a real IPI takes a while.
  A guest's results must not depend on these choices: only its interleavings do.
* fast: slices end after a fixed host time (``emu_start(timeout=)``) and time is
  host time. Interleavings then depend on the host; the guest's results must not.

The scheduler is given the machine's domains and the exit path back into a
guest (the core's return_to_guest); it also owns the wake-ups: a VCPU's
timers and the kick of a blocked VCPU an event is pending for.

No progress: Xen has no such detector; it would run such a guest for ever.
pvlab's run loop stops when nothing can ever change again: no VCPU timer (a
one-shot, a poll's timeout, a periodic one with VIRQ_TIMER bound) and no host
timer (a device's, a domain's watchdog) is set, and every online VCPU is
either blocked or has made SPIN_YIELDS sched_op yields in a row with no other
hypercall and no event upcall between (a spin on a flag that no one can set).
The rule counts hypercalls, not host time, so it fires at the same point in
every run. It cannot see the toolstack's requests: the caller (run_domain)
lets the idle time pass up to the next one instead of ending the run.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hypervisor.public.vcpu import (
    RUNSTATE_blocked,
    RUNSTATE_offline,
    RUNSTATE_runnable,
    RUNSTATE_running,
)
from hypervisor.public.xen import VIRQ_TIMER

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.domain import Domain

CLOCKS = ("deterministic", "fast")
SPIN_YIELDS = 100_000  # yields in a row that make a VCPU a spinner (0.1 s of its time)
WAKE_DELAY_NS = 20_000  # the latest a kicked VCPU wakes after the event (a slow IPI)


def fire_timer(vcpu: Vcpu) -> None:
    """A VCPU's one-shot timer expired: VIRQ_TIMER to it (Xen's
    vcpu_singleshot_timer_fn and send_timer_event)."""
    vcpu.timer_deadline = 0
    vcpu.domain.evtchn.send_virq(vcpu.vcpu_id, VIRQ_TIMER)


def end_poll(vcpu: Vcpu) -> None:
    """The VCPU leaves SCHEDOP_poll (an event, or the poll's timeout)."""
    vcpu.poll_evtchn = 0
    vcpu.poll_deadline = 0


def periodic_next(vcpu: Vcpu) -> int:
    """When the periodic timer next sends VIRQ_TIMER (0: never). Without the
    VIRQ bound its ticks change nothing, so they are not counted."""
    if not vcpu.periodic_period or (vcpu.vcpu_id, VIRQ_TIMER) not in vcpu.domain.evtchn.virqs:
        return 0
    return vcpu.periodic_last + vcpu.periodic_period


def periodic_work(vcpu: Vcpu, now: int) -> None:
    """Xen's vcpu_periodic_timer_work: a tick if one is due (on every
    schedule-in and at the timer)."""
    due = periodic_next(vcpu)
    if due and now >= due:
        vcpu.periodic_last = now
        vcpu.domain.evtchn.send_virq(vcpu.vcpu_id, VIRQ_TIMER)


def next_wake(vcpu: Vcpu) -> int:
    """The system time of the VCPU's next timer (0: none): its one-shot
    timer, its periodic timer, or the timeout of the poll it is blocked in."""
    return min((t for t in (vcpu.timer_deadline, vcpu.poll_deadline, periodic_next(vcpu))
                if t), default=0)


def fire_timers(vcpu: Vcpu, now: int) -> None:
    """Every timer of the VCPU due at ``now``: the one-shot timer sends
    VIRQ_TIMER; a poll's timeout wakes it (Xen's poll_timer_fn)."""
    if vcpu.timer_deadline and vcpu.timer_deadline <= now:
        fire_timer(vcpu)
    if vcpu.poll_deadline and vcpu.poll_deadline <= now:
        end_poll(vcpu)
        vcpu.blocked = False
    periodic_work(vcpu, now)


class Scheduler:
    def __init__(self, domains: dict[int, Domain], return_to_guest: Callable[[Vcpu], None],
                 clock: str, slice_insns: int, slice_us: int, sched_seed: int = 0) -> None:
        if clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r}: choose one of {', '.join(CLOCKS)}")
        self.reseed(sched_seed)
        self.domains = domains
        self.return_to_guest = return_to_guest
        self.clock = clock
        self.deterministic = clock == "deterministic"
        self.slice_insns = slice_insns
        self.slice_us = slice_us
        self.current: Vcpu | None = None
        self._t0 = time.monotonic_ns()
        self._rr = 0
        self.slices = 0
        # the host's own timers (a device model's polling): (deadline, seq, owner, fn)
        self.timers: list[tuple[int, int, Any, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._timer_now: int | None = None
        self.stalled = ""  # why the last run stopped with no progress possible
        # host work done between slices, a bounded amount each time (the
        # background fill of absent frames): registered, never named here
        self.between_slices: list[Callable[[], None]] = []

    def reseed(self, sched_seed: int) -> None:
        """The schedule's choices from ``sched_seed``'s stream from now on
        (the frame allocator's draws never move it)."""
        self.rng = random.Random(f"pvlab-schedule-{sched_seed}")
        self.sched_seed = sched_seed

    # --- host timers -------------------------------------------------------------------

    def add_timer(self, deadline_ns: int, owner: Any, fn: Callable[[], None]) -> None:
        """Call ``fn`` at system time ``deadline_ns`` (QEMU's timer_mod on the
        virtual clock); ``owner`` names it for cancel_timers."""
        heapq.heappush(self.timers, (deadline_ns, next(self._seq), owner, fn))

    def cancel_timers(self, owner: Any) -> None:
        self.timers = [t for t in self.timers if t[2] is not owner]
        heapq.heapify(self.timers)

    def _fire_timer(self) -> None:
        deadline, _, _, fn = heapq.heappop(self.timers)
        self._timer_now = deadline
        try:
            fn()
        finally:
            self._timer_now = None

    # --- time --------------------------------------------------------------------------

    def host_now(self) -> int:
        return time.monotonic_ns() - self._t0

    def now(self) -> int:
        """System time as seen by whoever is running now."""
        if not self.deterministic:
            return self.host_now()
        if self._timer_now is not None:
            return self._timer_now
        cur = self.current
        if cur is not None:
            return cur.clock + cur.retired_in_slice()
        return min((v.clock for v in self._online()), default=0)

    def _online(self) -> list[Vcpu]:
        return [v for d in self.domains.values() if d.is_running and not d.paused
                for v in d.vcpus if v.online]

    def kick(self, vcpu: Vcpu) -> None:
        """An event is pending for ``vcpu``: wake it if it is blocked (Xen's
        vcpu_unblock), at the time of whoever sent it."""
        if vcpu.blocked:
            vcpu.blocked = False
            end_poll(vcpu)
            delay = self.rng.randint(0, WAKE_DELAY_NS) if self.deterministic else 0
            vcpu.clock = max(vcpu.clock, self.now() + delay)

    def no_progress(self, online: list[Vcpu]) -> str:
        """Why nothing can change any more, or "" (the rule is above)."""
        if self.timers or any(next_wake(v) for v in online):
            return ""
        blocked = sum(v.blocked for v in online)
        spinning = sum(not v.blocked and v.idle_yields >= SPIN_YIELDS for v in online)
        if blocked + spinning != len(online):
            return ""
        if not spinning:
            return "every VCPU is blocked with no timer set and no event to come"
        return (f"{spinning} VCPU(s) yield in a loop and {blocked} are blocked, with no timer "
                "set and no event to come")

    def next_work(self) -> int | None:
        """When something next can run: now if a VCPU is runnable, else the
        earliest VCPU or host timer; None if no timer is set."""
        online = self._online()
        if any(not v.blocked for v in online):
            return self.now()
        wakes = [t for v in online if (t := next_wake(v))] + [t[0] for t in self.timers[:1]]
        return min(wakes, default=None)

    def idle_until(self, t_ns: int) -> None:
        """Nothing runs before ``t_ns`` (the toolstack's next request): let
        every stopped VCPU's time pass to it, as an idle CPU's does."""
        for v in self._online():
            v.clock = max(v.clock, t_ns)
            v.idle_yields = 0

    # --- the loop ------------------------------------------------------------------------

    def run(self, until_ns: int | None = None, stop: Callable[[], bool] | None = None) -> None:
        self.stalled = ""
        while stop is None or not stop():
            online = self._online()
            if not online:
                return
            self.stalled = self.no_progress(online)
            if self.stalled:
                return
            runnable = [v for v in online if not v.blocked]
            # the blocked VCPUs a timer will wake, with the time it does
            sleepers = [(t, v) for v in online if v.blocked and (t := next_wake(v))]
            if self.deterministic:
                behind = min(runnable, key=lambda x: x.clock) if runnable else None
                wake_at, wake = min(sleepers, key=lambda s: s[0]) if sleepers else (0, None)
                if self.timers:
                    due = self.timers[0][0]
                    if ((behind is None or due <= behind.clock)
                            and (wake is None or due <= wake_at)
                            and (until_ns is None or due < until_ns)):
                        self._fire_timer()
                        continue
                if (wake is not None and (behind is None or wake_at <= behind.clock)
                        and (until_ns is None or wake_at < until_ns)):
                    wake.clock = max(wake.clock, wake_at)
                    fire_timers(wake, wake.clock)
                    continue
                if behind is None:
                    self.idle_until(until_ns or 0)  # a host timer wakes them after
                    return
                if until_ns is not None and behind.clock >= until_ns:
                    return
                v = self.pick(runnable, behind.clock)
            else:
                now = self.host_now()
                while self.timers and self.timers[0][0] <= now:
                    self._fire_timer()
                for _, s in sleepers:
                    fire_timers(s, now)
                runnable = [x for x in online if not x.blocked]
                if not runnable:
                    wakes = [next_wake(s) for _, s in sleepers] + [t[0] for t in self.timers[:1]]
                    if not wakes:
                        return
                    nxt = min(wakes)
                    if until_ns is not None:
                        if now >= until_ns:
                            return
                        nxt = min(nxt, until_ns)  # never sleep past the run's limit
                    time.sleep(max(0, nxt - now) / 1e9)
                    continue
                if until_ns is not None and now >= until_ns:
                    return
                self._rr = (self._rr + 1) % len(runnable)
                v = runnable[self._rr]
                v.clock = now
            self.run_slice(v)

    def pick(self, runnable: list[Vcpu], first: int) -> Vcpu:
        """The next VCPU to run: one of those less than a slice ahead of the
        furthest behind (clock ``first``), at random (the choice the docstring
        describes). The run's limit plays no part, so a run stopped at a limit
        and run on makes the same choices as one that never stopped."""
        near = [x for x in runnable if x.clock < first + self.slice_insns]
        return near[0] if len(near) == 1 else self.rng.choice(near)

    def slice_length(self) -> int:
        half = self.slice_insns // 2
        return self.rng.randint(max(half, 1), self.slice_insns + half)

    def run_slice(self, v: Vcpu) -> None:
        fire_timers(v, v.clock)
        v.domain.update_time(v)
        self.return_to_guest(v)
        if not v.domain.is_running or v.blocked or not v.online:
            return
        self.current = v
        self.slices += 1
        v.runstate.change(RUNSTATE_running, v.clock)
        try:
            if self.deterministic:
                retired = v.run(self.slice_length())
                v.clock += max(retired, 1)
            else:
                v.run(0, self.slice_us)
        except BaseException:
            # a hook's error (a post-copy whose connection dropped): the slice
            # ended at the instruction that raised it, which runs again
            if self.deterministic:
                v.clock += v.last_retired
            raise
        finally:
            self.current = None
            end = v.clock if self.deterministic else self.host_now()
            v.runstate.change(RUNSTATE_blocked if v.blocked else RUNSTATE_runnable
                              if v.online else RUNSTATE_offline, end)
        for work in self.between_slices:
            work()
