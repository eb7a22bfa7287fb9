"""The reviewer's race explored (docs/virtio.md): the balloon's detach
(option virtio.nodetach drops it, and the explorer finds its work adding a
buffer to a queue the freeze deleted), the explorer's runs forked from one
start, and the injector that throws a device's events at the steps of its
freeze, reset and restore. Every run here is forked at 2.9 ms, just before
the suspend at 3 ms, and stops at 3.3 ms, after the thaw."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hypervisor.toolstack.explore import Scenario, explore
from hypervisor.toolstack.timeparse import parse_duration
from tests.conftest import ROOT, checkout_env
from tests.explorer import outcomes, survives

FORK, UNTIL = "2900us", "3300us"
NODETACH = ("virtio: FAILURE: a buffer added to queue 0 after the freeze deleted it (option "
            "virtio.nodetach: the driver's users were not stopped)")
NOSYNC = "virtio: FAILURE: an interrupt of queue 2 handled after the reset deleted the queue"
FLUSHED = "virtio-mmio at 0xd0000000: reset: finished the interrupt that cpu1 had half handled"
SEEN = "FAILURE|finished|held back"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The race of docs/virtio.md, cheaper: a suspend (no image) at 3 ms,
    the balloon kept at its freeze (policy keep)."""
    def write(options: str = "") -> str:
        path = tmp_path_factory.mktemp("explore") / "race.toml"
        path.write_text(f'name = "race"\nmemory = 16\nvcpus = 2\n'
                        f'image = "{ROOT / "firmware/guest.elf"}"\n'
                        'cmdline = "run=hashchain:40:32 irqaffinity=1 '
                        f'virtio_balloon.policy=keep {options}"\nseed = 1\n'
                        'requests = ["1ms mem-set 12", "3ms suspend", "3005us mem-set 8"]\n'
                        '[balloon]\nstats_interval = "1ms"\n')
        return str(path)
    return write


def test_without_the_detach_the_balloons_work_adds_to_a_deleted_queue(config):
    """virtio.nodetach: the work goes on system_wq, which the freezer does
    not stop, and the freeze does not stop it either: the cpu that queued
    it runs it after the freeze deleted the queues."""
    got = outcomes(config("virtio.nodetach=1"), [1, 2], FORK, UNTIL, results=SEEN)
    assert all(NODETACH in lines for lines in got.values()), got


def test_the_detach_keeps_the_work_off_the_queues_under_every_schedule(config):
    survives(config(), range(1, 9), FORK, UNTIL)


@pytest.mark.slow
def test_the_balloon_survives_100_schedules_of_its_freeze_and_thaw(config):
    got = outcomes(config(), range(1, 101), FORK, UNTIL, results=SEEN)
    assert not [s for s, lines in got.items() if any("FAILURE" in x for x in lines)]
    # the flush had an interrupt to finish under some of them
    assert 10 < sum(FLUSHED in lines for lines in got.values()) < 90


def test_a_forked_run_replays_from_its_command_line(config):
    """The replay line of a forked run (pvlab run --sched-from) prints what
    the fork found."""
    path = config("virtio.nosync=1")
    sc = Scenario(path, parse_duration(UNTIL), fork_ns=parse_duration(FORK))
    groups = explore(sc, [2], jobs=1)
    assert any(NOSYNC in x for x in groups[0].outcome.results), groups
    cmd = sc.replay(2).split()
    assert cmd[:3] == ["pvlab", "run", path] and "--sched-from" in cmd
    r = subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", *cmd[1:]],
                       capture_output=True, text=True, env=checkout_env())
    assert NOSYNC in r.stdout and r.returncode == 0, r.stderr


def test_the_injector_throws_at_the_freeze_reset_and_thaw_and_stops_at_driver_ok(config):
    """By access: the window opens at the freeze's Status read and closes at
    the thaw's DRIVER_OK; the events at a live device are a config change and
    an interrupt, at a reset one a bare event."""
    sc = Scenario(config(), parse_duration(UNTIL), fork_ns=parse_duration(FORK),
                  inject_every=1)
    groups = explore(sc, [1], jobs=1)
    thrown = groups[0].thrown
    assert thrown[0].endswith("access 1 (read Status): config change, used buffer, "
                              "interrupt"), thrown
    assert any("(write Status 0x0): a bare event" in t for t in thrown)
    assert thrown[-1].endswith("(write Status 0xf): config change, used buffer, interrupt")
    assert groups[0].outcome.ok and groups[0].outcome.results == ()


def test_events_thrown_by_slice_find_the_unflushed_handler_where_none_came(config):
    """Seed 10's schedule alone leaves no interrupt half handled at the
    freeze; the events thrown every third slice give it one, and without the
    flush (virtio.nosync) its thread runs on a deleted queue."""
    path = config("virtio.nosync=1")
    plain = outcomes(path, [10], FORK, UNTIL)
    thrown = outcomes(path, [10], FORK, UNTIL, inject_every=3, slices=True)
    assert plain[10] == () and NOSYNC in " ".join(thrown[10]), (plain, thrown)


def test_the_balloon_survives_events_at_every_step(config):
    survives(config(), range(1, 7), FORK, UNTIL, inject_every=3)
    survives(config(), range(1, 7), FORK, UNTIL, inject_every=3, slices=True)


@pytest.mark.parametrize("args, error", [
    (["explore", "--fork-at", "3100us"], "--fork-at: the request at 3.000 ms"),
    (["explore", "--fork-at", "2ms", "--frames"], "--fork-at and --frames"),
    (["explore", "--inject-kind", "balloon"], "--inject-kind needs --inject-every"),
    (["explore", "--inject-every", "2", "--inject-kind", "nope"], "no such device kind"),
    (["explore", "--fork-at", "2ms", "--until", "1ms"], "is not before --until"),
    (["run", "--sched-from", "2ms"], "--sched-from needs --sched-seed"),
    (["run", "--inject-slices"], "--inject-slices needs --inject-every"),
])
def test_explore_and_run_refuse_bad_options_in_one_line(config, capsys, args, error):
    from hypervisor.toolstack import cli
    assert cli.main([args[0], config(), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert error in err and len(err.splitlines()) == 1, err
