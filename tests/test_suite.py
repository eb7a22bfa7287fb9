"""The suite's own rules: every process collects the same test ids (a
parallel run compares them and refuses to start otherwise), every machine a
test boots is closed, no test asserts on wall-clock time (a loaded machine
fails it at random: timing belongs in bench/), the ABI's constants are
imported rather than copied, and a child process runs the code of the checkout
it was started from."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SEED_VARIABLE, booting, checkout_env

TESTS = ROOT / "tests"


def collected(seed: str, hash_seed: str) -> list[str]:
    env = checkout_env(**{SEED_VARIABLE: seed, "PYTHONHASHSEED": hash_seed})
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                        "--collect-only", "-q", "-o", "addopts=", str(TESTS)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return [line for line in p.stdout.splitlines() if "::" in line]


@pytest.mark.slow
def test_test_ids_do_not_depend_on_the_extra_seed_or_the_hash_seed():
    """Regression: the save/restore tests named a seed drawn at import in
    their ids, so each pytest-xdist worker collected other tests. Parameters
    taken from a set of strings would differ in order from process to process
    in the same way (string hashing is salted per process)."""
    a, b = collected("1111", "1"), collected("2222", "2")
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
