"""Portable hypercall cases for event channels, sched_op, vcpu_op, callbacks, traps,
xen_version, console_io and vm_assist.
The step format is described in tests/hypercalls/portable.py; the shared
constants are in tests/hypercalls/steps.py."""

from __future__ import annotations

from hypervisor.public.errno import EINVAL, ENOENT, ESRCH
from hypervisor.public.event_channel import (
    EVTCHNOP_alloc_unbound,
    EVTCHNOP_bind_interdomain,
    EVTCHNOP_bind_ipi,
    EVTCHNOP_bind_vcpu,
    EVTCHNOP_bind_virq,
    EVTCHNOP_close,
    EVTCHNOP_send,
    EVTCHNOP_status,
    EVTCHNOP_unmask,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_ipi,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
)
from hypervisor.public.xen import (
    DOMID_SELF,
    VIRQ_DEBUG,
    VIRQ_DEBUGGER,
    VIRQ_ENOMEM,
    Hypercall,
)
from tests.hypercalls.steps import OWN_DOMID

EVTCHN = Hypercall.event_channel_op
BAD_PORT = 5000  # beyond every port of the 2-level ABI (4096)

# A struct step keeps its buffer's words (out0..out7) for the next steps; Xen
# writes each struct back whole, so a port given back, or echoed by the next
# command on it, stays in the buffer until a later struct overwrites it.


def evtchn(cmd: int, fields: list, rc: int) -> tuple:
    return ("struct", fields, EVTCHN, cmd, "buf", rc)


def close(port: object) -> tuple:
    return evtchn(EVTCHNOP_close, [port], 0)


def status(port: object, rc: int = 0) -> tuple:
    """EVTCHNOP_status of one's own port: struct evtchn_status {dom, port,
    status, vcpu, union}; the state comes back in word 2, the vcpu in word 3."""
    return evtchn(EVTCHNOP_status, [DOMID_SELF, port, 0, 0, 0, 0], rc)


EVTCHN_CASES: dict[str, list[tuple]] = {
    # event_channel.c evtchn_bind_virq, virq_is_global: VIRQ_DEBUGGER is global
    "bind_virq_debugger_vcpu1": [evtchn(EVTCHNOP_bind_virq, [VIRQ_DEBUGGER, 1, 0], -EINVAL)],
    # evtchn_unmask: port_is_valid covers the whole first bucket, port 0 and free ports too
    "unmask_port0_and_free_port": [evtchn(EVTCHNOP_unmask, [0], 0),
                                   evtchn(EVTCHNOP_unmask, [63], 0)],
    # evtchn_bind_vcpu: the vcpu first (-ENOENT); IPI and per-vcpu VIRQ ports do not
    # move (-EINVAL), a global VIRQ's port does
    "bind_vcpu_rules": [
        evtchn(EVTCHNOP_bind_vcpu, [BAD_PORT, 99], -ENOENT),
        evtchn(EVTCHNOP_bind_vcpu, [BAD_PORT, 0], -EINVAL),
        evtchn(EVTCHNOP_bind_ipi, [0, 0], 0),
        evtchn(EVTCHNOP_bind_vcpu, ["out1", 0], -EINVAL), close("out0"),
        evtchn(EVTCHNOP_bind_virq, [VIRQ_DEBUG, 0, 0], 0),
        evtchn(EVTCHNOP_bind_vcpu, ["out2", 0], -EINVAL), close("out0"),
        evtchn(EVTCHNOP_bind_virq, [VIRQ_ENOMEM, 0, 0], 0),
        evtchn(EVTCHNOP_bind_vcpu, ["out2", 0], 0), close("out0")],
    # evtchn_alloc_unbound: the local domain is looked up first
    "alloc_unbound_unknown_domain": [evtchn(EVTCHNOP_alloc_unbound, [77 | DOMID_SELF << 16, 0],
                                            -ESRCH)],
    # evtchn_status: every state, as event_channel.c gives it
    "evtchn_status": [
        status(0), ("word", 2, EVTCHNSTAT_closed),
        status(63), ("word", 2, EVTCHNSTAT_closed),
        status(BAD_PORT, -EINVAL),
        evtchn(EVTCHNOP_status, [77, 0, 0, 0, 0, 0], -ESRCH),
        evtchn(EVTCHNOP_bind_ipi, [0, 0], 0), status("out1"),
        ("word", 2, EVTCHNSTAT_ipi), ("word", 3, 0), close("out1"),
        evtchn(EVTCHNOP_bind_virq, [VIRQ_DEBUG, 0, 0], 0), status("out2"),
        ("word", 2, EVTCHNSTAT_virq), ("word", 4, VIRQ_DEBUG), close("out1")],
    # evtchn_bind_interdomain to one's own unbound port (loopback); status of
    # both ends; closing one end leaves the other unbound again. Ports: U in
    # out1 after alloc_unbound, L in out2 after the bind; status(L) gives back
    # L in out1 and U in out5 (u.interdomain.port)
    "evtchn_loopback": [
        evtchn(EVTCHNOP_alloc_unbound, [DOMID_SELF | DOMID_SELF << 16, 0], 0),
        status("out1"), ("word", 2, EVTCHNSTAT_unbound), ("word", 4, OWN_DOMID),
        evtchn(EVTCHNOP_bind_interdomain, [DOMID_SELF, "out1", 0], 0),
        status("out2"), ("word", 2, EVTCHNSTAT_interdomain), ("word", 4, OWN_DOMID),
        evtchn(EVTCHNOP_send, ["out1"], 0),
        close("out1"), status("out5"), ("word", 2, EVTCHNSTAT_unbound),
        close("out1")],
}

CASES: dict[str, list[tuple]] = {**EVTCHN_CASES}
