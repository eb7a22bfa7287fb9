"""The reviewer's race for virtio-net (docs/virtio-net.md, "The detach"):
the receive poll (NAPI, a work item the freezer does not stop) is what the
freeze's detach must stop; option virtio.nodetach drops the detach, and the
explorer finds the poll refilling the receive queue the freeze deleted.
Every run here is forked at 2.95 ms, just before the suspend at 3 ms, and
stops at 3.1 ms, after the thaw; the injector throws a frame from the
network (the gateway's ARP request) and the interrupt every third slice."""

from __future__ import annotations

import pytest

from hypervisor.devices.net.backend import UserBackend
from hypervisor.public.io.inet import ARP_PKT, ARPOP_REQUEST, ETH_HDR, ETH_P_ARP, ip_aton
from tests.conftest import ROOT
from tests.explorer import outcomes, survives

FORK, UNTIL = "2950us", "3100us"
NODETACH = ("virtio: FAILURE: a buffer added to queue 0 after the freeze deleted it (option "
            "virtio.nodetach: the driver's users were not stopped)")
THAWED = ("virtio_net: thawed: 16 of 16 receive buffers posted, 0 transmit slots in flight, "
          "link up")
POLLED = "virtio_net: freeze: the poll scheduled before it ran to its end"
ALIKE = "FAILURE|virtio_net: thawed"       # what every run must print alike
SEEN = "FAILURE|virtio_net: thawed|virtio_net: freeze:"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A guest pinging the gateway, with both cpus busy (hashchain on cpu1,
    which takes the device's interrupt), suspended (no image) at 3 ms."""
    def write(options: str = "") -> str:
        path = tmp_path_factory.mktemp("netrace") / "netrace.toml"
        path.write_text(f'name = "netrace"\nmemory = 16\nvcpus = 2\n'
                        f'image = "{ROOT / "firmware/guest.elf"}"\n'
                        'cmdline = "run=ping:0:6:10,hashchain:40:32 irqaffinity=1 '
                        f'{options}"\nseed = 1\nvif = ["type=user"]\n'
                        'requests = ["3ms suspend"]\n')
        return str(path)
    return write


def test_without_the_detach_the_poll_refills_a_deleted_queue(config):
    """virtio.nodetach: the poll a frame scheduled on cpu1 just before the
    freeze runs there after cpu0 deleted the queues, and posts its buffers."""
    got = outcomes(config("virtio.nodetach=1"), [1, 2], FORK, UNTIL, inject_every=3,
                   slices=True, results=SEEN)
    assert all(NODETACH in lines for lines in got.values()), got


def test_the_detach_keeps_the_poll_off_the_queues_under_every_schedule(config):
    """By access, all runs alike; by slice, the same seeds' polls that found
    the queues deleted above are run by the freeze's napi_disable instead."""
    survives(config(), range(1, 5), FORK, UNTIL, inject_every=3, results=ALIKE)
    got = outcomes(config(), range(1, 5), FORK, UNTIL, inject_every=3, slices=True,
                   results=SEEN)
    assert all(lines == (POLLED, THAWED) for lines in got.values()), got


@pytest.mark.slow
def test_the_net_driver_survives_200_schedules_of_its_freeze_and_thaw(config):
    """No FAILURE, nothing lost (every receive buffer posted again, no
    transmit slot held), and the poll the freeze ran had frames to take
    under most schedules: the race was there to lose. Then events at every
    third register access of the freeze, reset and thaw, all runs alike."""
    got = outcomes(config(), range(1, 201), FORK, UNTIL, inject_every=3, slices=True,
                   results=SEEN)
    assert all(set(lines) <= {THAWED, POLLED} and THAWED in lines
               for lines in got.values()), {s: x for s, x in got.items() if THAWED not in x}
    assert 100 < sum(POLLED in lines for lines in got.values()) < 200
    survives(config(), range(1, 61), FORK, UNTIL, inject_every=3, results=ALIKE)


def test_the_gateway_asks_for_the_guest_only_once_it_knows_it():
    """The injector's frame from the user network (Net.spontaneous): an ARP
    request for the address the gateway learnt; none before."""
    user = UserBackend()
    assert user.unsolicited() == []
    user.stats.learnt["10.0.2.15"] = "00:16:3e:00:00:01"
    (frame,) = user.unsolicited()
    ethertype = ETH_HDR.unpack_from(frame)[2]
    fields = ARP_PKT.unpack_from(frame, ETH_HDR.size)
    assert ethertype == ETH_P_ARP and fields[4] == ARPOP_REQUEST
    assert int.from_bytes(fields[8], "big") == ip_aton("10.0.2.15")
    assert user.stats.arp_asked == 1
