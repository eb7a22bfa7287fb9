"""The graded tests of lab virtio-reset.

One explore of the handout's guest with the student's kernel (and one with
the reference's, to know which schedules leave an interrupt half handled at
the freeze): each seed a schedule forked at 2.9 ms, just before the suspend,
with the balloon's events thrown at every third slice from there. The tests
read the groups of outcomes: a vring callback on a deleted queue (the
FAILURE line), told as its schedule's story, and the flush's line where the
reference's reset finished a half-handled interrupt.
"""

from __future__ import annotations

import json
import re
from typing import Any

from labs.gradelib import Ctx, Result, fail, test

SEEDS = range(1, 41)       # the grader's default; --seed narrows it to one
QUICK = range(1, 9)        # the test suite's gradings (gradelib.QUICK_ENV)
FORK, UNTIL, EVERY = "2900us", "3300us", 3
RESULTS = "FAILURE|finished the interrupt|held back"
FLUSHED = "reset: finished the interrupt that cpu1 had half handled"
STORY = re.compile(r"at 3\.00\d ms|dpm_suspend_start|frozen:|FAILURE|finished the interrupt|"
                   r"dpm_resume_end|thawed|held back")


def explore_args(t: Ctx, json_path: str) -> list[object]:
    seeds = ",".join(str(s) for s in t.seeds(SEEDS, quick=QUICK))
    return ["explore", t.data("race.toml"), "--fork-at", FORK, "--until", UNTIL,
            "--seeds", seeds, "--inject-every", EVERY, "--inject-slices",
            "--results", RESULTS, "--json", json_path, "-j", max(1, t.jobs)]


def groups(t: Ctx, r: Result, path: str, whose: str) -> list[dict[str, Any]]:
    if r.rc not in (0, 1):
        fail(t, f"pvlab explore did not run with {whose} kernel:\n{r.tail()}")
    with open(path) as f:
        return json.load(f)["groups"]


@test(0, "the explorer over the handout's schedules, with events thrown at the freeze")
def explored(t: Ctx) -> dict[str, Any]:
    mine, ref = t.out("explore.json"), t.out("reference.json")
    r = t.pvlab(*explore_args(t, str(mine)), timeout=300)
    got = groups(t, r, str(mine), "your")
    want = groups(t, t.pvlab(*explore_args(t, str(ref)), timeout=300, reference=True),
                  str(ref), "the reference's")
    return {"mine": got, "reference": want}


def seeds_with(found: list[dict[str, Any]], text: str) -> set[int]:
    return {s for g in found for s in g["seeds"] if any(text in x for x in g["results"])}


def ran(t: Ctx, found: list[dict[str, Any]]) -> None:
    """Every run ran to the time limit; else why not, in the lab's terms."""
    for g in found:
        if g["reason"] in ("running", "poweroff") and not g["trouble"]:
            continue
        t.seed = g["seeds"][0]
        stub = re.search(r"lab virtio-reset: (\w+)", g["trouble"] + g["tail"])
        if stub:
            fail(t, f"the guest stopped in {stub.group(1)}, which is still the starting "
                 "point's stub (NotImplementedError): write it (the handout, 'What to write').")
        fail(t, f"under seed {g['seeds'][0]} the run ended '{g['reason']}': {g['trouble']}\n"
             + "\n".join("      " + x for x in g["tail"].splitlines())
             + f"\nThe run: pvlab lab run virtio-reset -- {g['replay'].removeprefix('pvlab ')}")


def story(t: Ctx, g: dict[str, Any]) -> str:
    """A failing schedule told from its console: the lines of the suspend,
    the freeze, the flush and the failure, in the order they came."""
    seed = g["seeds"][0]
    args = g["replay"].split()[1:]
    r = t.pvlab(*args)
    lines = [x for x in r.out.splitlines() if STORY.search(x)]
    thrown = g["thrown"][:3]
    return ("\n".join("      " + x for x in lines[:14])
            + (f"\n    the injector threw the balloon's events at: {'; '.join(thrown)}"
               if thrown else "")
            + f"\n    (seed {seed}; every line of it: pvlab lab run virtio-reset -- "
              f"{' '.join(args)})")


@test(15, "no vring callback on a queue the freeze deleted, whatever the schedule",
      parent=explored)
def no_late_callback(t: Ctx) -> None:
    found = t.parent["mine"]
    ran(t, found)
    bad = [g for g in found if any("FAILURE" in x for x in g["results"])]
    if not bad:
        return
    g = bad[0]
    t.seed = g["seeds"][0]
    queues = sorted({m for x in g["results"] for m in re.findall(r"queue (\d+)", x)})
    fail(t, f"under {sum(len(b['seeds']) for b in bad)} of the schedules a queue's interrupt "
         f"was handled after the freeze had reset the device and deleted the queue (queues "
         f"{', '.join(queues)}). The story of seed {g['seeds'][0]}:\n{story(t, g)}\n"
         "The balloon's interrupt is bound to cpu1. cpu1 took its hard half "
         "(vm_interrupt: InterruptStatus read and acknowledged, the queues noted) before "
         "the suspend reached the freeze; its thread had not run yet when cpu0 froze the "
         "balloon, reset it and deleted its queues; then cpu1 ran the thread, and "
         "vring_interrupt found a queue that is gone. Nothing orders the reset and a "
         "handler on another cpu, unless the reset makes it so: virtio_reset_device "
         "breaks every queue (vring_interrupt then calls no callback) and flushes the "
         "handlers in progress (virtio_synchronize_cbs, the transport's synchronize_cbs) "
         "before it writes status 0.")


@test(10, "the reset finishes the interrupt another cpu left half handled", parent=explored)
def flushes(t: Ctx) -> None:
    found, want = t.parent["mine"], t.parent["reference"]
    ran(t, found)
    expected, got = seeds_with(want, FLUSHED), seeds_with(found, FLUSHED)
    if not expected or got:
        return
    t.seed = min(expected)
    shown = ", ".join(str(s) for s in sorted(expected)[:8])
    fail(t, f"under {len(expected)} of the schedules (seeds {shown}"
         f"{', ...' if len(expected) > 8 else ''}) cpu1 had taken the balloon's interrupt "
         "half (the hard half ran, its thread woken and not run) when cpu0 reset the "
         "device at the freeze. The reference's reset finishes that thread there and says "
         f"'{FLUSHED}'; yours never did, so the thread ran later, after the reset. That is "
         "what the 2011 review asked about: the reset must flush the handlers "
         "(virtio_reset_device calls virtio_synchronize_cbs, whose virtio-mmio "
         "vm_synchronize_cbs runs the woken thread with run_irq_thread and prints that "
         "line).")
