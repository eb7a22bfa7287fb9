"""Shared fixtures: small configurations, booted machines that are always
closed, the suite's extra seed, and the environment of a child process."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hypervisor.core import Hypervisor
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.session import boot

if TYPE_CHECKING:
    from hypervisor.domain import Domain

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
GUEST_IMAGE = FIRMWARE / "guest.elf"


def make_config(cmdline: str = "run=hello", vcpus: int = 1, memory: int = 16,
                seed: int = 1, name: str = "test") -> DomainConfig:
    return DomainConfig(name=name, memory=memory, vcpus=vcpus, image=GUEST_IMAGE,
                        cmdline=cmdline, seed=seed)


# --- booted machines ---------------------------------------------------------------------

class Machines:
    """The machines a test makes, closed together at its end. Called as
    ``session.boot(cfg, ...)`` is (no config: make_config()'s), it boots one
    and returns (hv, dom); ``bare(mib, ...)`` gives an empty machine, for a
    test that builds several domains on one or needs another size than boot
    would choose."""

    def __init__(self) -> None:
        self._made: list[Hypervisor] = []

    def __call__(self, cfg: DomainConfig | None = None, **kwargs: Any
                 ) -> tuple[Hypervisor, Domain]:
        hv, dom = boot(make_config() if cfg is None else cfg, **kwargs)
        self._made.append(hv)
        return hv, dom

    def bare(self, mib: int, **kwargs: Any) -> Hypervisor:
        hv = Hypervisor(mib, **kwargs)
        self._made.append(hv)
        return hv

    def close(self) -> None:
        while self._made:
            self._made.pop().close()


@contextmanager
def booting() -> Iterator[Machines]:
    """Machines closed when the block ends, however it ends: for fixtures of
    a wider scope and for helpers that boot once per hypothesis example or per
    step of a sweep. A test takes the ``booted`` fixture instead."""
    machines = Machines()
    try:
        yield machines
    finally:
        machines.close()


@pytest.fixture
def booted() -> Iterator[Machines]:
    """``booted(cfg, seed=..., clock=...)`` boots a machine and returns (hv, dom);
    ``booted.bare(mib, ...)`` gives an empty one. All are closed at teardown."""
    with booting() as machines:
        yield machines


def save_example(path: Path, at_ns: int) -> Path:
    """examples/save-restore.toml saved at ``at_ns`` of virtual time (its own
    requests dropped): the good image that image tests damage copies of."""
    from hypervisor.toolstack.config import load_config
    from hypervisor.toolstack.session import save_domain
    cfg = load_config(ROOT / "examples" / "save-restore.toml")
    cfg.requests = []
    with booting() as boot:
        hv, dom = boot(cfg)
        save_domain(hv, dom, str(path), at_ns)
    return path


# --- the fast lane ------------------------------------------------------------------------

def sweep(values: Iterable[object], fast: int = 1) -> list[object]:
    """Parameters of a sweep (seeds, save times): the first ``fast`` of them
    run in `make check` too, the others only in `make test` (marked slow).
    The ids stay the values'."""
    return [v if i < fast else pytest.param(v, marks=pytest.mark.slow)
            for i, v in enumerate(values)]


# --- the extra seed ------------------------------------------------------------------------

SEED_VARIABLE = "PVLAB_TEST_SEED"


def extra_seed() -> int:
    """The seed some tests add to their fixed ones, so that runs on different
    days explore different schedules and frames: $PVLAB_TEST_SEED if set, else
    one drawn from today's date (UTC). Test ids name it "extra", never its
    value, so every process of a parallel run collects the same tests."""
    if os.environ.get(SEED_VARIABLE):
        return int(os.environ[SEED_VARIABLE])
    today = datetime.datetime.now(datetime.UTC).date()
    return 1000 + today.toordinal() * 7919 % 99000


EXTRA_SEED = extra_seed()


def pytest_configure(config: pytest.Config) -> None:
    # worker processes and child processes inherit the seed drawn here
    os.environ[SEED_VARIABLE] = str(EXTRA_SEED)


def _seed_line() -> str:
    return f"pvlab: extra seed {EXTRA_SEED} (repeat a run with {SEED_VARIABLE}={EXTRA_SEED})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The modules holding long tests first, each module's long tests first
    (a stable sort: the order is the same on every worker): started last, one
    of them would keep a core busy after the other has run out of tests. A
    module's tests stay together: xdist hands each worker a run of
    consecutive tests, and a module split between two workers makes its
    module-scoped fixtures (a reference run, a saved image) twice."""
    def slow(item: pytest.Item) -> bool:
        return item.get_closest_marker("slow") is not None

    first: dict[Path, int] = {}
    has_slow: set[Path] = set()
    for item in items:
        first.setdefault(item.path, len(first))
        if slow(item):
            has_slow.add(item.path)
    items.sort(key=lambda item: (item.path not in has_slow, first[item.path], not slow(item)))


def pytest_report_header(config: pytest.Config) -> str:
    return _seed_line()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    # the header is not shown with -q, the suite's default: say it at the end too
    terminalreporter.write_line(_seed_line())


# --- child processes -------------------------------------------------------------------------

def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a Python child process that must run this
    checkout's code (a restore "in a fresh process", the demo, the CLI): the
    checkout first on PYTHONPATH, ahead of any installed copy of the packages."""
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}
