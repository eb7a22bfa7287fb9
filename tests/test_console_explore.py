"""The reviewer's race explored for virtio-console (docs/virtio-console.md,
"The detach"): the control work runs on system_wq, which the freezer does
not stop; the freeze cancels it after the reset. Option virtio.nodetach
drops the cancel, and the explorer finds the work giving a control buffer
back to the queue the freeze deleted. The messages come from the injector
(the device's ``spontaneous``: PORT_OPEN out of turn), thrown every tenth
slice from the parting at 2.5 ms; the suspend is at 3 ms, the thaw done by
3.3 ms. portecho waits on a file port (its host side always open) across
the freeze: it must go on waiting."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from tests.explorer import outcomes, survives

FORK, UNTIL, EVERY = "2500us", "3300us", 10
FAILURE = ("virtio: FAILURE: a buffer added to queue 2 after the freeze deleted it (option "
           "virtio.nodetach: the driver's users were not stopped)")
CANCELLED = "control work cancelled (1 message dropped)"
# the console's invariant after the thaw: the driver agrees with the device
# on the port's host side (a file's: open) and the reader still waits (no
# "portecho:" line: neither input out of nothing nor an end of file)
RESULTS = "FAILURE|digest|portecho|virtio_console: (restored|frozen)"
RESTORED = "virtio_console: restored: vport0p1 host open"


def _kept(results: tuple[str, ...]) -> bool:
    return RESTORED in results and not any("portecho:" in x for x in results)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    def write(options: str = "") -> str:
        d = tmp_path_factory.mktemp("conrace")
        path = d / "race.toml"
        path.write_text(f'name = "conrace"\nmemory = 16\nvcpus = 2\n'
                        f'image = "{ROOT / "firmware/guest.elf"}"\n'
                        'cmdline = "run=hashchain:40:32,portecho irqaffinity=1 '
                        f'{options}"\nseed = 1\nrequests = ["3ms suspend"]\n'
                        'channel = ["name=log, connection=file, path=log.txt"]\n')
        return str(path)
    return write


def test_without_the_cancel_the_control_work_adds_to_a_deleted_queue(config):
    """Seeds 3 and 4: a PORT_OPEN taken on cpu1 just before the freeze, its
    work still waiting for cpu1's kworker. Without the option the freeze
    cancels it (the message dropped: the restore asks afresh); with it the
    work runs at cpu1's stop_machine IPI, after the queues went."""
    bad = outcomes(config("virtio.nodetach=1"), [3, 4], FORK, UNTIL, EVERY, slices=True,
                   results=RESULTS)
    good = outcomes(config(), [3, 4], FORK, UNTIL, EVERY, slices=True, results=RESULTS)
    assert all(FAILURE in lines for lines in bad.values()), bad
    assert all(FAILURE not in lines and _kept(lines) and any(CANCELLED in x for x in lines)
               for lines in good.values()), good


def test_the_console_survives_events_at_its_freeze(config):
    """A few schedules, events by slice and by access, every outcome alike."""
    for every, slices in ((EVERY, True), (3, False)):
        groups = survives(config(), range(1, 7), FORK, UNTIL, every, slices=slices,
                          results="FAILURE|digest|portecho|virtio_console: restored")
        assert _kept(groups[0].outcome.results)


@pytest.mark.slow
def test_the_console_survives_200_schedules_of_its_freeze_and_thaw(config):
    """200 schedules by slice and 100 by access: no FAILURE, no crash or
    hang, the invariant kept, every outcome alike but for how much the
    freeze's cancel dropped; under many schedules it had a message to drop
    (the detach mattered)."""
    groups = survives(config(), range(1, 101), FORK, UNTIL, 3,
                      results="FAILURE|digest|portecho|virtio_console: restored")
    assert _kept(groups[0].outcome.results)
    got = outcomes(config(), range(1, 201), FORK, UNTIL, EVERY, slices=True, results=RESULTS)
    alike = {tuple(x for x in lines if "frozen" not in x) for lines in got.values()}
    assert len(alike) == 1 and _kept(next(iter(alike))) and FAILURE not in next(iter(alike))
    assert 20 < sum(any(CANCELLED in x for x in lines) for lines in got.values()) < 180
