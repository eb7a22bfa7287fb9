"""A new driver touches no core file: tests/kernels/demodrv.py is the guest
kernel plus one driver in a file of its own, which registers its irq
handler, its PM callbacks and a xenbus watch. It gets its interrupt, its
watch event and its freeze and thaw, with events.py, pm.py, freezer.py,
suspend.py and stop_machine.py as they are."""

from __future__ import annotations

import re
from dataclasses import replace

from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.session import boot, run_domain
from tests.conftest import make_config

MS = 1_000_000


def test_a_driver_in_its_own_file_gets_its_irq_watch_and_pm_callbacks():
    cfg = replace(make_config("run=counter:2:3000000", vcpus=2), kernel="tests.kernels.demodrv")
    hv, dom = boot(cfg)
    try:
        r = run_domain(hv, dom, until_ns=5 * MS)
        m = re.search(r"demodrv: port (\d+), irq (\d+)", r.console.decode())
        assert m, r.console.decode()
        port, irq = int(m.group(1)), int(m.group(2))
        dom.evtchn.set_pending(port)  # dom0 signals the driver
        r = run_domain(hv, dom, requests=[parse_request("8ms demo/knock=1"),
                                          parse_request("12ms suspend")])
        out = dom.console_out.decode()
        assert r.reason == "poweroff", out + dom.crash_report
    finally:
        hv.close()
    assert f"[cpu0] demodrv: interrupt on irq {irq}, dev_id 0xd0" in out
    # a watch fires once when it is registered (as Xen's does), then for the knock
    assert out.count("[cpu0] demodrv: watch fired on demo/knock") == 2
    pm = [line for line in out.splitlines() if "demodrv0:" in line]
    assert pm == ["[cpu0] demodrv0: freeze", "[cpu0] demodrv0: freeze_noirq",
                  "[cpu0] demodrv0: thaw_noirq", "[cpu0] demodrv0: thaw"]
