"""Graded tests, in the shape of MIT 6.1810's gradelib: ``@test(points,
title, parent=...)``, a line per test, ``Score: N/M``.

A test runs pvlab in subprocesses (``t.pvlab``) with the student's files in
place of the reference modules, and checks what they print and write. A
failed check ends the test with a message that teaches, the seed it failed
on and the commands that replay it. Everything runs on the deterministic
clock with explicit seeds, so a grade is the same every time.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labs.forkserver import ForkServer, ServerGone
from labs.lab import ROOT, Lab

TestFn = Callable[["Ctx"], Any]
# the kernel's last line: pages free at power-off, and before the first task
POWER_OFF = re.compile(r"powering off \((\d+) pages free, (\d+) before the first task\)")
DEFAULT_TIMEOUT = 120  # seconds of a single pvlab run: a hung student kernel ends here
QUICK_ENV = "PVLAB_LAB_QUICK"  # set: a grade tries a lab's few quick seeds (Ctx.seeds)
_REGISTRY: dict[str, list[GradedTest]] = {}


@dataclass
class GradedTest:
    fn: TestFn
    points: int
    title: str
    parent: GradedTest | None

    @property
    def name(self) -> str:
        return self.fn.__name__


def test(points: int, title: str, parent: TestFn | None = None) -> Callable[[TestFn], TestFn]:
    """Declare a graded test of the lab whose grade module this is."""
    def register(fn: TestFn) -> TestFn:
        tests = _REGISTRY.setdefault(fn.__module__, [])
        up = next((t for t in tests if t.fn is parent), None) if parent else None
        if parent is not None and up is None:
            raise ValueError(f"{fn.__name__}: its parent must be declared before it")
        tests.append(GradedTest(fn, points, title, up))
        return fn
    return register


def tests_of(module: str) -> list[GradedTest]:
    __import__(module)
    return list(_REGISTRY.get(module, []))


class Fail(Exception):
    """A check failed: the message is for the student."""


@dataclass
class Result:
    """One pvlab run: its exit status, what it printed, and how to run it again."""
    rc: int | None            # None: ended by the grader's timeout
    out: str
    err: str
    args: list[str]

    @property
    def console(self) -> str:
        return self.out

    def tail(self, n: int = 12) -> str:
        lines = (self.out + self.err).rstrip().splitlines()[-n:]
        return "\n".join("      " + line for line in lines)


@dataclass
class Settings:
    """How a grade runs: whose code, where, and what to narrow it to."""
    lab: Lab
    student: Path | None          # the directory above the lab's; None: the reference
    scratch: Path
    seed: int | None = None
    verbose: bool = False
    gdb: int | None = None
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)

    _servers: dict[tuple[str, ...], ForkServer] = field(default_factory=dict, init=False,
                                                        repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def who(self, reference: bool = False) -> list[str]:
        """labs.run's options for the student's modules, or the reference's."""
        return (["--reference"] if self.student is None or reference
                else ["--dir", str(self.student)])

    def run_prefix(self, reference: bool = False) -> list[str]:
        return [sys.executable, "-m", "labs.run", "--lab", self.lab.name, *self.who(reference)]

    def server(self, reference: bool = False) -> ForkServer | None:
        """The fork server of these runs, started on first use (None where
        Python cannot fork: each run then starts Python anew)."""
        if not hasattr(os, "fork"):
            return None
        who = tuple(self.who(reference))
        with self._lock:
            if who not in self._servers:
                self._servers[who] = ForkServer(self.lab.name, list(who))
            return self._servers[who]

    def close(self) -> None:
        """Stop the fork servers."""
        with self._lock:
            while self._servers:
                self._servers.popitem()[1].close()

    def replay_flags(self) -> list[str]:
        if self.student is None:
            return ["--reference"]
        return [] if self.student == Path(".") else ["--dir", str(self.student)]


