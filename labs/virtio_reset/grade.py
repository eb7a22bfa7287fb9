"""The graded tests of lab virtio-reset.

Explores of the handout's guest with the student's kernel and with the
reference's (to know which schedules leave an interrupt half handled at the
freeze): each seed a schedule forked at 2.9 ms, just before the suspend,
with the balloon's events thrown at every third slice from there; and the
same under option virtio.nosync. The tests read the result lines of each
seed: a vring callback on a deleted queue (the FAILURE line), told as its
schedule's story; the flush's line and the interrupts the broken queues
refused, and on which cpu, where the reference's reset finished a
half-handled interrupt; the planted bug where the reference shows it.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from labs.gradelib import Ctx, Result, fail, test

SEEDS = range(1, 41)       # the grader's default; --seed narrows it to one
QUICK = range(1, 9)        # the test suite's gradings (gradelib.QUICK_ENV)
FORK, UNTIL, EVERY = "2900us", "3300us", 3
RESULTS = "FAILURE|finished the interrupt|held back|refused"
FLUSHED = "reset: finished the interrupt that cpu1 had half handled"
REFUSED = re.compile(r"an interrupt of queue (\d+) refused on cpu(\d+)")
STORY = re.compile(r"at 3\.00\d ms|dpm_suspend_start|frozen:|FAILURE|finished the interrupt|"
                   r"refused|dpm_resume_end|thawed|held back")
NOSYNC = "virtio.nosync=1"
LAB_RUN = "pvlab lab run virtio-reset --"

Found = list[dict[str, Any]]


def nosync_config(t: Ctx) -> str:
    """The handout's guest with option virtio.nosync=1 (the planted bug), its
    image named from where the copy is."""
    text = t.data("race.toml").read_text()
    image = (t.data("race.toml").parent / "../../firmware/guest.elf").resolve()
    text = text.replace('image = "../../firmware/guest.elf"', f'image = "{image}"')
    text = re.sub(r'^cmdline = "(.*)"$', rf'cmdline = "\1 {NOSYNC}"', text, count=1, flags=re.M)
    path = t.out("race-nosync.toml")
    path.write_text(text)
    return str(path)


def explore_args(t: Ctx, config: str, json_path: str) -> list[object]:
    seeds = ",".join(str(s) for s in t.seeds(SEEDS, quick=QUICK))
    return ["explore", config, "--fork-at", FORK, "--until", UNTIL,
            "--seeds", seeds, "--inject-every", EVERY, "--inject-slices",
            "--results", RESULTS, "--json", json_path, "-j", max(1, t.jobs)]


def groups(t: Ctx, r: Result, path: str, whose: str) -> Found:
    if r.rc not in (0, 1):
        fail(t, f"pvlab explore did not run with {whose} kernel:\n{r.tail()}")
    with open(path) as f:
        return json.load(f)["groups"]


def both(t: Ctx, config: str, name: str) -> dict[str, Found]:
    """The student's groups and the reference's, of the same seeds."""
    mine, ref = t.out(f"{name}.json"), t.out(f"{name}-reference.json")
    got = groups(t, t.pvlab(*explore_args(t, config, str(mine)), timeout=300), str(mine),
                 "your")
    want = groups(t, t.pvlab(*explore_args(t, config, str(ref)), timeout=300,
                             reference=True), str(ref), "the reference's")
    return {"mine": got, "reference": want}


@test(0, "the explorer over the handout's schedules, with events thrown at the freeze")
def explored(t: Ctx) -> dict[str, Found]:
    return both(t, str(t.data("race.toml")), "explore")


@test(0, "the explorer over the same schedules under option virtio.nosync=1")
def explored_nosync(t: Ctx) -> dict[str, Found]:
    return both(t, nosync_config(t), "nosync")


def results(found: Found) -> dict[int, list[str]]:
    """Each seed's result lines."""
    return {s: g["results"] for g in found for s in g["seeds"]}


def seeds_with(found: Found, text: str) -> set[int]:
    return {s for s, lines in results(found).items() if any(text in x for x in lines)}


def refused(lines: list[str]) -> set[tuple[int, int]]:
    """(queue, cpu) of each interrupt the broken queues refused."""
    return {(int(q), int(c)) for x in lines for q, c in REFUSED.findall(x)}


def replay_args(g: dict[str, Any]) -> list[str]:
    """The replay's pvlab arguments (from ``run`` on), whichever way it spells pvlab."""
    args = shlex.split(g["replay"])
    return args[args.index("--") + 1:] if "--" in args else args[1:]


def lab_run(g: dict[str, Any]) -> str:
    return f"{LAB_RUN} {shlex.join(replay_args(g))}"


def ran(t: Ctx, found: Found) -> None:
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
             + f"\nThe run: {lab_run(g)}")


def story(t: Ctx, g: dict[str, Any]) -> str:
    """A schedule told from its console: the lines of the suspend, the
    freeze, the flush, the refusals and the failure, in the order they came."""
    seed = g["seeds"][0]
    r = t.pvlab(*replay_args(g))
    lines = [x for x in r.out.splitlines() if STORY.search(x)]
    thrown = g["thrown"][:3]
    return ("\n".join("      " + x for x in lines[:16])
            + (f"\n    the injector threw the balloon's events at: {'; '.join(thrown)}"
               if thrown else "")
            + f"\n    (seed {seed}; every line of it: {lab_run(g)})")


def group_of(found: Found, seed: int) -> dict[str, Any]:
    return next(g for g in found if seed in g["seeds"])


