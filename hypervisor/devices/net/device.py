"""The network device's model: its config space (MAC and link status), the
features it offers, the frames between the guest and the backend, and the
announcement after a restore (QEMU's hw/net/virtio-net.c, Firecracker's
net/device.rs).

* **receive**: a frame from the backend goes into the next buffer the
  driver posted on the receive queue, after a zeroed 12-byte header
  (num_buffers 1); with no buffer posted, or the device not live, it is
  dropped and counted (as a NIC drops when its ring is empty).
* **transmit**: each buffer on the transmit queue is a header and a frame;
  one too short, too long or device-writable is counted and returned,
  never sent.
* **the backend is polled** from a host timer every ``POLL_NS`` of the
  machine's time while the device is live: no host fd is waited on.
* **announce** (QEMU's virtio_net_post_load_device and its announce timer):
  a device made from an image sets VIRTIO_NET_S_ANNOUNCE in its status and
  raises a config change when the driver is ready, if the driver took
  GUEST_ANNOUNCE; the driver sends a gratuitous ARP and acks on the
  control queue (VIRTIO_NET_CTRL_ANNOUNCE_ACK), which clears the bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hypervisor.devices.net.backend import Backend
from hypervisor.devices.net.event_handler import NetEventHandler
from hypervisor.devices.net.metrics import NetMetrics
from hypervisor.devices.virtio.mmio import VirtioDevice
from hypervisor.public.io.virtio import VIRTIO_F_VERSION_1
from hypervisor.public.io.virtio_net import (
    VIRTIO_ID_NET,
    VIRTIO_NET_CONFIG_SIZE,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
)

log = logging.getLogger(__name__)

QUEUE_SIZE = 64      # rx and tx
CTRL_QUEUE_SIZE = 16
POLL_NS = 100_000    # the backend's poll: 100 us of the machine's time


class Timers(Protocol):
    """The host's timers in virtual time (the scheduler's)."""

    def now(self) -> int: ...

    def add_timer(self, deadline_ns: int, owner: Any, fn: Callable[[], None]) -> None: ...

    def cancel_timers(self, owner: Any) -> None: ...


@dataclass(frozen=True)
class NetHost:
    """What the device is given by whoever creates it."""

    domid: int
    timers: Timers                  # the backend's poll
    is_running: Callable[[], bool]  # the poll stops with the domain


class Net(NetEventHandler, VirtioDevice):
    """The virtio network device, the host's side. Its queue notifications
    are handled in event_handler.py, its saved state in persist.py."""

    device_id = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(self, host: NetHost, mac: bytes, backend: Backend,
                 announce: bool = False) -> None:
        self.host = host
        self.domid = host.domid
        self.mac = mac
        self.backend = backend
        self.metrics = NetMetrics()
        self.link_up = backend.connected()
        self.announce_pending = announce  # set ANNOUNCE when the driver is ready
        self.status_announce = False

    # --- what the transport asks --------------------------------------------------

    def features(self) -> int:
        return (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
                | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE)

    def queue_sizes(self) -> list[int]:
        return [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]  # rx, tx, ctrl

    def status(self) -> int:
        return (VIRTIO_NET_S_LINK_UP if self.link_up else 0) \
            | (VIRTIO_NET_S_ANNOUNCE if self.status_announce else 0)

    def config_bytes(self) -> bytes:
        """mac[6], status le16."""
        return self.mac + self.status().to_bytes(2, "little")

    def config_read(self, offset: int, size: int) -> int:
        if offset + size > VIRTIO_NET_CONFIG_SIZE:
            self.transport.bad_access(f"net config read at {offset:#x}, beyond its "
                                      f"{VIRTIO_NET_CONFIG_SIZE} bytes")
            return 0
        return int.from_bytes(self.config_bytes()[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        # the MAC is the host's (VIRTIO_NET_F_MAC): a legacy driver's write
        # is ignored, as QEMU ignores it without VIRTIO_NET_F_CTRL_MAC_ADDR
        self.transport.bad_access(f"net config write at {offset:#x}: read-only")

    def activate(self) -> None:
        """DRIVER_OK: poll the backend; announce if made from an image."""
        self._arm_poll()
        if self.announce_pending and self.transport.negotiated(VIRTIO_NET_F_GUEST_ANNOUNCE):
            self.announce_pending = False
            self.status_announce = True
            self.metrics.announces += 1
            self.transport.config_changed()

    def reset(self) -> None:
        """Status 0: no poll (frames wait in the backend's socket), no
        announcement in progress. The MAC and the link stay."""
        self.status_announce = False
        self.host.timers.cancel_timers(self)

    def spontaneous(self) -> None:
        """A frame from the network now, as between two polls (the
        explorer's injector): what the backend has, and what its network
        sends unasked (the user gateway's ARP request for the guest)."""
        if self.transport.live:
            self.receive_frames(self.backend.poll() + self.backend.unsolicited())

    def close(self) -> None:
        self.host.timers.cancel_timers(self)
        self.backend.close()

    # --- the backend's poll --------------------------------------------------------

    def _arm_poll(self) -> None:
        timers = self.host.timers
        timers.cancel_timers(self)
        timers.add_timer(timers.now() + POLL_NS, self, self._poll)

    def _poll(self) -> None:
        """Frames from the backend to the guest; the link's state."""
        if not self.transport.live:
            return
        try:
            frames = self.backend.poll()
        except OSError as e:  # a backend's own failure: counted, never the host's
            log.info("d%d virtio-net: backend: %s", self.domid, e)
            self.backend.errors += 1
            frames = []
        self.receive_frames(frames)
        self.backend_counts()
        self._check_link()
        if self.host.is_running():
            self._arm_poll()

    def _check_link(self) -> None:
        up = self.backend.connected()
        if up != self.link_up:
            self.set_link(up)

    def set_link(self, up: bool) -> None:
        """The link goes up or down (QEMU's set_link): a config change."""
        if up == self.link_up:
            return
        self.link_up = up
        self.metrics.link_changes += 1
        log.info("d%d virtio-net: link %s", self.domid, "up" if up else "down")
        self.transport.config_changed()

    def info(self) -> dict[str, Any]:
        """What the host shows of the device."""
        return {"mac": self.mac.hex(":"), "backend": self.backend.config(),
                "link": self.link_up, "counters": self.metrics.nonzero()}
