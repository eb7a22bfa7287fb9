"""A domain's watchdog timers (xen/common/sched/core.c domain_watchdog): a
guest arms one with SCHEDOP_watchdog and must re-arm it before it expires;
when one expires, the domain shuts down with SHUTDOWN_watchdog
(domain_watchdog_timeout).

The timers are the scheduler's host timers on system time, so an expiry
happens at the same point of every deterministic run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from hypervisor.public.errno import EINVAL, ENOSPC

NR_DOMAIN_WATCHDOG_TIMERS = 2
NSEC_PER_SEC = 1_000_000_000


class Timers(Protocol):
    """What the watchdog needs of the scheduler."""

    def now(self) -> int: ...
    def add_timer(self, deadline_ns: int, owner: Any, fn: Callable[[], None]) -> None: ...
    def cancel_timers(self, owner: Any) -> None: ...


class _Slot:
    """One timer; its identity names it to the scheduler."""


class DomainWatchdog:
    def __init__(self, timers: Timers, expire: Callable[[], None]) -> None:
        self.timers = timers
        self.expire = expire  # the domain's shutdown(SHUTDOWN_watchdog)
        self.slots = [_Slot() for _ in range(NR_DOMAIN_WATCHDOG_TIMERS)]
        self.in_use = [False] * NR_DOMAIN_WATCHDOG_TIMERS

    def _set(self, i: int, timeout_s: int) -> None:
        slot = self.slots[i]
        self.timers.cancel_timers(slot)
        self.timers.add_timer(self.timers.now() + timeout_s * NSEC_PER_SEC, slot, self.expire)

    def op(self, wd_id: int, timeout_s: int) -> int:
        """SCHEDOP_watchdog: id 0 arms a free timer and returns its id + 1; an
        armed id is re-armed, or disarmed with timeout 0; -EINVAL otherwise."""
        if wd_id > NR_DOMAIN_WATCHDOG_TIMERS:
            return -EINVAL
        if wd_id == 0:
            for i in range(NR_DOMAIN_WATCHDOG_TIMERS):
                if not self.in_use[i]:
                    self.in_use[i] = True
                    self._set(i, timeout_s)
                    return i + 1
            return -ENOSPC
        i = wd_id - 1
        if not self.in_use[i]:
            return -EINVAL
        if timeout_s == 0:
            self.timers.cancel_timers(self.slots[i])
            self.in_use[i] = False
        else:
            self._set(i, timeout_s)
        return 0

    def stop(self) -> None:
        """The domain is destroyed (watchdog_domain_destroy)."""
        for slot in self.slots:
            self.timers.cancel_timers(slot)