def shown(seeds: set[int]) -> str:
    first = ", ".join(str(s) for s in sorted(seeds)[:8])
    return f"seeds {first}{', ...' if len(seeds) > 8 else ''}"


@test(10, "no vring callback on a queue the freeze deleted, whatever the schedule",
      parent=explored)
def no_late_callback(t: Ctx) -> None:
    found = t.parent["mine"]
    ran(t, found)
    bad = sorted(seeds_with(found, "FAILURE"))
    if not bad:
        return
    t.seed = bad[0]
    g = group_of(found, bad[0])
    queues = sorted({m for x in g["results"] for m in re.findall(r"queue (\d+)", x)})
    fail(t, f"under {len(bad)} of the schedules ({shown(set(bad))}) a queue's interrupt "
         f"was handled after the freeze had reset the device and deleted the queue (queues "
         f"{', '.join(queues)}). The story of the first of them, seed {bad[0]}:\n"
         f"{story(t, g)}\n"
         "The balloon's interrupt is bound to cpu1. cpu1 took its hard half "
         "(vm_interrupt: InterruptStatus read and acknowledged, the queues noted) before "
         "the suspend reached the freeze; its thread had not run yet when cpu0 froze the "
         "balloon, reset it and deleted its queues; then cpu1 ran the thread, and "
         "vring_interrupt found a queue that is gone. Nothing orders the reset and a "
         "handler on another cpu, unless the reset makes it so: virtio_reset_device "
         "breaks every queue (vring_interrupt then calls no callback) and flushes the "
         "handlers in progress (virtio_synchronize_cbs, the transport's synchronize_cbs) "
         "before it writes status 0.")


@test(8, "the reset finishes the interrupt another cpu left half handled, under every "
         "schedule where the reference's does", parent=explored)
def flushes(t: Ctx) -> None:
    found, want = t.parent["mine"], t.parent["reference"]
    ran(t, found)
    mine = results(found)
    expected = seeds_with(want, FLUSHED)
    missed = {s for s in expected if not any(FLUSHED in x for x in mine[s])}
    if missed:
        t.seed = min(missed)
        fail(t, f"under {len(missed)} of the {len(expected)} schedules where cpu1 had taken "
             f"the balloon's interrupt half ({shown(missed)}: the hard half ran, its thread "
             "woken and not run) when cpu0 reset the device at the freeze, your reset did not "
             f"say '{FLUSHED}', so the thread ran later, after the reset. The reference's "
             "reset finishes that thread there. That is what the 2011 review asked about: "
             "the reset must flush the handlers (virtio_reset_device calls "
             "virtio_synchronize_cbs, whose virtio-mmio vm_synchronize_cbs runs the woken "
             "thread with run_irq_thread and prints that line).")
    late = {s for s in expected if any(cpu != 0 for _q, cpu in refused(mine[s]))}
    if late:
        t.seed = min(late)
        fail(t, f"under {len(late)} of the schedules ({shown(late)}) your reset said "
             f"'{FLUSHED}', and yet cpu1 ran that interrupt's thread afterwards (its broken "
             "queues refused it there). The story of seed "
             f"{min(late)}:\n{story(t, group_of(found, min(late)))}\n"
             "The line is the flush's report, not the flush: vm_synchronize_cbs must run "
             "the woken thread itself, on the resetting cpu (run_irq_thread(cpu, dev.irq), "
             "which says whether there was one), and say so only when it did.")


@test(4, "the reset breaks the queues first: the interrupt it finishes calls no callback",
      parent=explored)
def breaks(t: Ctx) -> None:
    found, want = t.parent["mine"], t.parent["reference"]
    ran(t, found)
    mine, theirs = results(found), results(want)
    bad = {s for s, lines in theirs.items() if refused(lines)
           and any(FLUSHED in x for x in mine.get(s, [])) and not refused(mine.get(s, []))}
    if not bad:
        return
    t.seed = s = min(bad)
    queues = ", ".join(str(q) for q, _cpu in sorted(refused(theirs[s])))
    fail(t, f"under {len(bad)} of the schedules ({shown(bad)}) your reset finished cpu1's "
         "half-handled interrupt, and its thread handed the queues to their callbacks: the "
         f"reference's broken queues ({queues}) refused them there, and said so ('an "
         "interrupt of queue N refused on cpu0'). A callback that runs while the device is "
         "being reset works on a queue about to be deleted. virtio_break_device must mark "
         "every queue of the device broken (vq.broken = 1 for each of dev_vqs(cpu, dev)) "
         "before virtio_reset_device flushes the handlers.")


@test(3, "option virtio.nosync=1 writes status 0 alone (the planted bug)",
      parent=explored_nosync)
def honours_nosync(t: Ctx) -> None:
    found, want = t.parent["mine"], t.parent["reference"]
    ran(t, found)
    expected, got = seeds_with(want, "FAILURE"), seeds_with(found, "FAILURE")
    if expected <= got:
        return
    missed = expected - got
    t.seed = min(missed)
    fail(t, f"under virtio.nosync=1 the reference's reset writes status 0 alone, and under "
         f"{len(expected)} of the schedules ({shown(expected)}) a queue's interrupt is then "
         f"handled after the queue is deleted (its FAILURE line); under {len(missed)} of "
         f"them ({shown(missed)}) yours was not. With dev.nosync set, virtio_reset_device "
         "must neither break the queues nor flush the handlers: the option is how the "
         "handout shows the race your reset closes.")
