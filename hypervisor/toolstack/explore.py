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

Two options aim the runs at a moment, the freeze and thaw of a save, say:

* ``fork_ns`` (``--fork-at TIME``): the runs share their start. One run, on
  the configuration's schedule, goes to that time (no suspend, shutdown or
  save may be asked before it); each seed's run is a fork of that process
  (os.fork copies the machine) whose schedule from there on is the seed's
  (``domctl.reseed_schedule``). A run then costs only its part after TIME.
  Every run writes a private copy of each disk (``domctl.private_disks``),
  so that no run sees another's writes and the image file stays as it was.
  A run from boot is built on copies of the images (``private_images``).
  A configuration with a socket console port or vif is refused: the runs
  would share its path or address (``check_config``).
  ``pvlab run CONFIG --sched-from TIME --sched-seed N`` replays one (spelled
  as ``REPLAY_AS_ENV`` says: ``pvlab lab run NAME -- run ...`` inside a lab,
  whose run must load the student's modules again).
* ``inject_every`` (``--inject-every N``): the injector
  (hypervisor/devices/virtio/inject.py) on every virtio device (or those of
  ``inject_kind``), armed at the parting (or at boot without one), throws the
  device's events, a used buffer, a config change and its interrupt, after
  every N-th register access of the guest in its freeze, reset and restore,
  from access ``seed % N``: over N seeds every step gets its events under
  some schedule. With ``inject_unit="slice"`` (``--inject-slices``) it counts
  slices from the parting instead, so the events come before the freeze too.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import selectors
import shlex
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hypervisor import domctl
from hypervisor.toolstack.config import DomainConfig, load_config
from hypervisor.toolstack.control import Request
from hypervisor.toolstack.session import boot, check_parting, run_domain, run_to_parting
from hypervisor.toolstack.timeparse import format_duration, parse_duration

DEFAULT_RESULTS = r"digest|FAILURE|Test result:"
# How a replay line spells ``pvlab`` (default "pvlab"): set by ``pvlab lab run
# NAME`` to "pvlab lab run NAME --", so that a replay runs the lab's modules
REPLAY_AS_ENV = "PVLAB_REPLAY_AS"
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
    fork_ns: int | None = None  # the runs share their start up to this time (--fork-at)
    inject_every: int = 0      # the injector: events at every N-th access (0: none)
    inject_kind: str | None = None  # only on the devices of this kind
    inject_unit: str = "access"  # what the injector counts: "access" or "slice"

    def phase(self, seed: int) -> int:
        """The injector's first access under ``seed``."""
        return seed % self.inject_every if self.inject_every else 0

    def replay(self, seed: int) -> str:
        """The command that runs this scenario's run ``seed`` again."""
        cmd = [*shlex.split(os.environ.get(REPLAY_AS_ENV, "pvlab")), "run", self.config]
        if self.frames:
            cmd += ["--seed", str(seed)]  # and the schedule's, whatever the config says
        elif self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.fork_ns is not None:
            cmd += ["--sched-from", _time_arg(self.fork_ns)]
        cmd += ["--sched-seed", str(seed)]
        if self.inject_every:
            cmd += ["--inject-every", str(self.inject_every),
                    "--inject-phase", str(self.phase(seed))]
            if self.inject_kind is not None:
                cmd += ["--inject-kind", self.inject_kind]
            if self.inject_unit == "slice":
                cmd += ["--inject-slices"]
        if self.until_ns is not None:
            cmd += ["--until", _time_arg(self.until_ns)]
        return shlex.join(cmd)


def _time_arg(ns: int) -> str:
    text = format_duration(ns).replace(" ", "")
    return text if parse_duration(text) == ns else f"{ns}ns"


@dataclass(frozen=True)
class Run:
    """One run as the explorer keeps it."""

    seed: int
    outcome: Outcome
    tail: str                  # the console's last lines
    thrown: tuple[str, ...] = ()  # the injector's throws, in order


def check_config(cfg: DomainConfig) -> None:
    """ExploreError if the runs cannot each have their own host side: a
    socket console port or socket vif would be one path or address for all
    (the runs are refused, not given paths of their own, which no peer
    would know)."""
    sockets = [f"channel {c.name!r}" for c in cfg.channels if c.connection == "socket"]
    sockets += [f"vif {v.mac}" for v in cfg.vifs if v.type == "socket"]
    if sockets:
        raise ExploreError(f"{cfg.path or 'the configuration'}: {', '.join(sockets)} is a "
                           "socket, which the runs would share: explore a configuration "
                           "with file console ports and user vifs")


def private_images(cfg: DomainConfig, directory: str) -> DomainConfig:
    """``cfg`` with each read-write disk a copy of its image in ``directory``
    (each under a directory of its own, keeping the image's name, the disk's
    default serial). A run from boot is built on the copies: runs in parallel
    workers never open the image itself, whose write lock one would hold."""
    disks = []
    for i, d in enumerate(cfg.disks):
        if not d.read_only:
            where = os.path.join(directory, str(i))
            os.mkdir(where)
            copy = os.path.join(where, d.target.name)
            shutil.copyfile(d.target, copy)
            d = replace(d, target=type(d.target)(copy))
        disks.append(d)
    return replace(cfg, disks=tuple(disks))


def run_one(scenario: Scenario, seed: int) -> Run:
    """One run of ``seed`` from boot, on copies of the read-write disks."""
    cfg = load_config(scenario.config)
    check_config(cfg)
    with tempfile.TemporaryDirectory(prefix="pvlab-explore-") as tmp:
        cfg = private_images(cfg, tmp)
        if scenario.frames:
            hv, dom = boot(cfg, seed=seed, sched_seed=seed)
        else:
            hv, dom = boot(cfg, seed=scenario.seed, sched_seed=seed)
        try:
            injectors = _injectors(scenario, hv, dom)
            arm_injectors(injectors, scenario.phase(seed))
            return _finish(scenario, seed, hv, dom, cfg.requests, injectors)
        finally:
            hv.close()


def _injectors(scenario: Scenario, hv: domctl.Hypervisor,
               dom: domctl.Domain) -> list[domctl.Injector]:
    if not scenario.inject_every:
        return []
    return domctl.virtio_injectors(hv, dom, scenario.inject_every, 0, scenario.inject_kind,
                                   scenario.inject_unit)


def arm_injectors(injectors: list[domctl.Injector], phase: int) -> None:
    for inj in injectors:
        inj.phase = phase
        inj.arm()


def _finish(scenario: Scenario, seed: int, hv: domctl.Hypervisor, dom: domctl.Domain,
            requests: Iterable[Request], injectors: list[domctl.Injector]) -> Run:
    """The run from here to its end, and what it came to."""
    r = run_domain(hv, dom, scenario.until_ns, requests=list(requests))
    trouble = (dom.crash_report.splitlines() or [""])[0] if r.reason == "crash" else ""
    trouble = trouble or r.why or (f"did not acknowledge {r.unacknowledged}"
                                   if r.unacknowledged else "")
    lines = r.console.decode(errors="replace").splitlines()
    pattern = re.compile(scenario.results)
    results = tuple(sorted(_CPU_PREFIX.sub("", x) for x in lines if pattern.search(x)))
    thrown = tuple(f"{inj.transport.device.name}: {t}" for inj in injectors for t in inj.thrown)
    return Run(seed, Outcome(r.reason, trouble, results), "\n".join(lines[-TAIL_LINES:]),
               thrown)


def _run_one(job: tuple[Scenario, int]) -> Run:
    return run_one(*job)


@dataclass
class Group:
    outcome: Outcome
    seeds: list[int] = field(default_factory=list)
    tail: str = ""         # the console's tail of the run of its first seed
    thrown: tuple[str, ...] = ()  # the injector's throws in the run of its first seed


def explore(scenario: Scenario, seeds: list[int], jobs: int = 0,
            progress: Callable[[int, int], None] | None = None) -> list[Group]:
    """Run every seed (on ``jobs`` worker processes, 0: one per core) and
    group the outcomes, the largest group first."""
    check_config(load_config(scenario.config))
    groups: dict[Outcome, Group] = {}
    runs: dict[int, Run] = {}
    todo = _forked_runs if scenario.fork_ns is not None else _runs
    for done, run in enumerate(todo(scenario, seeds, jobs), 1):
        groups.setdefault(run.outcome, Group(run.outcome)).seeds.append(run.seed)
        runs[run.seed] = run
        if progress is not None:
            progress(done, len(seeds))
    for g in groups.values():
        g.seeds.sort()
        g.tail, g.thrown = runs[g.seeds[0]].tail, runs[g.seeds[0]].thrown
    return sorted(groups.values(), key=lambda g: (-len(g.seeds), g.seeds[0]))


def _runs(scenario: Scenario, seeds: list[int], jobs: int) -> Iterator[Run]:
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


def _forked_runs(scenario: Scenario, seeds: list[int], jobs: int) -> Iterator[Run]:
    """The shared start once, to fork_ns; then a forked child per seed,
    ``jobs`` at a time, each sending its Run back through a pipe."""
    assert scenario.fork_ns is not None and not scenario.frames
    cfg = load_config(scenario.config)
    check_config(cfg)
    check_parting(cfg.requests, scenario.fork_ns)
    hv, dom = boot(cfg, seed=scenario.seed)
    domctl.private_disks(dom)  # the image file stays as it is: a replay starts from it too
    try:
        injectors = _injectors(scenario, hv, dom)
        rest = run_to_parting(hv, dom, scenario.fork_ns, cfg.requests)
        yield from _children(seeds, jobs or os.cpu_count() or 1, lambda seed: _part(
            scenario, seed, hv, dom, rest, injectors))
    finally:
        hv.close()


def _part(scenario: Scenario, seed: int, hv: domctl.Hypervisor, dom: domctl.Domain,
          rest: list[Request], injectors: list[domctl.Injector]) -> Run:
    """In the child: this seed's schedule from the parting on."""
    _quiet_worker()
    domctl.private_disks(dom)  # the disks as the parting left them, this run's own
    domctl.reseed_schedule(hv, seed)
    arm_injectors(injectors, scenario.phase(seed))
    return _finish(scenario, seed, hv, dom, rest, injectors)


def _children(seeds: list[int], jobs: int, work: Callable[[int], Run]) -> Iterator[Run]:
    """``work(seed)`` in a forked child per seed, at most ``jobs`` at once."""
    todo = list(seeds)
    sel = selectors.DefaultSelector()
    got: dict[int, bytearray] = {}
    try:
        while todo or sel.get_map():
            while todo and len(sel.get_map()) < jobs:
                seed = todo.pop(0)
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:   # the child: never back into the caller
                    os.close(r)
                    _child(w, seed, work)
                os.close(w)
                got[r] = bytearray()
                sel.register(r, selectors.EVENT_READ, (pid, seed))
            for key, _ in sel.select():
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    got[key.fd] += chunk
                    continue
                sel.unregister(key.fd)
                os.close(key.fd)
                pid, seed = key.data
                _, status = os.waitpid(pid, 0)
                yield _received(seed, bytes(got.pop(key.fd)), status)
    finally:
        for key in list(sel.get_map().values()):
            os.close(key.fd)
        sel.close()


def _child(fd: int, seed: int, work: Callable[[int], Run]) -> None:
    try:
        try:
            data = pickle.dumps(work(seed))
        except BaseException:  # noqa: BLE001 - the parent reports it as the run's outcome
            data = pickle.dumps(traceback.format_exc())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    finally:
        os._exit(0)


def _received(seed: int, data: bytes, status: int) -> Run:
    """The child's Run, or an outcome that says why there is none."""
    got = pickle.loads(data) if data else f"the run's process died (status {status:#x})"
    if isinstance(got, Run):
        return got
    last = got.rstrip().splitlines()[-1] if got.strip() else "?"
    return Run(seed, Outcome("error", f"the explorer's run failed: {last}", ()), got[-2000:])


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
        if g.thrown:
            out(f"  events thrown (seed {g.seeds[0]}): {len(g.thrown)}, the first at "
                f"{g.thrown[0]}")
        out(f"  replay: {scenario.replay(g.seeds[0])}")


def groups_json(scenario: Scenario, groups: list[Group]) -> dict[str, Any]:
    """The groups as one JSON object (``pvlab explore --json``)."""
    return {"config": scenario.config, "verdict": verdict(groups),
            "groups": [{**asdict(g.outcome), "seeds": g.seeds, "tail": g.tail,
                        "thrown": list(g.thrown), "replay": scenario.replay(g.seeds[0])}
                       for g in groups]}


def write_json(scenario: Scenario, groups: list[Group], path: str) -> None:
    with open(path, "w") as f:
        json.dump(groups_json(scenario, groups), f, indent=1)
        f.write("\n")


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
