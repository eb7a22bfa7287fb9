"""The graded tests of lab pmorder.

Each test runs the lab's guest (pmorder.toml, with the test's options) through
a suspend and compares the steps it logs, the test devices' callbacks among
them, with the steps the rule gives for that guest: which devices there are in
which registration order, which one fails where, and whether the suspend
hypercall returns 1 (THAW) or 0 (RESTORE). The expected steps are computed
from the rule here, never recorded from a run.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from labs.gradelib import Ctx, Result, diff_lines, test

BASE = "pmorder.toml"
TEST_DEVICES = 3
SUSPEND_AT = "3ms"
UNTIL = "200ms"                 # the guest powers off near 10 ms; one running at 200 is stuck
EBUSY = 16                      # what pmfail= makes a callback return (as -EBUSY)
ORDERS = (False, True)          # registration: testdev0 first, then testdev.order=reverse

# the steps of the suspend path, as the kernel logs them on cpu0
STEP = re.compile(r"^\[cpu\d+\] ((?:PM: |testdev\d+: |xenbus: xs_|suspend: |"
                  r"suspend hypercall returned |freezer: thaw_processes).*)$")
# what a step says beyond its name (counts, frames) is not the rule's business
DETAIL = re.compile(r"^(suspend hypercall returned \d|xenbus: xs_resume|"
                    r"freezer: thaw_processes)\b.*$")


@dataclass(frozen=True)
class Guest:
    """The lab's guest with its options: the test devices' registration order
    and a device (its number in registration order, 0 the console) that
    fails a PM phase."""

    reverse: bool = False
    fail: tuple[int, str] | None = None

    def devices(self) -> list[str]:
        tests = range(TEST_DEVICES)
        return ["xencons0"] + [f"testdev{i}" for i in (tests[::-1] if self.reverse else tests)]

    def options(self) -> str:
        words = ["testdev.order=reverse"] if self.reverse else []
        if self.fail is not None:
            words.append(f"pmfail={self.fail[0]}:{self.fail[1]}")
        return " ".join(words)

    def label(self) -> str:
        return "-".join(["reverse" if self.reverse else "forward"]
                        + ([f"fail{self.fail[0]}-{self.fail[1]}"] if self.fail else []))

    def registered(self) -> str:
        return (f"devices in registration order: {', '.join(self.devices())}"
                + (" (testdev.order=reverse)" if self.reverse else ""))

    def called(self, i: int, phase: str) -> list[str]:
        """Device i's callback, as it logs it (the console logs nothing)."""
        name = self.devices()[i]
        lines = [f"{name}: {phase}"] if name.startswith("testdev") else []
        if self.fail == (i, phase):
            lines.append(f"PM: device {name} failed to {phase}: error -{EBUSY}")
        return lines


# --- the rule: the steps a guest must log --------------------------------------------

def phase_down(g: Guest, phase: str, undo: str) -> tuple[list[str], bool]:
    """A suspend phase, last-registered first; on a failure, the undo of the
    devices it had done, newest first. The steps, and whether it failed."""
    n = len(g.devices())
    steps: list[str] = []
    for i in reversed(range(n)):
        steps += g.called(i, phase)
        if g.fail == (i, phase):
            for j in range(i + 1, n):
                steps += g.called(j, undo)
            return steps, True
    return steps, False


def phase_up(g: Guest, phase: str) -> list[str]:
    """A resume phase, in registration order; a failure stops nothing."""
    return [line for i in range(len(g.devices())) for line in g.called(i, phase)]


def resumed(g: Guest, way: str) -> list[str]:
    """From the suspend hypercall's return on: THAW (1) or RESTORE (0)."""
    cancelled = way == "THAW"
    cb = way.lower()
    return [f"suspend hypercall returned {int(cancelled)}", "PM: sysdev_resume",
            f"PM: dpm_resume_noirq({way})", *phase_up(g, f"{cb}_noirq"),
            "xenbus: xs_suspend_cancel" if cancelled else "xenbus: xs_resume",
            f"PM: dpm_resume_end({way})", *phase_up(g, cb),
            "freezer: thaw_processes", "suspend: done"]


def expected(g: Guest, way: str = "THAW") -> list[str]:
    """The whole suspend path of guest g, THAW or RESTORE after the hypercall."""
    steps = ["suspend: freeze_processes", "PM: dpm_suspend_start(FREEZE)"]
    done, failed = phase_down(g, "freeze", "thaw")
    steps += done
    if failed:
        return steps + ["suspend: dpm_suspend_start failed; aborted", "freezer: thaw_processes"]
    steps += ["xenbus: xs_suspend", "PM: dpm_suspend_noirq(FREEZE)"]
    done, failed = phase_down(g, "freeze_noirq", "thaw_noirq")
    steps += done
    if failed:
        return steps + ["suspend: dpm_suspend_noirq failed; aborted",
                        "xenbus: xs_suspend_cancel", "PM: dpm_resume_end(THAW)",
                        *phase_up(g, "thaw"), "freezer: thaw_processes"]
    steps += ["suspend: stop_machine(xen_suspend) on cpu0", "PM: sysdev_suspend(FREEZE)"]
    return steps + resumed(g, way)


