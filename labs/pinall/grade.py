"""The grader of lab pinall.

Every test runs the guest of churn.toml, where two spawners build and tear
down address spaces all the time and one construction and one teardown are
held half way (their pgds on the pgd_list, unpinned). What the grader expects
it reads from the console itself: the kernel says when it builds a task,
holds one, lets one go on, and when a task exits. From those lines it knows,
at the moment of each save, which tasks were alive and which of them were
held, independently of the student's code.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

from labs.gradelib import POWER_OFF, Ctx, Result, test

# seed -> the moment of its save, chosen so that the seeds between them save
# with a construction held (2), a construction and a teardown (1), a teardown
# (3), and nothing held, every pgd pinned by its task already (4)
SAVES = {1: "12ms", 2: "4ms", 3: "30ms", 4: "20ms"}
CHECKPOINTS = ("12ms", "20ms")
CONFIG = "churn.toml"

BUILT = re.compile(r"^\[cpu\d+\] task (\d+): \w+ on cpu\d+$|"
                   r"^\[cpu\d+\] task \d+ spawned \w+ as task (\d+)$")
HELD = re.compile(r"^\[cpu\d+\] task (\d+): (construction|teardown) held")
GOES_ON = re.compile(r"^\[cpu\d+\] task (\d+): (construction|teardown) goes on")
EXITED = re.compile(r"^\[cpu\d+\] task (\d+) exited")
LISTED = re.compile(r"pgd_list: (\d+) pgds, (\d+) of them unpinned")
PINNED = re.compile(r"xen_mm_pin_all: (\d+) unpinned pgds pinned")
UNPINNED = re.compile(r"xen_mm_unpin_all: (\d+) SavePinned pgds unpinned")


@dataclass
class Moment:
    """The tasks at one save's freeze, as the console tells them."""
    live: set[int]
    held: set[int]
    listed: tuple[int, int] | None = None   # the kernel's "pgd_list: N pgds, U unpinned"
    pinned: int | None = None               # xen_mm_pin_all's count
    unpinned: int | None = None             # xen_mm_unpin_all's count


@dataclass
class Saved:
    """One seed's save, for the tests that follow it."""
    at: str
    image: str
    run: Result
    moment: Moment
    expected: list[str] = field(default_factory=list)   # the results of a run without a save


def config(t: Ctx) -> str:
    """churn.toml, named from where the grade runs if it is below it (the top
    of the checkout, for a student), so that the replay commands read short."""
    path = t.data(CONFIG)
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def moments(console: str) -> list[Moment]:
    """One Moment per suspend in the console, in order."""
    live: set[int] = set()
    held: set[int] = set()
    found: list[Moment] = []
    for line in console.splitlines():
        if "suspend: freeze_processes" in line:
            found.append(Moment(set(live), set(held)))
        elif found and (m := LISTED.search(line)) and found[-1].listed is None:
            found[-1].listed = (int(m.group(1)), int(m.group(2)))
        elif found and (m := PINNED.search(line)):
            found[-1].pinned = int(m.group(1))
        elif found and (m := UNPINNED.search(line)):
            found[-1].unpinned = int(m.group(1))
        else:
            _follow(line, live, held)
    return found


def _follow(line: str, live: set[int], held: set[int]) -> None:
    """A task's life as the kernel reports it: built, held, going on, exited."""
    if m := BUILT.match(line):
        live.add(int(m.group(1) or m.group(2)))
    elif m := HELD.match(line):
        live.add(int(m.group(1)))
        held.add(int(m.group(1)))
    elif m := GOES_ON.match(line):
        held.discard(int(m.group(1)))
        if m.group(2) == "teardown":
            live.discard(int(m.group(1)))
    elif m := EXITED.match(line):
        live.discard(int(m.group(1)))


def results(console: str) -> list[str]:
    """What the programs printed of their results, in an order-free form."""
    return sorted(line for line in console.splitlines()
                  if line.startswith(("hashchain digest", "counter ", "hello", "spawner")))


def pids(tasks: set[int]) -> str:
    return ", ".join(map(str, sorted(tasks))) or "none"


def crash(r: Result) -> str:
    """The lines that say why a run ended badly."""
    lines = [line for line in (r.out + r.err).splitlines()
             if "Kernel panic" in line or line.startswith("pvlab:")]
    return "\n".join("  " + line for line in lines[-3:]) or r.tail()


