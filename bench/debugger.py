"""Debugger benchmark: what an attached debugger costs a guest that runs on
(hypervisor/debugger.py). The smp example's workload, a hashchain on each of
four VCPUs, runs without a debugger, with one attached and no breakpoint
(every slice checks for Ctrl-C and stops), and with a breakpoint the guest
never reaches (a code hook on every engine: Unicorn then checks each
instruction it translates against it). The ratios are the figures.

    .venv/bin/python bench/debugger.py [--rounds N] [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor import domctl  # noqa: E402
from hypervisor.toolstack.config import DomainConfig  # noqa: E402
from hypervisor.toolstack.session import boot, run_domain  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
NEVER = 0x7FFF_0000  # no program has code there
WAYS = ("no debugger", "debugger attached", "a breakpoint set")


def seconds(way: str, rounds: int) -> float:
    cmdline = "run=" + ",".join([f"hashchain:{rounds}:16"] * 4)
    hv, dom = boot(DomainConfig("bench", 32, 4, IMAGE, cmdline, 1))
    if way != WAYS[0]:
        domctl.debug_attach(hv, dom, lambda vcpu_id, why: None, lambda: False)
    if way == WAYS[2]:
        domctl.debug_breakpoint(dom, NEVER, True)
    t = time.perf_counter()
    r = run_domain(hv, dom)
    took = time.perf_counter() - t
    hv.close()
    assert r.reason == "poweroff", dom.crash_report
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="hashchain rounds (default 20)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, best kept (default 3)")
    a = ap.parse_args()
    runs: dict[str, list[float]] = {w: [] for w in WAYS}
    for _ in range(a.repeat):  # interleaved: all see the same machine conditions
        for way in WAYS:
            runs[way].append(seconds(way, a.rounds))
    base = min(runs[WAYS[0]])
    print(f"4 VCPUs, a hashchain of {a.rounds} rounds each; best of {a.repeat}, interleaved")
    for way in WAYS:
        best = min(runs[way])
        print(f"  {way:<20} {best:8.3f} s  {best / base:6.2f}x")


if __name__ == "__main__":
    main()
