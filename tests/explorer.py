"""The explorer in a test, in one line (docs/virtio.md, "Exploring a
device's freeze"): a device's configuration run under many schedules,
forked from one start just before its save, with the injector throwing the
device's events at the steps of its freeze, reset and restore.

    survives(config, range(1, 41), fork_at="2900us", until="3300us", inject_every=3)

fails the test with the explorer's report if any schedule's outcome differs
from the others' or went wrong (a FAILURE line, a crash, a hang);
``outcomes`` gives seed -> its result lines, to look for one line.
"""

from __future__ import annotations

from collections.abc import Iterable

from hypervisor.toolstack.explore import (
    DEFAULT_RESULTS,
    Group,
    Scenario,
    explore,
    report,
    verdict,
)
from hypervisor.toolstack.timeparse import parse_duration


def scenario(config: str, fork_at: str, until: str, inject_every: int = 0,
             slices: bool = False, kind: str | None = None,
             results: str = DEFAULT_RESULTS) -> Scenario:
    return Scenario(config, parse_duration(until), results=results,
                    fork_ns=parse_duration(fork_at), inject_every=inject_every,
                    inject_kind=kind, inject_unit="slice" if slices else "access")


def survives(config: str, seeds: Iterable[int], fork_at: str, until: str,
             inject_every: int = 0, slices: bool = False, kind: str | None = None,
             results: str = DEFAULT_RESULTS, jobs: int = 2) -> list[Group]:
    """Every run alike and well (else the test fails with the report)."""
    sc = scenario(config, fork_at, until, inject_every, slices, kind, results)
    groups = explore(sc, list(seeds), jobs)
    lines: list[str] = []
    report(sc, groups, lines.append)
    assert verdict(groups) == 0, "\n".join(lines)
    return groups


def outcomes(config: str, seeds: Iterable[int], fork_at: str, until: str,
             inject_every: int = 0, slices: bool = False, results: str = DEFAULT_RESULTS,
             jobs: int = 2) -> dict[int, tuple[str, ...]]:
    """Seed -> its result lines (sorted), every run ended well."""
    groups = explore(scenario(config, fork_at, until, inject_every, slices, results=results),
                     list(seeds), jobs)
    assert all(g.outcome.reason in ("poweroff", "running") for g in groups), groups
    return {seed: g.outcome.results for g in groups for seed in g.seeds}
