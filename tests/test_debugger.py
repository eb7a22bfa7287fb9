"""The hypervisor's debugger (hypervisor/debugger.py), driven through the
control interface as the gdb server drives it: breakpoints stop a VCPU
before the instruction, a step runs one instruction, and a run under the
debugger is the run without it, bit for bit (the schedule included)."""

from __future__ import annotations

import pytest

from hypervisor import domctl
from hypervisor.public.gdb import STOP_BREAKPOINT, STOP_STEP
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config

NEXT_LINE = 0x400025  # counter's loop head (firmware/user/counter.elf's next_line)


def _outcome(hv, dom, result):
    return (result.console, result.reason, domctl.vcpu_clocks(dom), hv.scheduler.slices,
            hv.scheduler.rng.getstate())


AFTER_WRITE = 0x400086  # counter's write_out, after its write system call


@pytest.mark.parametrize("spin,steps,reached", [(3000, 2, NEXT_LINE + 6),
                                                (10, 150, AFTER_WRITE)])
def test_a_run_under_the_debugger_is_the_run_without_it(booted, spin, steps, reached):
    """Two steps inside counter's busy loop; or 150, over its system calls
    (the kernel runs and the slice ends: one step)."""
    cfg = make_config(f"run=counter:4:{spin},hashchain:2:2", vcpus=2)
    hv, dom = booted(cfg)
    plain = _outcome(hv, dom, run_domain(hv, dom))

    hv, dom = booted(cfg)
    stops: list[tuple[int, str, int]] = []
    to_step = 0

    def on_stop(vcpu_id: int, why: str) -> None:
        nonlocal to_step
        stops.append((vcpu_id, why, domctl.gdbsx_getregs(dom, vcpu_id)["rip"]))
        if why == STOP_BREAKPOINT and not to_step:
            to_step = steps
        if to_step:  # steps after each breakpoint, then on to the next
            to_step -= 1
            domctl.debug_op_single_step(dom, vcpu_id)

    domctl.debug_attach(hv, dom, on_stop, lambda: False)
    domctl.debug_breakpoint(dom, NEXT_LINE, True)
    debugged = _outcome(hv, dom, run_domain(hv, dom))

    assert debugged == plain
    # counter's next_line: mov %r13,%rcx (3 bytes), then dec %rcx (3 bytes)
    assert [s[1:] for s in stops[:3]] == [(STOP_BREAKPOINT, NEXT_LINE),
                                          (STOP_STEP, NEXT_LINE + 3), (STOP_STEP, NEXT_LINE + 6)]
    # counter's 4 lines; hashchain has an instruction there too
    assert {rip for _, why, rip in stops if why == STOP_BREAKPOINT} == {NEXT_LINE}
    assert len([s for s in stops if s[1] == STOP_BREAKPOINT]) >= 4
    assert len([s for s in stops if s[1] == STOP_STEP]) >= 2 * steps
    assert reached in {rip for _, why, rip in stops if why == STOP_STEP}


def test_registers_and_memory_of_a_stopped_vcpu(booted):
    hv, dom = booted(make_config("run=counter:2:10"))
    seen = {}

    def on_stop(vcpu_id: int, why: str) -> None:
        regs = domctl.gdbsx_getregs(dom, vcpu_id)
        seen.setdefault("rbx", regs["rbx"])  # counter's line number
        seen.setdefault("code", domctl.gdbsx_guestmemio(hv, dom, vcpu_id, regs["rip"], 3))
        seen.setdefault("unmapped", domctl.gdbsx_guestmemio(hv, dom, vcpu_id, 0x1000, 8))
        assert domctl.gdbsx_setreg(dom, vcpu_id, "rax", 0x1234)
        assert domctl.gdbsx_getregs(dom, vcpu_id)["rax"] == 0x1234
        assert not domctl.gdbsx_setreg(dom, vcpu_id, "cs", 0)
        domctl.debug_detach(dom)

    domctl.debug_attach(hv, dom, on_stop, lambda: False)
    domctl.debug_breakpoint(dom, NEXT_LINE, True)
    r = run_domain(hv, dom)
    assert r.reason == "poweroff"
    assert b"counter 2\n" in r.console  # detached, the guest ran on to its end
    assert seen == {"rbx": 1, "code": bytes.fromhex("4c89e9"), "unmapped": None}
    assert all(v.debug is None for v in dom.vcpus)


def test_a_debugger_needs_the_deterministic_clock(booted):
    hv, dom = booted(make_config(), clock="fast")
    with pytest.raises(domctl.DomctlError, match="deterministic clock"):
        domctl.debug_attach(hv, dom, lambda vcpu_id, why: None, lambda: False)
    assert all(v.debug is None for v in dom.vcpus)
