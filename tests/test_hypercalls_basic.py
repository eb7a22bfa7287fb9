"""Hypercall results and errors from the Python kernel path of a booted domain:
each checks Xen's exact value (hypervisor/public/errno.py), in the manner of XTF.
Sources: xen/common/kernel.c (xen_version), drivers/char/console.c
(console_io), common/domain.c (vcpu_op), common/event_channel.c, common/sched/core.c."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from hypervisor.public.errno import EEXIST, EFAULT, EINVAL, ENOENT, ENOSYS, EPERM
from hypervisor.public.event_channel import (
    EVTCHNOP_bind_ipi,
    EVTCHNOP_bind_virq,
    EVTCHNOP_close,
    EVTCHNOP_send,
    EVTCHNOP_unmask,
)
from hypervisor.public.sched import SCHEDOP_shutdown
from hypervisor.public.vcpu import VCPUOP_is_up, VCPUOP_up
from hypervisor.public.xen import (
    NR_VIRQS,
    VIRQ_DEBUGGER,
    VIRQ_TIMER,
    VIRQ_XENOPROF,
    VIRQ_XENPMU,
    CONSOLEIO_write,
    Hypercall,
    XENVER_pagesize,
    XENVER_version,
)
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config
from tests.kernels import probe


@pytest.fixture
def run_probe(booted):
    """run_probe(fn, vcpus=2): the probe kernel calls ``fn(cpu)``; what it
    returned, and the domain."""
    def run(fn, vcpus=2):
        probe.PROBE = fn
        try:
            hv, dom = booted(replace(make_config(vcpus=vcpus), kernel="tests.kernels.probe"))
            r = run_domain(hv, dom)
            assert r.reason == "poweroff", dom.crash_report
            return probe.RESULT[0], dom
        finally:
            probe.PROBE = None
    return run


def test_unknown_hypercall_is_enosys(run_probe):
    rc, _ = run_probe(lambda cpu: [cpu.hypercall(n) for n in (11, 44, 63, 127)])
    assert rc == [-ENOSYS] * 4


def test_xen_version(run_probe):
    rc, _ = run_probe(lambda cpu: (cpu.hypercall(Hypercall.xen_version, XENVER_version, 0),
                                   cpu.hypercall(Hypercall.xen_version, XENVER_pagesize, 0),
                                   cpu.hypercall(Hypercall.xen_version, 99, 0)))
    assert rc == ((4 << 16) | 19, 4096, -ENOSYS)


def test_console_io_write_and_fault(run_probe):
    """A domU may write (a debug build's xsm_console_io, include/xsm/dummy.h);
    any other command is refused before it is looked at: -EPERM."""
    def fn(cpu):
        buf = probe.scratch(cpu)
        cpu.write(buf, b"probe says hi\n")
        return (cpu.hypercall(Hypercall.console_io, CONSOLEIO_write, 14, buf),
                cpu.hypercall(Hypercall.console_io, CONSOLEIO_write, 4, 0x1000),
                cpu.hypercall(Hypercall.console_io, 7, 0, 0))
    rc, dom = run_probe(fn)
    assert rc == (0, -EFAULT, -EPERM)
    assert dom.console_out == b"probe says hi\n"


def test_vcpu_op_errors(run_probe):
    def fn(cpu):
        return (cpu.hypercall(Hypercall.vcpu_op, VCPUOP_is_up, 0, 0),
                cpu.hypercall(Hypercall.vcpu_op, VCPUOP_is_up, 1, 0),
                cpu.hypercall(Hypercall.vcpu_op, VCPUOP_is_up, 2, 0),
                cpu.hypercall(Hypercall.vcpu_op, VCPUOP_up, 1, 0),   # never initialised
                cpu.hypercall(Hypercall.vcpu_op, 99, 0, 0))
    rc, _ = run_probe(fn)
    assert rc == (1, 0, -ENOENT, -EINVAL, -ENOSYS)


def _evtchn(cpu, cmd, fmt, *vals):
    buf = probe.scratch(cpu)
    cpu.write(buf, struct.pack(fmt, *vals))
    rc = cpu.hypercall(Hypercall.event_channel_op, cmd, buf)
    return rc, struct.unpack(fmt, cpu.read(buf, struct.calcsize(fmt)))


def test_event_channel_ops(run_probe):
    def fn(cpu):
        rc1, (_, _, port) = _evtchn(cpu, EVTCHNOP_bind_virq, "<III", VIRQ_TIMER, 0, 0)
        rc2, _ = _evtchn(cpu, EVTCHNOP_bind_virq, "<III", VIRQ_TIMER, 0, 0)      # again
        rc3, _ = _evtchn(cpu, EVTCHNOP_bind_virq, "<III", NR_VIRQS, 0, 0)        # no such virq
        rc4, (_, ipi) = _evtchn(cpu, EVTCHNOP_bind_ipi, "<II", 1, 0)
        rc5, _ = _evtchn(cpu, EVTCHNOP_send, "<I", ipi)
        rc6, _ = _evtchn(cpu, EVTCHNOP_send, "<I", port)                         # virq: no
        rc7, _ = _evtchn(cpu, EVTCHNOP_unmask, "<I", ipi)
        rc8, _ = _evtchn(cpu, EVTCHNOP_close, "<I", ipi)
        rc9, _ = _evtchn(cpu, EVTCHNOP_close, "<I", ipi)                         # twice
        rc10 = cpu.hypercall(Hypercall.event_channel_op, 99, 0)
        return (rc1, port > 0, rc2, rc3, rc4, ipi > port, rc5, rc6, rc7, rc8, rc9, rc10)
    rc, _ = run_probe(fn)
    assert rc == (0, True, -EEXIST, -EINVAL, 0, True, 0, -EINVAL, 0, 0, -EINVAL, -ENOSYS)


def test_bind_virq_per_vcpu_or_global(run_probe):
    """Xen's virq_is_global (common/event_channel.c): VIRQ_TIMER, VIRQ_DEBUG,
    VIRQ_XENOPROF and VIRQ_XENPMU are per-vcpu and bind on any vcpu; every other
    virq is global and binds on vcpu 0 only (-EINVAL elsewhere), VIRQ_DEBUGGER
    (6) among them. pvlab had 6 where XENOPROF (7) belongs, and no XENPMU."""
    def fn(cpu):
        return tuple(_evtchn(cpu, EVTCHNOP_bind_virq, "<III", virq, 1, 0)[0]
                     for virq in (VIRQ_XENOPROF, VIRQ_XENPMU, VIRQ_DEBUGGER))
    rc, _ = run_probe(fn)
    assert rc == (0, 0, -EINVAL)


def test_sched_op_shutdown_needs_readable_reason(run_probe):
    rc, _ = run_probe(lambda cpu: (cpu.hypercall(Hypercall.sched_op, SCHEDOP_shutdown, 0x10),
                                   cpu.hypercall(Hypercall.sched_op, 77, 0)))
    assert rc == (-EFAULT, -ENOSYS)


@pytest.mark.parametrize("kernel", ["no.such.module", "1bad"])
def test_bad_kernel_module_is_refused(booted, kernel):
    from hypervisor.toolstack.builder import BuildError
    from hypervisor.toolstack.config import ConfigError, parse_config
    from tests.conftest import GUEST_IMAGE
    data = {"name": "k", "memory": 16, "image": str(GUEST_IMAGE), "kernel": kernel}
    if not all(p.isidentifier() for p in kernel.split(".")):
        with pytest.raises(ConfigError, match="not a Python module name"):
            parse_config(data)
        return
    with pytest.raises(BuildError, match="cannot be imported"):
        booted(parse_config(data))


def test_a_hypervisor_bug_in_a_hypercall_crashes_only_the_domain(booted):
    """An exception inside a hypercall handler is an internal error: it is
    logged and the calling domain crashes with one line; nothing escapes."""
    def boom(vcpu, *args):
        raise RuntimeError("deliberate")

    probe.PROBE = lambda cpu: cpu.hypercall(Hypercall.xen_version, 0, 0)
    cfg = replace(make_config(), kernel="tests.kernels.probe")
    hv, dom = booted(cfg)
    hv.table[Hypercall.xen_version] = boom
    try:
        r = run_domain(hv, dom)
        assert r.reason == "crash"
        assert "internal error in hypercall xen_version: RuntimeError: deliberate" in \
            dom.crash_report
    finally:
        probe.PROBE = None