PIN_REFUSED = "Xen refused to pin a pgd (EINVAL): it was pinned already. "
# the crashes this lab's mistakes cause, a hint for each: the first whose
# pattern the run's output matches (across lines) is given
HINTS = [
    (r"suspend hypercall returned 0.*xen_mm_unpin_all: 0 .*pinning pgd \S+ failed: -22",
     PIN_REFUSED + "After the restore xen_mm_unpin_all found no pgd to unpin, so a held "
     "construction went on and pinned its pgd again. Did xen_mm_pin_all mark the pgds it "
     "pinned PG_SAVEPINNED? Is the pgd_list kept in guest memory? The restored kernel runs "
     "in a new process, where only guest memory came along."),
    (r"suspend hypercall returned.*pinning pgd \S+ failed: -22",
     PIN_REFUSED + "After the resume a held construction went on and pinned its pgd, which "
     "the save had pinned: xen_mm_unpin_all must unpin every pgd marked PG_SAVEPINNED (and "
     "xen_mm_pin_all must mark the pgds it pins)."),
    (r"pinning pgd \S+ failed: -22",
     PIN_REFUSED + "xen_mm_pin_all pins only the pgds that are not pinned (pgd_pinned)."),
    (r"update_va_mapping of pfn \S+ failed: -16",
     "Xen refused to make a pagetable page writable again (EBUSY): the table is still in "
     "use. xen_mm_unpin_all unpinned a pgd the save had not pinned, one a running task "
     "uses: only the pgds marked PG_SAVEPINNED are unpinned."),
    (r"unpinning pgd \S+ failed: -22",
     "Xen refused to unpin a pgd (EINVAL): it was not pinned. Was it unpinned twice, once "
     "by xen_mm_unpin_all and once by its task's exit?"),
    (r"while it is pinned",
     "a held teardown went on and found its pgd pinned again: who unpins it?"),
    (r"stale mfn",
     "a pgd went through the save unpinned, so the toolstack never turned its machine "
     "frame numbers into pfns, and on the new machine they name nothing of the guest's."),
    (r"'NoneType'",
     "a function returned None where the kernel wanted a number: xen_mm_pin_all and "
     "xen_mm_unpin_all return how many pgds they pinned or unpinned."),
    (r"is not on the pgd_list",
     "pgd_list_del did not find a pgd on the list. Did pgd_list_add put it there, in guest "
     "memory? After a restore the kernel runs in a new process, and only guest memory came "
     "along."),
    (r"pgd_list is full",
     "pgd_list_add found no empty slot: do freed pgds come off the list?"),
]


def why(r: Result) -> str:
    """A hint for a crash: the unwritten function, or what the crash usually means."""
    text = r.out + r.err
    if m := re.search(r"NotImplementedError: lab pinall: (\w+)", text):
        return f"{m.group(1)} is still the starting point's: write it."
    return next((hint for pattern, hint in HINTS if re.search(pattern, text, re.S)), "")


def check_ran(t: Ctx, r: Result, what: str) -> None:
    t.check(r.rc == 0, f"{what} failed:\n{crash(r)}\n{why(r)}".rstrip())


def check_moment(t: Ctx, m: Moment, r: Result) -> None:
    """The kernel's pgd_list line against the tasks the console shows alive."""
    if m.listed is None:
        t.fail(f"the guest crashed before the save read the pgd_list:\n{crash(r)}\n"
               f"{why(r) or 'tasks are built and freed from the first milliseconds.'}")
    n, unpinned = m.listed
    alive = f"{len(m.live)} tasks were alive (pids {pids(m.live)})"
    t.check(n == len(m.live), f"at the save the pgd_list held {n} pgds, but {alive}. "
            "A task's pgd goes on the list when spawn builds it (pgd_list_add) and comes off "
            "when its pages are freed (pgd_list_del); pgd_list returns the pfns of the slots "
            "that are not empty, and nothing else.")
    t.check(unpinned == len(m.held), f"at the save {unpinned} pgds on the pgd_list were "
            f"unpinned, but the tasks held half built or half torn down were "
            f"{pids(m.held)}: does the list hold the pfns spawn and pgd_free passed in?")


def check_pins(t: Ctx, m: Moment) -> None:
    t.check(m.pinned is not None, "the kernel did not say how many pgds xen_mm_pin_all "
            "pinned: it prints the number the function returns, an int.")
    t.check(m.pinned == len(m.held), f"xen_mm_pin_all said it pinned {m.pinned} pgds, but "
            f"{len(m.held)} were unpinned (tasks {pids(m.held)}): it must pin every unpinned "
            "pgd on the list, leave the pinned ones alone, and return how many it pinned.")


