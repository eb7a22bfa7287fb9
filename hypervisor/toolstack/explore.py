"""``pvlab explore``: one scenario run under many schedules, its outcomes grouped.

Each seed is one run of the configuration, in a worker process, with that
seed as the schedule seed (the scheduler's choices: which VCPU runs next,
slice lengths, wake-up delays; hypervisor/scheduler.py) while the guest stays
on the frames of the configuration's seed; with ``frames`` the seed is the
machine's seed and moves the frames too. A run's outcome is how it ended (the
shutdown reason, or hung, or still running at the time limit), what went
wrong (the crash report's first line, which carries a kernel panic's text,
the reason it hung, a shutdown request it did not acknowledge) and its result
lines: the console lines that match a pattern (by default the programs'
digests, the kernel's FAILURE reports and a test guest's XTF verdict), less
the ``[cpuN]`` prefix and sorted, since which cpu printed first is the
schedule's. Runs with the same
outcome form a group; each group is printed with its seeds, the tail of one
run's console and the ``pvlab run`` command that replays that run bit for bit.

A guest's results must not depend on its schedule: more than one group, or a
group that crashed or hung, is a race found.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.session import boot, run_domain
from hypervisor.toolstack.timeparse import format_duration, parse_duration

DEFAULT_RESULTS = r"digest|FAILURE|Test result:"
TAIL_LINES = 6
MAX_SEEDS = 1_000_000
_CPU_PREFIX = re.compile(r"^\[cpu\d+\] ")


class ExploreError(ValueError):
    """Bad input to explore: one line, exit 2."""


def parse_seeds(text: str) -> list[int]:
    """``1-500``, ``7`` or ``1-10,20,30-40``: the seeds, in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ExploreError(f"--seeds {text!r}: give seeds as N, A-B or a comma-separated "
                               "list of them (e.g. 1-500)") from None
        if first < 0 or last < first:
            raise ExploreError(f"--seeds {text!r}: {part.strip()} is no range of seeds "
                               "(0 or more, low to high)")
        seeds.extend(range(first, last + 1))
        if len(seeds) > MAX_SEEDS:
            raise ExploreError(f"--seeds {text!r}: more than {MAX_SEEDS} runs")
    return list(dict.fromkeys(seeds))


def format_seeds(seeds: Iterable[int]) -> str:
    """1,2,3,5 -> '1-3, 5'."""
    out: list[str] = []
    run: list[int] = []
    for s in sorted(seeds):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


@dataclass(frozen=True)
class Outcome:
    """What a run ended with: runs with equal outcomes are one group."""

    reason: str            # poweroff, crash, reboot, ..., hung, running
    trouble: str           # crash report's first line, why it hung, ...; "" if none
    results: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.reason in ("poweroff", "running") and not self.trouble


@dataclass(frozen=True)
class Scenario:
    """What every run shares; the seed is each run's own."""

    config: str
    until_ns: int | None = None
    frames: bool = False       # the seed moves the frames too (the machine's seed)
    seed: int | None = None    # the frames' seed when they stay put (default the config's)
    results: str = DEFAULT_RESULTS

    def replay(self, seed: int) -> str:
        """The command that runs this scenario's run ``seed`` again."""
        cmd = ["pvlab", "run", self.config]
        if self.frames:
            cmd += ["--seed", str(seed)]  # and the schedule's, whatever the config says
        elif self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        cmd += ["--sched-seed", str(seed)]
        if self.until_ns is not None:
            until = format_duration(self.until_ns).replace(" ", "")
            exact = parse_duration(until) == self.until_ns
            cmd += ["--until", until if exact else f"{self.until_ns}ns"]
        return shlex.join(cmd)


