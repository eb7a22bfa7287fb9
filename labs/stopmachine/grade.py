"""The stopmachine lab's graded tests.

Every test reads the kernel's own reports: check_the_others_spin (option
stopmachine=) and xen_suspend each say, from inside fn on cpu0, whether every
other cpu was in the stopper with its events masked; the suspend path says
when the cpu that asked went on ("suspend: done"); the power-off line says
whether every page came back. A run that is still going at the time limit
has a cpu stranded in the stopper. A race shows in some schedules only, so
the suspend scenario is explored under a hundred schedule seeds, and a
failure names the first seed that went wrong and the run that replays it.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass

from labs.gradelib import POWER_OFF, Ctx, Result, test

SUSPEND_UNTIL = "8ms"      # suspend.toml powers off at about 5 ms
RESTORE_UNTIL = "10ms"
DEMO_UNTIL = "30ms"        # demo.toml powers off at 20 ms
SEEDS = range(1, 101)
SAVE_SEEDS = range(1, 5)   # schedules 3 and 4 save with a cpu that has acknowledged RUN
RESULTS = r"stop_machine|xen_suspend|suspend: done|FAILURE|powering off"

FN_DEMO = re.compile(r"stop_machine: fn ran on cpu(\d+) while cpus ([\d,]+|none) spun")
FN_SUSPEND = re.compile(r"xen_suspend: on cpu(\d+), cpus ([\d,]+|none) spinning")
NOT_SPINNING = re.compile(r"stop_machine: FAILURE: cpus \[[\d, ]+\] are not spinning masked")
LEFT = re.compile(r"post-suspend: FAILURE: cpus \[[\d, ]+\] left the stopper")
_PREFIX = re.compile(r"^\[cpu\d+\] ", re.MULTILINE)

OOPS = re.compile(r"(?:Kernel panic - not syncing|kernel oops in [\w.]+): (.*)")


@dataclass
class Run:
    """How a run ended, and its console lines without the ``[cpuN]`` prefix."""
    end: str       # poweroff, crash, running (the time limit), or what else it said
    why: str       # the crash's message, or ""
    lines: list[str]

    def count(self, pattern: re.Pattern[str] | str) -> int:
        return sum(1 for x in self.lines if re.search(pattern, x))


def run_of(r: Result) -> Run:
    lines = _PREFIX.sub("", r.out).splitlines()
    oops = OOPS.search(r.out + r.err)
    if oops:
        return Run("crash", oops.group(1), lines)
    if any(POWER_OFF.search(x) for x in lines):
        return Run("poweroff", "", lines)
    if "still running" in r.err:
        return Run("running", "", lines)
    said = r.err.strip().splitlines() or [f"exit status {r.rc}"]
    return Run("ended otherwise", said[-1], lines)


# --- what a run says about the stop_machine, in words that teach ---------------------

def crashed(run: Run) -> str:
    if "NotImplementedError" in run.why:
        fn = run.why.rsplit(":", 1)[-1].strip()
        return (f"the guest crashed: {run.why}\n"
                f"{fn} is still the starting point's stub: write it (its rule is in its body).")
    return (f"the guest crashed: {run.why}\n"
            "An exception in your code is a kernel oops: the message names the native "
            "entry it came through. Run the replay below and read the console's end.")


def fn_placement(run: Run, pattern: re.Pattern[str], cpus: int) -> str:
    """"" if fn ran on cpu0 only, with every other cpu spinning masked until it
    was done."""
    others = ",".join(str(n) for n in range(1, cpus))
    for x in run.lines:
        m = pattern.search(x)
        if m and m.group(1) != "0":
            return (f"fn ran on cpu{m.group(1)}:\n    {x}\nIn RUN only the cpu sm.cpu calls fn "
                    "(here cpu0: Xen's tools need the save made on vcpu0); the others only "
                    "acknowledge RUN.")
        if m and m.group(2) != others or NOT_SPINNING.search(x):
            return (f"fn ran on cpu0 while not every other cpu spun with events masked:\n"
                    f"    {x}\nEither RUN came before every cpu had acknowledged DISABLE_IRQ "
                    "(a state moves on only when its last missing acknowledgement comes in: "
                    "count them), or a cpu acknowledged DISABLE_IRQ before masking its events "
                    "(the state's work comes first, then the acknowledgement).")
    left = next((x for x in run.lines if LEFT.search(x)), "")
    if left:
        return (f"cpus left the stopper while xen_suspend was still running:\n    {left}\n"
                "xen_suspend blocked in the suspend hypercall, and its continuation ran "
                "after the others had gone. RUN is over only when fn is done: the cpu that "
                "runs fn acknowledges RUN after fn returns, or, for a fn that blocked, in "
                "fn_done; and no state moves on with an acknowledgement missing.")
    return ""


def stranded(until: str) -> str:
    return (f"the guest was still running at {until}: a cpu is stranded in the stopper, "
            "spinning for ever. A state that never moves on is one whose acknowledgements "
            "never add up: one counted twice or never, the count made full again after some "
            "cpus had acknowledged, or RUN never acknowledged after fn blocked (fn_done). "
            "A cpu that leaves before EXIT strands the others too.")


def judge_suspends(run: Run, suspends: int, until: str) -> str:
    """"" if ``run`` made its suspends right, each with xen_suspend on cpu0
    and the others spinning masked until it was done, ``suspends`` of them got
    to "suspend: done", and the guest powered off with every page back;
    else what went wrong, every symptom in turn."""
    if run.end == "crash":
        return crashed(run) + _missed_run(run)
    wrong = [fn_placement(run, FN_SUSPEND, 3)]
    fns, asked = run.count(FN_SUSPEND), run.count(r"suspend: stop_machine\(xen_suspend\)")
    if fns > asked:
        wrong.append(f"xen_suspend ran {fns} times for {asked} request(s): fn runs once.")
    wrong.append(_missed_run(run).strip())
    if run.count("stop_machine is busy"):
        wrong.append("a suspend found the last stop_machine still under way (\"suspend: "
                     "stop_machine is busy; aborted\"): the last acknowledgement of EXIT "
                     "ends it (sm.active = 0), and every cpu must leave.")
    if run.end == "running":
        wrong.append(stranded(until))
    elif run.count("suspend: done") < suspends:
        wrong.append(f"{run.count('suspend: done')} of {suspends} suspends got to \"suspend: "
                     "done\": the cpu that asked (sm.caller) goes on with `then` when it "
                     "leaves the stopper.")
    else:
        wrong.append(powered_off(run))
    return "\n".join(w for w in wrong if w)


def _missed_run(run: Run) -> str:
    fns, asked = run.count(FN_SUSPEND), run.count(r"suspend: stop_machine\(xen_suspend\)")
    if fns >= asked:
        return ""
    return (f"\nstop_machine(xen_suspend) was asked {asked} time(s) but xen_suspend ran "
            f"{fns} time(s): either RUN never came (a state stuck) or it came and went "
            "without cpu0 seeing it (a state moved on before every cpu had acknowledged it; "
            "the suspend path then took the RESTORE way, as if the hypercall had returned "
            "0).")


def powered_off(run: Run) -> str:
    if run.end != "poweroff":
        return f"the guest did not power off: {run.end}: {run.why}"
    m = next(POWER_OFF.search(x) for x in run.lines if POWER_OFF.search(x))
    if m.group(1) != m.group(2):
        return f"the guest powered off with pages missing: {m.group(0)}"
    return ""


# --- explore's report -------------------------------------------------------------

@dataclass
class Group:
    end: str
    why: str
    seeds: list[int]
    results: list[str]


_OUTCOME = re.compile(r"^outcome \d+: (\w+)(?:: (.*))? \((\d+) run\(s\)\)$")


def seed_list(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


def groups_of(report: str) -> list[Group]:
    groups: list[Group] = []
    for line in report.splitlines():
        m = _OUTCOME.match(line)
        if m:
            end, why = m.group(1), m.group(2) or ""
            oops = OOPS.search(why)
            groups.append(Group("crash" if end == "crash" else end,
                                oops.group(1) if oops else why, [], []))
        elif groups and line.startswith("  seeds: "):
            groups[-1].seeds = seed_list(line.removeprefix("  seeds: "))
        elif groups and line.startswith("  result: "):
            groups[-1].results.append(line.removeprefix("  result: "))
    return groups


# --- the tests ---------------------------------------------------------------------

@test(10, "fn runs once, on cpu0, while cpus 1 and 2 spin with events masked")
def fn_on_cpu0(t: Ctx) -> None:
    run = run_of(t.pvlab("run", t.data("demo.toml"), "--until", DEMO_UNTIL))
    if run.end == "crash":
        t.fail(crashed(run))
    t.check(run.count("stop_machine: starting"), "the stop_machine never started: "
            "this run should start one at 10 ms (option stopmachine=1)")
    t.check(not fn_placement(run, FN_DEMO, 3), fn_placement(run, FN_DEMO, 3))
    n = run.count(FN_DEMO) + run.count(NOT_SPINNING)
    if n == 0 and run.end == "running":
        t.fail("fn never ran, and " + stranded(DEMO_UNTIL))
    t.check(n == 1, f"fn ran {n} times: it runs once, in RUN, on cpu sm.cpu"
            + ("; here RUN came and went without cpu0 seeing it: a state moved on before "
               "every cpu had acknowledged it" if n == 0 else ""))
    t.check(run.end != "running", stranded(DEMO_UNTIL))
    t.check(not powered_off(run), powered_off(run))


@test(15, "a suspend: xen_suspend on cpu0, the others spinning masked, then back to work")
def suspend_on_cpu0(t: Ctx) -> None:
    run = run_of(t.pvlab("run", t.data("suspend.toml"), "--until", SUSPEND_UNTIL))
    wrong = judge_suspends(run, 1, SUSPEND_UNTIL)
    t.check(not wrong, wrong)


@test(45, "the same under 100 schedules", parent=suspend_on_cpu0)
def many_schedules(t: Ctx) -> None:
    seeds = list(t.seeds(SEEDS))
    t.seed = None
    config = t.data("suspend.toml")
    which = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    r = t.pvlab("explore", config, "--seeds", which, "-j", t.jobs, "--until", SUSPEND_UNTIL,
                "--results", RESULTS, timeout=1200)
    groups = groups_of(r.out)
    t.check(r.rc in (0, 1) and groups, f"pvlab explore failed:\n{r.tail()}")
    bad = [(g, judge_suspends(Run(g.end, g.why, g.results), 1, SUSPEND_UNTIL)) for g in groups]
    bad = [(g, why) for g, why in bad if why]
    if not bad:
        t.check(len(groups) == 1, f"the schedules gave {len(groups)} different outcomes: "
                "a guest's results must not depend on its schedule\n" + r.out[-2000:])
        return
    seeds_bad = sorted(s for g, _ in bad for s in g.seeds)
    group, why = min(bad, key=lambda b: b[0].seeds[0])
    t.seed = group.seeds[0]
    replay = t.pvlab("run", config, "--sched-seed", t.seed, "--until", SUSPEND_UNTIL)
    said = [x for x in replay.out.splitlines() if re.search(RESULTS + "|suspend hypercall", x)]
    t.fail(f"{len(seeds_bad)} of {len(seeds)} schedules went wrong (seeds "
           f"{_seed_text(seeds_bad)}). Schedule {t.seed}:\n{why}\n"
           "What that schedule's run said:\n" + "\n".join("    " + x for x in said)
           + _timeline_hint(t))


def _timeline_hint(t: Ctx) -> str:
    """The command that draws the bad schedule's suspend path, where pvlab draws it."""
    if importlib.util.find_spec("hypervisor.toolstack.timeline") is None:
        return ""
    cmd = ["pvlab", "lab", "run", t.lab.name, *t.settings.replay_flags(), "--", "plot",
           "timeline", str(t.data("save.toml")), "--at", "2ms", "--checkpoint",
           "--sched-seed", str(t.seed), "-o", f"seed{t.seed}.png"]
    return "\nIts suspend path, cpu by cpu: " + shlex.join(cmd)


