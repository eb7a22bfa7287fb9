"""A new driver touches no core file: tests/kernels/demodrv.py is the guest
kernel plus one driver in a file of its own, which registers its irq
handler, its PM callbacks and a xenbus watch. It gets its interrupt, its
watch event and its freeze and thaw, with events, pm.py, freezer.py,
suspend.py and stop_machine.py as they are.

The domain runs in a fresh interpreter: importing a driver builds it into
every kernel of the process (as linking does), and the other tests boot the
kernel without it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import re
from dataclasses import replace
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.session import boot, run_domain
from tests.conftest import make_config

MS = 1_000_000
cfg = replace(make_config("run=counter:2:3000000", vcpus=2), kernel="tests.kernels.demodrv")
hv, dom = boot(cfg)
r = run_domain(hv, dom, until_ns=5 * MS)
m = re.search(r"demodrv: port (\\d+), irq (\\d+)", r.console.decode())
dom.evtchn.set_pending(int(m.group(1)))  # dom0 signals the driver
r = run_domain(hv, dom, requests=[parse_request("8ms demo/knock=1"),
                                  parse_request("12ms suspend")])
print(r.reason)
print(dom.console_out.decode())
"""


def test_a_driver_in_its_own_file_gets_its_irq_watch_and_pm_callbacks():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    reason, out = run.stdout.split("\n", 1)
    assert reason == "poweroff", out
    irq = re.search(r"demodrv: port \d+, irq (\d+)", out).group(1)
    assert f"[cpu0] demodrv: interrupt on irq {irq}, dev_id 0xd0" in out
    # a watch fires once when it is registered (as Xen's does), then for the knock
    assert out.count("[cpu0] demodrv: watch fired on demo/knock") == 2
    pm = [line for line in out.splitlines() if "demodrv0:" in line]
    assert pm == ["[cpu0] demodrv0: freeze", "[cpu0] demodrv0: freeze_noirq",
                  "[cpu0] demodrv0: thaw_noirq", "[cpu0] demodrv0: thaw"]



def test_the_core_imports_no_driver():
    """Only boot builds the drivers in (it imports guestos.drivers); the code
    that keeps the tables they register in imports none of them."""
    from tests.test_layering import imports
    bad = [(p.name, m) for p, m in imports("guestos")
           if p.parent.name == "guestos" and p.name != "boot.py"
           and m.startswith("guestos.drivers")]
    assert bad == []
