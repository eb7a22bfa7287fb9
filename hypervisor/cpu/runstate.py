"""A VCPU's runstate (Xen's struct vcpu_runstate_info, kept by
common/sched/core.c vcpu_runstate_change): which state it is in, since when,
and the time it has spent in each. The scheduler changes it when a slice
starts (running) and ends (runnable, blocked or offline), at the VCPU's own
clock: time blocked ends when the VCPU is next run, which is when it woke."""

from __future__ import annotations

from hypervisor.public.vcpu import RUNSTATE_offline, vcpu_runstate_info


class Runstate:
    def __init__(self) -> None:
        # a new VCPU is offline from system time 0 (vcpu_create)
        self.state = RUNSTATE_offline
        self.entry = 0
        self.time = [0, 0, 0, 0]

    def change(self, state: int, now: int) -> None:
        if state == self.state:
            return
        self.time[self.state] += max(now - self.entry, 0)
        self.state, self.entry = state, max(now, self.entry)

    def get(self, now: int) -> vcpu_runstate_info:
        """Xen's vcpu_runstate_get: the time in the current state counts up to now."""
        info = vcpu_runstate_info(state=self.state, state_entry_time=self.entry)
        for i, t in enumerate(self.time):
            info.time[i] = t
        info.time[self.state] += max(now - self.entry, 0)
        return info