def check_unpins(t: Ctx, m: Moment) -> None:
    t.check(m.unpinned is not None, "the kernel did not say how many pgds xen_mm_unpin_all "
            "unpinned: it prints the number the function returns, an int.")
    t.check(m.unpinned == m.pinned, f"the save pinned {m.pinned} pgds, but xen_mm_unpin_all "
            f"unpinned {m.unpinned}: it must unpin exactly the pgds marked PG_SAVEPINNED "
            "(did xen_mm_pin_all mark them?), and return how many.")


def check_results(t: Ctx, got: str, expected: list[str]) -> None:
    """The programs' results against a run without a save, and no page lost."""
    have, want = Counter(results(got)), Counter(expected)
    missing, extra = sorted((want - have).elements()), sorted((have - want).elements())
    t.check(not missing and not extra, "the programs' results differ from a run without a "
            f"save: missing {missing[:4]}, extra {extra[:4]}")
    m = POWER_OFF.search(got)
    t.check(m is not None and m.group(1) == m.group(2), "the guest did not give back every "
            "page it took: " + (m.group(0) if m else "it never powered off"))


@test(10, "the pgd_list holds a pgd for every live task (seeds 1-4)")
def pgd_list_at_save(t: Ctx) -> dict[int, Saved]:
    saved = {}
    for seed in t.seeds(SAVES):
        at = SAVES.get(seed, "12ms")
        base = t.pvlab("run", config(t), "--seed", seed)
        check_ran(t, base, "the guest's run without a save")
        img = str(t.out(f"seed{seed}.img"))
        r = t.pvlab("save", config(t), img, "--at", at, "--seed", seed)
        found = moments(r.out)
        t.check(found, f"the guest never began to suspend:\n{crash(r)}\n{why(r)}")
        check_moment(t, found[0], r)
        saved[seed] = Saved(at, img, r, found[0], results(base.out))
    return saved


@test(10, "xen_mm_pin_all pins every unpinned pgd, and only those", parent=pgd_list_at_save)
def save_pins_all(t: Ctx) -> dict[int, Saved]:
    for seed in t.seeds(t.parent):
        s = t.parent[seed]
        t.last = s.run
        check_ran(t, s.run, f"the save at {s.at}")
        check_pins(t, s.moment)
        shown = t.pvlab("image", "show", s.image)
        m = t.expect_line(shown.out, r"^pinned tables \((\d+)\): (.*)$",
                          "`pvlab image show` should list the image's pinned tables")
        want = len(s.moment.live) + 1
        t.check(int(m.group(1)) == want and m.group(2).count("L4") == want,
                f"the image holds {m.group(1)} pinned tables ({m.group(2)}), but the guest "
                f"had {want} pgds: the kernel's and one per live task. A pgd left unpinned "
                "is saved as plain data, its machine frame numbers never made pfns.")
    return t.parent


@test(15, "restored on other frames, the save's pins undone, the programs finish",
      parent=save_pins_all)
def restore_unpins(t: Ctx) -> None:
    for seed in t.seeds(t.parent):
        s = t.parent[seed]
        r = t.pvlab("restore", s.image)
        check_ran(t, r, "the restore (in a new process, on other machine frames)")
        after = moments(s.run.out + r.out)[0]
        check_unpins(t, after)
        check_results(t, s.run.out + r.out, s.expected)


@test(10, "two checkpoints in one run: unpinned again in the same domain (seeds 1-2)",
      parent=pgd_list_at_save)
def checkpoints_unpin(t: Ctx) -> None:
    for seed in t.seeds((1, 2)):
        expected = t.parent[seed].expected if seed in t.parent else None
        asks = [a for at in CHECKPOINTS for a in ("--request", f"{at} checkpoint")]
        r = t.pvlab("run", config(t), "--seed", seed, *asks)
        check_ran(t, r, "the run with two checkpoints")
        found = moments(r.out)
        t.check(len(found) == len(CHECKPOINTS), f"the guest suspended {len(found)} times, "
                f"not {len(CHECKPOINTS)}:\n{r.tail()}")
        for m in found:
            check_moment(t, m, r)
            check_pins(t, m)
            check_unpins(t, m)
        if expected is not None:
            check_results(t, r.out, expected)
