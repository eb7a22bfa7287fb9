"""Event channels across VCPUs (xen/common/event_channel.c, event_2l.c): an IPI
bound to vcpu1 wakes it from SCHEDOP_block and arrives as an upcall on vcpu1;
while the port is masked nothing is delivered, and unmasking a pending port
raises the upcall then."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config
from tests.kernels import ipi


@pytest.fixture
def run_ipi(booted):
    """run_ipi(masked): the ipi test kernel's run; its reason and its log."""
    def run(masked: bool) -> tuple[str, list[str]]:
        ipi.MASKED = masked
        try:
            hv, dom = booted(replace(make_config(vcpus=2), kernel="tests.kernels.ipi"))
            r = run_domain(hv, dom)
            return r.reason + (f": {dom.crash_report}" if dom.crash_report else ""), \
                list(ipi.LOG)
        finally:
            ipi.MASKED = False
    return run


def test_ipi_wakes_the_target_vcpu_with_an_upcall(run_ipi):
    reason, log = run_ipi(masked=False)
    assert reason == "poweroff"
    assert log[0].startswith("bind_ipi 0 port ")
    assert log[1:4] == ["init 0", "up 0", "send 0"]
    assert "upcall on vcpu1" in log
    assert "vcpu0 unmasks" not in log


def test_masked_port_delivers_only_after_unmask(run_ipi):
    reason, log = run_ipi(masked=True)
    assert reason == "poweroff"
    assert log.index("vcpu1 blocks") < log.index("vcpu0 unmasks") < log.index("upcall on vcpu1")