def _seed_text(seeds: list[int], most: int = 12) -> str:
    text = ", ".join(map(str, seeds[:most]))
    return text + (f", ... ({len(seeds) - most} more)" if len(seeds) > most else "")


@test(30, "saved while the others spin, restored in a new process, suspended again",
      parent=suspend_on_cpu0)
def save_restore(t: Ctx) -> None:
    for seed in t.seeds(SAVE_SEEDS):
        img = t.out(f"seed{seed}.img")
        r = t.pvlab("run", t.data("save.toml"), "--sched-seed", seed,
                    "--request", f"2ms save {img}", "--until", SUSPEND_UNTIL)
        run = run_of(r)
        if run.end == "crash":
            t.fail(crashed(run))
        t.check(not fn_placement(run, FN_SUSPEND, 3), fn_placement(run, FN_SUSPEND, 3))
        t.check(r.rc == 0 and img.is_file(), f"the save failed:\n{r.tail()}")
        run = run_of(t.pvlab("restore", img, "--request", "3ms suspend",
                             "--until", RESTORE_UNTIL))
        t.check(run.end == "crash" or run.count("suspend hypercall returned 0"),
                "the restored guest never came back from its suspend hypercall")
        wrong = judge_suspends(run, 2, RESTORE_UNTIL)
        t.check(not wrong, "after the restore, in a new process: " + wrong + (
            "\nThe restored kernel knows only what is in guest memory: any state kept in "
            "Python (a global, a closure) was left behind with the old process."
            if run.end == "running" else ""))