class Ctx:
    """What a graded test works with."""

    def __init__(self, settings: Settings, test: GradedTest, parent: Any = None) -> None:
        self.settings = settings
        self.lab = settings.lab
        self.lab_root = ROOT      # the checkout: examples/, firmware/
        self.test = test
        self.parent = parent
        self.jobs = settings.jobs
        self.seed: int | None = None
        self.last: Result | None = None
        self._gdb = settings.gdb
        self._scratch = settings.scratch / test.name
        self._scratch.mkdir(parents=True, exist_ok=True)

    def data(self, name: str) -> Path:
        """A file beside the lab's grade module."""
        return Path(sys.modules[self.test.fn.__module__].__file__).parent / name

    def out(self, name: str) -> Path:
        """A path in this test's scratch directory (emptied by nobody: kept to look at)."""
        return self._scratch / name

    def seeds(self, seeds: Iterable[int], quick: Iterable[int] | None = None
              ) -> Iterator[int]:
        """The seeds to try, or only the one ``--seed`` names. Where the
        environment sets QUICK_ENV (the test suite's gradings, which check
        the lab's plumbing and need not try them all): ``quick`` if given,
        else the first of ``seeds``."""
        if os.environ.get(QUICK_ENV):
            seeds = quick if quick is not None else list(seeds)[:1]
        chosen = [self.settings.seed] if self.settings.seed is not None else list(seeds)
        for seed in chosen:
            self.seed = seed
            yield seed

    def pvlab(self, *args: object, timeout: float = DEFAULT_TIMEOUT,
              reference: bool = False) -> Result:
        """Run ``pvlab ARGS`` with the student's modules (the reference's with
        ``reference``, to learn what a right answer is); never raises for the
        student's failures (they are in the result)."""
        argv = [str(a) for a in args]
        if reference:  # the grader's own question: not the run a failure replays
            return self._run(True, argv, timeout)
        argv = self._with_gdb(argv)
        if self.settings.verbose:
            print(f"    $ pvlab lab run {self.lab.name} -- {shlex.join(argv)}", flush=True)
        waited = "--gdb" in argv[1:2]
        self.last = self._run(False, argv, None if waited else timeout)
        if self.last.rc is None:
            self.fail(f"pvlab did not end within {timeout:.0f} s: the guest or the "
                      "toolstack is stuck (a loop that never ends, a lock never released?)")
        return self.last

    def _run(self, reference: bool, argv: list[str], timeout: float | None) -> Result:
        """One pvlab child process, forked by the grade's fork server; rc None
        if it ran past ``timeout``."""
        server = self.settings.server(reference)
        if server is not None:
            try:
                return Result(*server.run(argv, timeout), argv)
            except ServerGone:
                pass      # a server that could not start: Python started anew, as below
        return self._fresh(self.settings.run_prefix(reference), argv, timeout)

    @staticmethod
    def _fresh(prefix: list[str], argv: list[str], timeout: float | None) -> Result:
        """One pvlab child process started from scratch."""
        try:
            p = subprocess.run(prefix + ["--", *argv], capture_output=True, text=True,
                               timeout=timeout, errors="replace")
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            return Result(None, out, "", argv)
        return Result(p.returncode, p.stdout, p.stderr, argv)

    def _with_gdb(self, argv: list[str]) -> list[str]:
        """``--gdb PORT`` on the first run or restore of this test only."""
        if self._gdb is None or not argv or argv[0] not in ("run", "restore"):
            return argv
        port, self._gdb = self._gdb, None
        print(f"\n    waiting for gdb on 127.0.0.1:{port} (gdb ELF -ex 'target remote :{port}')",
              flush=True)
        return [argv[0], "--gdb", str(port), *argv[1:]]

    def fail(self, message: str) -> None:
        raise Fail(message)

    def check(self, cond: object, message: str) -> None:
        if not cond:
            raise Fail(message)

    def expect_line(self, text: str, regex: str, message: str) -> re.Match[str]:
        """The first line of ``text`` matching ``regex``, else a failure."""
        m = re.search(regex, text, re.MULTILINE)
        if m is None:
            raise Fail(f"{message}\n    (no line matches /{regex}/)")
        return m


WIDTH = 92  # a message's lines, indented 4 by the grade's report


def prose(text: str) -> str:
    """A message's sentences wrapped to the report's width; quoted console
    lines (indented) kept as they are."""
    return "\n".join(line if line.startswith(" ") else textwrap.fill(line, WIDTH)
                     for line in text.split("\n"))


def fail(t: Ctx, message: str) -> None:
    """``t.fail`` with the message wrapped (prose)."""
    t.fail(prose(message))


def check(t: Ctx, cond: object, message: str) -> None:
    """``t.check`` with the message wrapped (prose)."""
    t.check(cond, prose(message))


def diff_lines(expected: list[str], got: list[str]) -> str:
    """Expected against got, line by line, as gradelib's assert_lines_match
    marks them: GOOD, BAD (got instead of expected), MISSING, EXTRA."""
    out = []
    for i in range(max(len(expected), len(got))):
        want = expected[i] if i < len(expected) else None
        have = got[i] if i < len(got) else None
        if want == have:
            out.append(f"    GOOD     {have}")
        elif have is None:
            out.append(f"    MISSING  {want}")
        elif want is None:
            out.append(f"    EXTRA    {have}")
        else:
            out.append(f"    BAD      {have}\n      (expected {want})")
    return "\n".join(out)
