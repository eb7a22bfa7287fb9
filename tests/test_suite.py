"""The suite's own rules: every process collects the same test ids (a
parallel run compares them and refuses to start otherwise), every machine a
test boots is closed, no test asserts on wall-clock time (a loaded machine
fails it at random: timing belongs in bench/), the ABI's constants are
imported rather than copied, and a child process runs the code of the checkout
it was started from."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXTRA_SEED, ROOT, SEED_VARIABLE, booting, checkout_env

TESTS = ROOT / "tests"


def collected(seed: str, hash_seed: str) -> list[str]:
    env = checkout_env(**{SEED_VARIABLE: seed, "PYTHONHASHSEED": hash_seed})
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                        "--collect-only", "-q", "-o", "addopts=", str(TESTS)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return [line for line in p.stdout.splitlines() if "::" in line]


def whole_suite_here(config: pytest.Config, session: pytest.Session) -> list[str] | None:
    """The ids this process collected, when it collected the whole suite with
    nothing left out (as ``make test`` does); else None."""
    args = {Path(a).resolve() for a in config.args}
    narrowed = (config.option.keyword or config.option.markexpr
                or config.getoption("deselect", None) or config.getoption("lf", False))
    return None if args != {TESTS} or narrowed else [item.nodeid for item in session.items]


def other_seeds() -> tuple[str, str]:
    """An extra seed and a hash seed other than this process's (and than
    those of the first collection of a narrower run)."""
    hash_seed = "2" if os.environ.get("PYTHONHASHSEED") != "2" else "3"
    return str(EXTRA_SEED + 1 if EXTRA_SEED + 1 != 1111 else 2222), hash_seed


@pytest.mark.slow
def test_test_ids_do_not_depend_on_the_extra_seed_or_the_hash_seed(request):
    """Regression: the save/restore tests named a seed drawn at import in
    their ids, so each pytest-xdist worker collected other tests. Parameters
    taken from a set of strings would differ in order from process to process
    in the same way (string hashing is salted per process). A run of the whole
    suite compares its own collection with one made under other seeds; a
    narrower run makes two."""
    here = whole_suite_here(request.config, request.session)
    a = here if here is not None else collected("1111", "1")
    b = collected(*other_seeds())
    assert len(a) > 300 and a == b


def test_every_machine_booted_is_closed_however_the_test_ends():
    closed: list[int] = []

    def watched(hv):
        real = hv.close
        hv.close = lambda: closed.append(1) or real()

    with booting() as boot:
        watched(boot()[0])
        watched(boot()[0])
    assert closed == [1, 1]
    with pytest.raises(RuntimeError, match="a failing test"), booting() as boot:
        watched(boot()[0])
        raise RuntimeError("a failing test")
    assert closed == [1, 1, 1]


def _sources(*dirs: str) -> list:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_no_test_asserts_on_wall_clock_time():
    clock = re.compile(r"\btime\.(perf_counter|monotonic|time|process_time)(_ns)?\(")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in _sources("tests")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if clock.search(line)]
    assert offenders == []


def test_virt_base_is_declared_once_in_the_abi():
    copies = [str(p.relative_to(ROOT)) for p in _sources("tests", "bench", "tools")
              if re.search(r"^VIRT_BASE\s*=", p.read_text(), re.M)]
    assert copies == []


def test_a_child_process_runs_this_checkouts_code(tmp_path):
    """Started elsewhere, with checkout_env(), a child imports the packages
    from this checkout, not from whatever copy is installed."""
    code = "import guestos, hypervisor; print(guestos.__file__); print(hypervisor.__file__)"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=checkout_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    paths = p.stdout.split()
    assert len(paths) == 2 and all(path.startswith(str(ROOT) + "/") for path in paths), paths
