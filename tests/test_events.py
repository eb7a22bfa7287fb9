"""Event channels across VCPUs (xen/common/event_channel.c, event_2l.c): an IPI
bound to vcpu1 wakes it from SCHEDOP_block and arrives as an upcall on vcpu1;
while the port is masked nothing is delivered, and unmasking a pending port
raises the upcall then."""

from __future__ import annotations

from dataclasses import replace

from hypervisor.toolstack.session import boot, run_domain
from tests.conftest import make_config
from tests.kernels import ipi


def run_ipi(masked: bool) -> tuple[str, list[str]]:
    ipi.MASKED = masked
    hv, dom = boot(replace(make_config(vcpus=2), kernel="tests.kernels.ipi"))
    try:
        r = run_domain(hv, dom)
        return r.reason + (f": {dom.crash_report}" if dom.crash_report else ""), list(ipi.LOG)
    finally:
        ipi.MASKED = False
        hv.close()


def test_ipi_wakes_the_target_vcpu_with_an_upcall():
    reason, log = run_ipi(masked=False)
    assert reason == "poweroff"
    assert log[0].startswith("bind_ipi 0 port ")
    assert log[1:4] == ["init 0", "up 0", "send 0"]
    assert "upcall on vcpu1" in log
    assert "vcpu0 unmasks" not in log


def test_masked_port_delivers_only_after_unmask():
    reason, log = run_ipi(masked=True)
    assert reason == "poweroff"
    assert log.index("vcpu1 blocks") < log.index("vcpu0 unmasks") < log.index("upcall on vcpu1")
