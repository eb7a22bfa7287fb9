"""The guest's device files (guestos/fs.py): a node a driver made, opened by
name from a user program, read (waiting while the driver has nothing) and
written, closed, and a closed descriptor refused. tests/kernels/fsdev.py is
the kernel with a loopback node; it runs in a fresh interpreter (importing
a driver builds it into every kernel of the process)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
from dataclasses import replace
from hypervisor.toolstack.session import boot, run_domain
from tests.conftest import make_config

cfg = replace(make_config("run=fdtest:0,fdtest:1"), kernel="tests.kernels.fsdev")
hv, dom = boot(cfg)
r = run_domain(hv, dom, until_ns=200_000_000)
print(r.reason)
print(dom.console_out.decode())
"""


def test_a_read_waits_for_the_write_and_a_closed_descriptor_is_refused():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    reason, out = run.stdout.split("\n", 1)
    assert "fsdev: loop0 is node 0" in out
    # the reader (task 1) ran first and waited; the writer's line reached it
    assert out.index("task 2 exited with code 0") < out.index("fdtest: a line through loop0")
    assert out.count("fdtest: a line through loop0") == 1
    assert "task 1 exited with code 0" in out, out
    assert reason == "poweroff", out
