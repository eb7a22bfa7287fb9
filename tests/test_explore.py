"""``pvlab explore``: a scenario under many schedules, its outcomes grouped
(hypervisor/toolstack/explore.py). It finds the race planted in stop_machine
(option stopmachinebug=ack) in some schedules, replays one bit for bit, and
the real kernel gives one outcome over hundreds of schedules."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from hypervisor.toolstack.explore import (
    ExploreError,
    Scenario,
    explore,
    format_seeds,
    parse_seeds,
    verdict,
)
from tests.conftest import ROOT, checkout_env

EXAMPLE = ROOT / "examples/stop-machine.toml"
FAILURE = "stop_machine: FAILURE: cpus ["
SPUN = "stop_machine: fn ran on cpu0 while cpus 1,2 spun with events masked"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The example with the planted race."""
    path = tmp_path_factory.mktemp("explore") / "stop-machine-bug.toml"
    text = EXAMPLE.read_text().replace('stopmachine=1"', 'stopmachine=1 stopmachinebug=ack"')
    path.write_text(text.replace('"../firmware/guest.elf"', f'"{ROOT / "firmware/guest.elf"}"'))
    return path


def test_seeds_are_ranges_and_lists():
    assert parse_seeds("1-3,7,2,9-10") == [1, 2, 3, 7, 9, 10]
    assert format_seeds([9, 1, 2, 3, 7, 10]) == "1-3, 7, 9-10"
    for bad in ("", "a-3", "5-2", "-1", "1-"):
        with pytest.raises(ExploreError):
            parse_seeds(bad)


def test_the_replay_command_names_the_run_exactly():
    assert Scenario("a b.toml", until_ns=20_000_000).replay(7) == (
        "pvlab run 'a b.toml' --sched-seed 7 --until 20.000ms")
    assert Scenario("c.toml", until_ns=1234, frames=True).replay(3) == (
        "pvlab run c.toml --seed 3 --sched-seed 3 --until 1234ns")
    assert Scenario("c.toml", seed=5).replay(3) == "pvlab run c.toml --seed 5 --sched-seed 3"


def test_explore_finds_the_planted_race(planted):
    scenario = Scenario(str(planted), results="stop_machine")
    groups = explore(scenario, parse_seeds("1-12"), jobs=2)
    assert len(groups) > 1 and verdict(groups) == 1
    racy = [g for g in groups if any(FAILURE in x for x in g.outcome.results)]
    assert racy and any(SPUN in g.outcome.results for g in groups)  # some schedules only
    seed = racy[0].seeds[0]
    assert scenario.replay(seed) == f"pvlab run {shlex.quote(str(planted))} --sched-seed {seed}"


def test_the_cli_groups_the_runs_and_its_replay_shows_the_race(planted):
    r = subprocess.run([sys.executable, "-m", "hypervisor", "explore", str(planted),
                        "--seeds", "1-8", "-j", "2", "--results", "stop_machine"],
                       cwd=ROOT, env=checkout_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("8 runs of ") and not first.endswith(": 1 outcome(s)"), first
    assert "explore: 8/8 runs" in r.stderr
    blocks = r.stdout.split("\noutcome ")[1:]
    racy = next(b for b in blocks if FAILURE in b)
    replay = next(x for x in racy.splitlines() if x.startswith("  replay: "))
    cmd = shlex.split(replay.removeprefix("  replay: "))
    assert cmd[:2] == ["pvlab", "run"]
    again = subprocess.run([sys.executable, "-m", "hypervisor", *cmd[1:]], cwd=ROOT,
                           env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert FAILURE in again.stdout, again.stdout


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "5-1"], "--seeds '5-1': 5-1 is no range of seeds"),
    (["--results", "("], "--results '(' is no regular expression"),
    (["-j", "-1"], "-j must be 0"),
    (["--frames", "--seed", "3"], "--seed is the frames' seed"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message):
    r = subprocess.run([sys.executable, "-m", "hypervisor", "explore", str(EXAMPLE), *argv],
                       cwd=ROOT, env=checkout_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("pvlab: " + message), r.stderr
    assert len(r.stderr.splitlines()) == 1 and not r.stdout


@pytest.mark.slow
def test_the_real_kernel_gives_one_outcome_over_hundreds_of_schedules():
    groups = explore(Scenario(str(EXAMPLE), results="stop_machine"), parse_seeds("1-200"),
                     jobs=2)
    assert len(groups) == 1, [(g.outcome, g.seeds[:5]) for g in groups]
    assert groups[0].outcome.reason == "poweroff" and verdict(groups) == 0
    assert groups[0].outcome.results == (SPUN, "stop_machine: starting (option stopmachine=)")


def test_a_test_guests_verdict_is_a_result():
    """The x86 hypercall suite under two schedules: its XTF verdict line is
    compared (before, only digests and FAILURE lines were)."""
    groups = explore(Scenario(str(ROOT / "examples/hypercalls.toml")), [1, 2], jobs=1)
    assert [(g.outcome.results, g.seeds) for g in groups] == [(("Test result: SUCCESS",), [1, 2])]
