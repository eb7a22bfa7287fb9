"""Booting a domain from a configuration and running it: what ``pvlab run``
does, as a function the tests and tools call too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypervisor.core import Hypervisor
from hypervisor.domain import SHUTDOWN_NAMES, Domain
from hypervisor.toolstack.builder import build_domain
from hypervisor.toolstack.config import DomainConfig

HYPERVISOR_OVERHEAD_MIB = 8


def machine_mib_for(memory_mib: int) -> int:
    """Machine memory for one guest: its RAM, the M2P, the hypervisor's frames."""
    return memory_mib + HYPERVISOR_OVERHEAD_MIB + memory_mib // 64


@dataclass
class RunResult:
    domain: Domain
    console: bytes
    reason: str           # "poweroff", "crash", ..., "running" (time limit) or "hung"
    virtual_ns: int

    @property
    def ok(self) -> bool:
        return self.reason in ("poweroff", "running")


def boot(cfg: DomainConfig, seed: int | None = None, clock: str = "deterministic",
         slice_insns: int = 50_000) -> tuple[Hypervisor, Domain]:
    seed = cfg.seed if seed is None else seed
    hv = Hypervisor(machine_mib_for(max(cfg.memory, cfg.maxmem)), seed=seed, clock=clock,
                    slice_insns=slice_insns)
    dom = build_domain(hv, cfg)
    return hv, dom


def run_domain(hv: Hypervisor, dom: Domain, until_ns: int | None = None,
               sink: Callable[[Domain, bytes], None] | None = None) -> RunResult:
    dom.console_sink = sink
    hv.run(until_ns)
    if dom.shutdown_reason is not None:
        reason = SHUTDOWN_NAMES.get(dom.shutdown_reason, str(dom.shutdown_reason))
    elif until_ns is not None and all(v.clock >= until_ns or (v.blocked and v.timer_deadline)
                                      for v in dom.vcpus if v.online):
        reason = "running"  # each VCPU reached the time, or sleeps until a timer
    else:
        reason = "hung"
    t = max((v.clock for v in dom.vcpus), default=0)
    return RunResult(dom, bytes(dom.console_out), reason, t)