def steps(console: str) -> list[str]:
    """The suspend path's steps a run logged, without their details."""
    found = []
    for line in console.splitlines():
        m = STEP.match(line)
        if m:
            found.append(DETAIL.sub(r"\1", m.group(1)))
    return found


# --- running the guest ---------------------------------------------------------------

def config(t: Ctx, g: Guest) -> Path:
    """The lab's configuration with g's options, written to the scratch directory."""
    base = t.data(BASE)
    cfg = tomllib.loads(base.read_text())
    cfg["image"] = str((base.parent / cfg["image"]).resolve())
    cfg["cmdline"] = f"{cfg['cmdline']} {g.options()}".strip()
    path = t.out(f"{g.label()}.toml")
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in cfg.items()))
    return path


def ran(t: Ctx, r: Result, what: str) -> None:
    """The run must end as the guest powering off, its tasks done."""
    t.check(r.rc == 0, f"{what}: the guest did not power off (pvlab exited {r.rc}). The "
            f"end of the run:\n{r.tail()}\nA kernel oops names the function that raised "
            "(NotImplementedError: a LAB function not written yet).")
    t.check("all programs exited: powering off" in r.out,
            f"{what}: the guest was still running at {UNTIL} of virtual time (the rule's "
            f"code powers off near 10 ms). The end of the run:\n{r.tail()}\nAre the "
            "tasks thawed (freezer.thaw_processes) and the request ended (_worker_done) on "
            "every way out of the suspend?")
    t.check("counter 10" in r.out and "hashchain digest" in r.out,
            f"{what}: the guest powered off but its tasks did not finish:\n{r.tail()}")


def compare(t: Ctx, g: Guest, got: list[str], want: list[str], what: str, rule: str) -> None:
    """The steps logged against the rule's, from a little before the first difference."""
    if got == want:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                 min(len(got), len(want)))
    lo, hi = max(0, first - 3), first + 8
    more = "\n    ..." if hi < max(len(got), len(want)) else ""
    t.fail(f"{what}: the steps differ from the rule's ({g.registered()}):\n"
           + ("    ...\n" if lo else "") + diff_lines(want[lo:hi], got[lo:hi]) + more
           + f"\n{rule}")


FREEZE_RULE = ("The FREEZE phases go from the last registered device to the first (_suspend), "
               "the resume phases from the first to the last (_resume).")
THAW_RULE = ("The suspend hypercall returned 1: the suspend was cancelled or only a "
             "checkpoint, and the guest goes on in the domain it was in: PMSG_THAW, "
             "thaw_noirq then thaw, the store's suspend cancelled (suspend_resume).")
RESTORE_RULE = ("The suspend hypercall returned 0 in the restored guest: a new domain, "
                "PMSG_RESTORE, restore_noirq then restore, the store resumed on its new "
                "ring (suspend_resume, dpm_resume_noirq, dpm_resume_end).")
UNDO_RULE = ("A device that fails a FREEZE phase stops it: the devices that phase had done "
             "get its undo (thaw, or thaw_noirq), the one done last first, and not the "
             "device that failed; then do_suspend undoes its earlier steps, latest first, "
             "and the suspend is aborted: no hypercall, the tasks thawed, the guest goes on.")
RESUME_RULE = ("A resume phase is not undone: the failure is reported and the other devices "
               "are resumed all the same.")


def suspend(t: Ctx, g: Guest, seed: int) -> Result:
    """A suspend request the toolstack cancels (nothing saves the domain)."""
    r = t.pvlab("run", config(t, g), "--request", f"{SUSPEND_AT} suspend", "--seed", seed,
                "--until", UNTIL)
    ran(t, r, f"a suspend at {SUSPEND_AT} ({g.label()})")
    return r