def run_one(scenario: Scenario, seed: int) -> tuple[int, Outcome, str]:
    """One run: its seed, its outcome and the tail of its console."""
    cfg = load_config(scenario.config)
    if scenario.frames:
        hv, dom = boot(cfg, seed=seed, sched_seed=seed)
    else:
        hv, dom = boot(cfg, seed=scenario.seed, sched_seed=seed)
    try:
        r = run_domain(hv, dom, scenario.until_ns, requests=cfg.requests)
        trouble = (dom.crash_report.splitlines() or [""])[0] if r.reason == "crash" else ""
        trouble = trouble or r.why or (f"did not acknowledge {r.unacknowledged}"
                                       if r.unacknowledged else "")
        lines = r.console.decode(errors="replace").splitlines()
        pattern = re.compile(scenario.results)
        results = tuple(sorted(_CPU_PREFIX.sub("", x) for x in lines if pattern.search(x)))
        return seed, Outcome(r.reason, trouble, results), "\n".join(lines[-TAIL_LINES:])
    finally:
        hv.close()


def _run_one(job: tuple[Scenario, int]) -> tuple[int, Outcome, str]:
    return run_one(*job)


@dataclass
class Group:
    outcome: Outcome
    seeds: list[int] = field(default_factory=list)
    tail: str = ""         # the console's tail of the run of its first seed


def explore(scenario: Scenario, seeds: list[int], jobs: int = 0,
            progress: Callable[[int, int], None] | None = None) -> list[Group]:
    """Run every seed (on ``jobs`` worker processes, 0: one per core) and
    group the outcomes, the largest group first."""
    groups: dict[Outcome, Group] = {}
    tails: dict[int, str] = {}
    for done, (seed, outcome, tail) in enumerate(_runs(scenario, seeds, jobs), 1):
        groups.setdefault(outcome, Group(outcome)).seeds.append(seed)
        tails[seed] = tail
        if progress is not None:
            progress(done, len(seeds))
    for g in groups.values():
        g.seeds.sort()
        g.tail = tails[g.seeds[0]]
    return sorted(groups.values(), key=lambda g: (-len(g.seeds), g.seeds[0]))


def _runs(scenario: Scenario, seeds: list[int], jobs: int
          ) -> Iterator[tuple[int, Outcome, str]]:
    jobs = min(jobs or os.cpu_count() or 1, len(seeds))
    if jobs <= 1:
        yield from (run_one(scenario, s) for s in seeds)
        return
    # fork: the parent has built no machine, and a worker then starts at once
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs, initializer=_quiet_worker) as pool:
        yield from pool.imap_unordered(_run_one, [(scenario, s) for s in seeds])


def _quiet_worker() -> None:
    import logging
    logging.disable(logging.WARNING)


def report(scenario: Scenario, groups: list[Group], out: Callable[[str], None]) -> None:
    """Print the groups, each with its seeds, a console tail and a replay command."""
    total = sum(len(g.seeds) for g in groups)
    what = "seeds (frames and schedule)" if scenario.frames else "schedule seeds"
    out(f"{total} runs of {scenario.config} with {what}: {len(groups)} outcome(s)")
    for n, g in enumerate(groups, 1):
        o = g.outcome
        out(f"\noutcome {n}: {o.reason}{': ' + o.trouble if o.trouble else ''} "
            f"({len(g.seeds)} run(s))")
        out(f"  seeds: {format_seeds(g.seeds)}")
        for line in o.results or ("(no result lines)",):
            out(f"  result: {line}")
        out("  console tail:")
        for line in g.tail.splitlines() or [""]:
            out(f"    {line}")
        out(f"  replay: {scenario.replay(g.seeds[0])}")


def verdict(groups: list[Group]) -> int:
    """0 if every run ended alike and well; 1 if the outcomes differ or any
    run crashed, hung or failed (a race found)."""
    return 0 if len(groups) == 1 and groups[0].outcome.ok else 1


def progress_on_stderr() -> Callable[[int, int], None]:
    """A progress line on stderr: rewritten in place on a terminal, else one
    line per tenth of the runs."""
    tty = sys.stderr.isatty()
    shown = [-1]

    def show(done: int, total: int) -> None:
        step = 10 * done // total
        if not tty and step == shown[0]:
            return
        shown[0] = step
        start = "\r" if tty else ""
        end = "\n" if not tty or done == total else ""
        sys.stderr.write(f"{start}explore: {done}/{total} runs{end}")
        sys.stderr.flush()
    return show
