"""The reviewer's race for virtio-blk, explored (docs/virtio-blk.md, "The
detach, explored"): blk-mq's dispatch from kblockd, which the freezer does
not stop, after the freeze deleted the queue.

Two blkcheck tasks write a disk whose request queue has 4 entries
(queue-size=4): one request fills it, so the other's waits in the software
queue and is put on the ring by kblockd once the first completes, or by the
next task's call. A suspend comes at 400 us. Without the detach (option
virtio.nodetach) kblockd's run, queued on cpu1 by the completion just before
the freeze, goes after the freeze deleted the ring under some schedules; with
it (the freeze dispatches what waits, then quiesces) every schedule ends with
both tasks' checksums and counters right. Every run is forked at 350 us and
writes a private copy of the disk."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from tests.explorer import outcomes, survives

FORK, UNTIL = "350us", "20ms"
RESULTS = r"blkcheck (checksum|FAILED)|FAILURE"
NODETACH = ("virtio: FAILURE: a buffer added to queue 0 after the freeze deleted it (option "
            "virtio.nodetach: the driver's users were not stopped)")
# the device's own invariant: each task's blocks read back as written (the
# pattern's checksum, no word bad) and its counter at its number of writes,
# 8: no write lost, none applied twice
BLK_INVARIANT = ("blkcheck checksum 9ac25f87f0c70325 counter 8 bad 0",
                 "blkcheck checksum d3d281a1f0c70325 counter 8 bad 0")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    def write(options: str = "") -> str:
        d = tmp_path_factory.mktemp("blkexplore")
        (d / "disk.img").write_bytes(bytes(2 << 20))
        path = d / "race.toml"
        path.write_text(f'name = "blkrace"\nmemory = 16\nvcpus = 2\nseed = 3\n'
                        f'image = "{ROOT / "firmware/guest.elf"}"\n'
                        'cmdline = "run=blkcheck:16:1:0,blkcheck:16:2:1024 irqaffinity=1 '
                        f'{options}"\n'
                        'disk = ["target=disk.img, vdev=xvda, access=rw, format=raw, '
                        'queue-size=4"]\n'
                        'requests = ["400us suspend"]\n')
        return str(path)
    return write


def test_without_the_detach_kblockd_dispatches_to_a_deleted_queue(config):
    """virtio.nodetach: the freeze leaves a request in the software queue and
    kblockd's run on cpu1 puts it on the ring the freeze deleted; the
    request fails (the task's write gets EIO). Seed 1's schedule runs kblockd
    after the thaw instead: it goes well."""
    got = outcomes(config("virtio.nodetach=1"), [1, 2, 3], FORK, UNTIL, results=RESULTS)
    assert all(NODETACH in got[s] and "blkcheck FAILED step 2 errno 5" in got[s]
               for s in (2, 3)), got
    assert got[1] == BLK_INVARIANT, got


def test_the_detach_keeps_kblockd_off_the_deleted_queue(config):
    """A few schedules with the device's events thrown at the steps of its
    freeze, reset and thaw; the 200 are the slow test below."""
    groups = survives(config(), range(1, 4), FORK, UNTIL, inject_every=3, results=RESULTS)
    assert groups[0].outcome.results == BLK_INVARIANT


@pytest.mark.slow
def test_the_disk_survives_200_schedules_of_its_freeze_and_thaw(config):
    groups = survives(config(), range(1, 201), FORK, UNTIL, inject_every=3, results=RESULTS)
    assert groups[0].outcome.results == BLK_INVARIANT