def save_and_restore(t: Ctx, g: Guest, seed: int, what: str, rule: str) -> None:
    """Save g at SUSPEND_AT, restore the image, and compare each run's steps
    with the rule's: the FREEZE path in the save, RESTORE in the restored guest."""
    img = t.out(f"{g.label()}.img")
    r = t.pvlab("save", config(t, g), img, "--at", SUSPEND_AT, "--seed", seed)
    t.check(r.rc == 0 and img.exists(), f"the save ({g.label()}) failed (pvlab exited "
            f"{r.rc}):\n{r.tail()}\nThe save needs the whole FREEZE path up to the suspend "
            "hypercall.")
    want = expected(g, "RESTORE")
    back = want.index("suspend hypercall returned 0")
    compare(t, g, steps(r.out), want[:back], f"{what} (the save)", rule)
    r = t.pvlab("restore", img, "--until", UNTIL)
    ran(t, r, f"the restore of a save at {SUSPEND_AT} ({g.label()})")
    compare(t, g, steps(r.out), want[back:], f"{what} (the restored guest)", rule)


# --- the tests -----------------------------------------------------------------------

@test(10, "a suspend the toolstack cancels: FREEZE, then THAW (seeds 1-3, both orders)")
def suspend_cancelled(t: Ctx) -> None:
    for seed in t.seeds(range(1, 4)):
        for reverse in ORDERS:
            g = Guest(reverse)
            r = suspend(t, g, seed)
            compare(t, g, steps(r.out), expected(g, "THAW"), "a suspend the toolstack "
                    "cancelled (the hypercall returns 1)", FREEZE_RULE + " " + THAW_RULE)


@test(10, "a checkpoint: the image written, the guest goes on by THAW")
def checkpoint(t: Ctx) -> dict[bool, Path]:
    images = {}
    for seed in t.seeds([4]):
        for reverse in ORDERS:
            g = Guest(reverse)
            where = t.out(f"ck-{g.label()}")
            r = t.pvlab("run", config(t, g), "--request", f"{SUSPEND_AT} checkpoint",
                        "--checkpoint-dir", where, "--seed", seed, "--until", UNTIL)
            ran(t, r, f"a checkpoint at {SUSPEND_AT} ({g.label()})")
            compare(t, g, steps(r.out), expected(g, "THAW"), "a checkpoint",
                    FREEZE_RULE + " " + THAW_RULE)
            found = sorted(where.glob("*.img"))
            t.check(found, f"the checkpoint wrote no image in {where}:\n{r.tail()}")
            images[reverse] = found[0]
    return images


@test(10, "the checkpoint restored: the new domain goes on by RESTORE", parent=checkpoint)
def checkpoint_restored(t: Ctx) -> None:
    for reverse, img in t.parent.items():
        g = Guest(reverse)
        r = t.pvlab("restore", img, "--until", UNTIL)
        ran(t, r, f"the restore of a checkpoint ({g.label()})")
        compare(t, g, steps(r.out), resumed(g, "RESTORE"), "the restored checkpoint",
                RESTORE_RULE)


@test(10, "a save and a restore: FREEZE, then RESTORE in the new domain (seeds 5-6)")
def save_restore(t: Ctx) -> None:
    for seed in t.seeds(range(5, 7)):
        for reverse in ORDERS:
            save_and_restore(t, Guest(reverse), seed, "a save, then its restore",
                             FREEZE_RULE + " " + RESTORE_RULE)


def failing(t: Ctx, phase: str, seed: int) -> None:
    """Every device in turn fails ``phase``, in both registration orders."""
    for reverse in ORDERS:
        for dev in range(TEST_DEVICES + 1):
            g = Guest(reverse, (dev, phase))
            r = suspend(t, g, seed)
            t.check("suspend hypercall" not in r.out,
                    f"device {g.devices()[dev]} failed to {phase}, yet the suspend went on "
                    f"to the hypercall ({g.registered()}).\n{UNDO_RULE}")
            compare(t, g, steps(r.out), expected(g), f"device {g.devices()[dev]} failing "
                    f"to {phase}", UNDO_RULE)


@test(10, "a device fails to freeze: the frozen ones thawed, the suspend aborted")
def freeze_fails(t: Ctx) -> None:
    for seed in t.seeds([7]):
        failing(t, "freeze", seed)


@test(10, "a device fails to freeze_noirq: both phases undone, the suspend aborted")
def freeze_noirq_fails(t: Ctx) -> None:
    for seed in t.seeds([8]):
        failing(t, "freeze_noirq", seed)


@test(5, "a device fails to thaw or to restore: reported, the others resumed")
def resume_fails(t: Ctx) -> None:
    for seed in t.seeds([9]):
        g = Guest(False, (2, "thaw"))
        r = suspend(t, g, seed)
        compare(t, g, steps(r.out), expected(g, "THAW"), "testdev1 failing to thaw",
                RESUME_RULE)
        save_and_restore(t, Guest(True, (1, "restore_noirq")), seed,
                         "testdev2 failing to restore_noirq after a restore", RESUME_RULE)
