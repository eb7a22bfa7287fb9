"""``pvlab lab grade``: run a lab's graded tests and give the score."""

from __future__ import annotations

import json
import shlex
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labs import LabError
from labs.gradelib import Ctx, Fail, GradedTest, Settings, tests_of


@dataclass
class Outcome:
    test: GradedTest
    ok: bool
    message: str
    seconds: float
    bug: bool = False         # the grader itself raised: not the student's fault

    @property
    def earned(self) -> int:
        return self.test.points if self.ok else 0


class Grade:
    """One grade run: the outcomes so far and the parents' results."""

    def __init__(self, settings: Settings, out: Any) -> None:
        self.settings = settings
        self.out = out
        self.outcomes: dict[str, Outcome] = {}
        self.results: dict[str, Any] = {}

    def run(self, test: GradedTest) -> Outcome:
        if test.name in self.outcomes:
            return self.outcomes[test.name]
        started = time.monotonic()
        parent = None
        if test.parent is not None:
            up = self.run(test.parent)
            if not up.ok:
                self._head(test)
                return self._done(test, False, f"needs \"{up.test.title}\", which failed",
                                  started)
            parent = self.results.get(up.test.name)
        ctx = Ctx(self.settings, test, parent)
        self._head(test)
        try:
            self.results[test.name] = test.fn(ctx)
        except Fail as e:
            return self._done(test, False, self._explain(ctx, str(e)), started)
        except Exception:  # noqa: BLE001 - a grader's own bug is reported, not hidden
            return self._done(test, False, "the grader failed (not your code's fault; "
                              "report it):\n" + traceback.format_exc(), started, bug=True)
        return self._done(test, True, "", started)

    def _explain(self, ctx: Ctx, message: str) -> str:
        lab, flags = self.settings.lab.name, self.settings.replay_flags()
        lines = [message]
        if ctx.seed is not None:
            replay = ["pvlab", "lab", "grade", lab, *flags, "--test", ctx.test.name,
                      "--seed", str(ctx.seed)]
            lines.append(f"seed {ctx.seed}; replay: {shlex.join(replay)}")
        if ctx.last is not None:
            run = ["pvlab", "lab", "run", lab, *flags, "--", *ctx.last.args]
            lines.append(f"the run:  {shlex.join(run)}")
        return "\n".join(lines)

    def _done(self, test: GradedTest, ok: bool, message: str, started: float,
              bug: bool = False) -> Outcome:
        outcome = Outcome(test, ok, message, time.monotonic() - started, bug)
        self.outcomes[test.name] = outcome
        self._print(outcome)
        return outcome

    def _head(self, t: GradedTest) -> None:
        """The test's line up to its verdict, shown while it runs."""
        points = f" [{t.points} pt{'s' if t.points != 1 else ''}]" if t.points else ""
        end = "\n" if self.settings.verbose else "  "   # the runs' commands come next
        self.out.write(f"== {self.settings.lab.name}: {t.title} =={points}{end}")
        self.out.flush()

    def _print(self, o: Outcome) -> None:
        lead = "    -> " if self.settings.verbose else ""
        self.out.write(f"{lead}{'OK' if o.ok else 'FAIL'} ({o.seconds:.1f}s)\n")
        for line in o.message.rstrip().splitlines():
            self.out.write(f"    {line}\n")
        self.out.flush()


def grade(settings: Settings, out: Any, only: str | None = None) -> Grade:
    """Run the lab's tests (or only one, with its parents) and print the score."""
    tests = tests_of(settings.lab.tests)
    if only is not None:
        chosen = [t for t in tests if t.name == only]
        if not chosen:
            names = ", ".join(t.name for t in tests)
            raise LabError(f"lab {settings.lab.name} has no test {only!r} (its tests: {names})")
        tests = chosen
    g = Grade(settings, out)
    try:
        for t in tests:
            g.run(t)
    finally:
        settings.close()
    earned, total = score(g)
    out.write(f"Score: {earned}/{total}\n")
    return g


def score(g: Grade) -> tuple[int, int]:
    graded = list(g.outcomes.values())
    return sum(o.earned for o in graded), sum(o.test.points for o in graded)


def write_json(g: Grade, path: Path) -> None:
    earned, total = score(g)
    doc = {"lab": g.settings.lab.name, "score": earned, "total": total,
           "tests": [{"name": o.test.name, "title": o.test.title, "points": o.test.points,
                      "earned": o.earned, "ok": o.ok, "message": o.message}
                     for o in g.outcomes.values()]}
    path.write_text(json.dumps(doc, indent=2) + "\n")
