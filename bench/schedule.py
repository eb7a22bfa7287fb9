"""Scheduler benchmark: slices per second of the deterministic scheduler as it
is (seeded choices: the next VCPU among those within a slice of the furthest
behind, a slice length drawn per slice) against the policy it replaced (always
the VCPU furthest behind, fixed slices), on one SMP guest with short slices so
that scheduling is a large part of the work. Measured side by side,
interleaved, in one run; the ratio is the figure (these machines are noisy).

    .venv/bin/python bench/schedule.py [--slice N] [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor.toolstack.config import DomainConfig  # noqa: E402
from hypervisor.toolstack.session import boot, run_domain  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
CMDLINE = "run=hashchain:{r}:16,hashchain:{r}:16,counter:4:{c},counter:4:{c}"


def slices_per_second(seeded: bool, rounds: int, slice_insns: int) -> tuple[float, int]:
    cmdline = CMDLINE.format(r=rounds, c=rounds * 20_000)
    hv, dom = boot(DomainConfig("bench", 32, 4, IMAGE, cmdline, 1), slice_insns=slice_insns)
    sched = hv.scheduler
    if not seeded:  # the policy before: furthest behind, fixed slices
        sched.pick = lambda runnable, first: min(runnable, key=lambda x: x.clock)
        sched.slice_length = lambda: slice_insns
    t = time.perf_counter()
    r = run_domain(hv, dom)
    seconds = time.perf_counter() - t
    hv.close()
    assert r.reason == "poweroff", dom.crash_report
    return sched.slices / seconds, sched.slices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slice", type=int, default=5_000, help="instructions a slice (5000)")
    ap.add_argument("--rounds", type=int, default=10, help="hashchain rounds (default 10)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, best kept (default 3)")
    a = ap.parse_args()
    runs: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
    for _ in range(a.repeat):  # interleaved: both see the same machine conditions
        for seeded in (False, True):
            runs[seeded].append(slices_per_second(seeded, a.rounds, a.slice))
    before, after = (max(runs[k]) for k in (False, True))
    print(f"4 VCPUs, slices of {a.slice:,} instructions; best of {a.repeat}, interleaved")
    print(f"  furthest behind, fixed slices  {before[0]:10,.0f} slices/s ({before[1]:,} slices)")
    print(f"  seeded choices                 {after[0]:10,.0f} slices/s ({after[1]:,} slices)")
    print(f"  seeded / before                {after[0] / before[0]:10.2f}x")


if __name__ == "__main__":
    main()
