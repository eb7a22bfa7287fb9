"""A test kernel that makes no progress: the run loop must end it, since
nothing can ever wake it. ``MODE`` picks what vcpu0 does after boot:
  "block"  SCHEDOP_block for ever, with no timer set and no event channel
           bound: nothing can wake it;
  "yield"  SCHEDOP_yield in a loop for ever, with no timer and nothing else:
           a spin on a flag no one can set;
  "sleep"  a one-shot timer at SLEEP_NS, then SCHEDOP_block (no event
           channel is bound, so the timer's VIRQ wakes nothing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypervisor.public.native import TailCall
from hypervisor.public.sched import SCHEDOP_block, SCHEDOP_yield
from hypervisor.public.xen import Hypercall

MODE = "block"
SLEEP_NS = 50_000_000


def start(cpu: Any) -> TailCall:
    if MODE == "yield":
        return spin(cpu)
    if MODE == "sleep":
        return TailCall(Hypercall.set_timer_op, (SLEEP_NS,), block)
    return block(cpu)


def block(cpu: Any) -> TailCall:
    return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), block)


def spin(cpu: Any) -> TailCall:
    return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), spin)


def native_entries() -> list[Callable[..., object]]:
    return [start, block, spin]
