"""The console's device model: its ports, config space, features, and the
host timer that polls the ports' sockets (QEMU's hw/char/virtio-serial-bus.c
and virtio-console.c were the models).

* **ports**: each a name and a host end (backend.py): a listening Unix
  socket or a file. They are numbered from 1: port 0 is a console's in
  QEMU (a virtserialport may not take it), and this machine's console is
  the Xen PV console, so port 0 is never added and its two queues stay
  idle. ``max_nr_ports`` is the last port's id + 1.
* **features**: VERSION_1 and MULTIPORT (no SIZE: no port is a console; no
  EMERG_WRITE).
* **reset** (status 0): every port closed on the guest's side
  (QEMU's guest_reset), a held receive buffer forgotten; the host's side
  stays as it is (a client stays connected).
* **the poll**: every ``POLL_NS`` of system time while the domain runs, each
  socket is looked at without blocking: a client that came or went is told
  to the driver (PORT_OPEN), and input goes into the guest's buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hypervisor.devices.console.backend import Port, open_backend
from hypervisor.devices.console.event_handler import ConsoleEventHandler
from hypervisor.devices.console.metrics import ConsoleMetrics
from hypervisor.devices.virtio.mmio import VirtioDevice
from hypervisor.devices.virtio.queue import RingError
from hypervisor.public.io.virtio import VIRTIO_F_VERSION_1
from hypervisor.public.io.virtio_console import (
    VIRTIO_CONSOLE_CONFIG,
    VIRTIO_CONSOLE_CONFIG_SIZE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_PORT_OPEN,
    VIRTIO_ID_CONSOLE,
    nr_queues,
)

log = logging.getLogger(__name__)

QUEUE_SIZE = 16          # each queue (QEMU: 128 for data, 32 for control)
POLL_NS = 1_000_000      # the sockets are looked at every millisecond
MAX_PORTS = 16           # ports a device may have (max_nr_ports), port 0 included
MAX_NAME = 64            # bytes of a port's name


class Timers(Protocol):
    """The host's timers in system time (the scheduler's)."""

    def now(self) -> int: ...

    def add_timer(self, deadline_ns: int, owner: Any, fn: Callable[[], None]) -> None: ...

    def cancel_timers(self, owner: Any) -> None: ...


class ConsoleError(ValueError):
    """A console cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class ConsoleHost:
    """What the console is given by whoever creates it."""

    domid: int
    timers: Timers                  # the sockets' poll
    is_running: Callable[[], bool]  # the poll stops with the domain


class Console(ConsoleEventHandler, VirtioDevice):
    """virtio-console with MULTIPORT, the host's side. Its queue
    notifications are handled in event_handler.py, its state in persist.py."""

    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(self, host: ConsoleHost, ports: list[tuple[str, str, str]]) -> None:
        """``ports``: (name, connection, path) each, given ids 1, 2, ..."""
        if len(ports) + 1 > MAX_PORTS:
            raise ConsoleError(f"{len(ports)} console ports: at most {MAX_PORTS - 1}")
        self.host = host
        self.domid = host.domid
        self.metrics = ConsoleMetrics()
        self.ports: dict[int, Port] = {}
        try:
            for i, (name, connection, path) in enumerate(ports, start=1):
                self.ports[i] = Port(i, name, open_backend(connection, path))
        except ValueError:
            self.close()
            raise
        self.max_nr_ports = len(ports) + 1

    # --- what the transport asks --------------------------------------------------

    def features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_CONSOLE_F_MULTIPORT

    def queue_sizes(self) -> list[int]:
        return [QUEUE_SIZE] * nr_queues(self.max_nr_ports)

    def config_read(self, offset: int, size: int) -> int:
        if offset + size > VIRTIO_CONSOLE_CONFIG_SIZE:
            self.transport.bad_access(f"console config read at {offset:#x}, beyond its "
                                      f"{VIRTIO_CONSOLE_CONFIG_SIZE} bytes")
            return 0
        raw = VIRTIO_CONSOLE_CONFIG.pack(0, 0, self.max_nr_ports, 0)
        return int.from_bytes(raw[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        # emerg_wr is writable only with EMERG_WRITE, which is not offered
        self.transport.bad_access(f"console config write at {offset:#x}: read-only")

    def activate(self) -> None:
        self._arm_poll()

    def reset(self) -> None:
        for port in self.ports.values():
            port.guest_connected = False
            port.rx_held = port.tx_held = None
        self.host.timers.cancel_timers(self)

    def close(self) -> None:
        self.host.timers.cancel_timers(self)
        for port in self.ports.values():
            port.backend.close()

    # --- the poll ----------------------------------------------------------------------

    def _arm_poll(self) -> None:
        timers = self.host.timers
        timers.cancel_timers(self)
        if any(p.backend.connection == "socket" for p in self.ports.values()):
            timers.add_timer(timers.now() + POLL_NS, self, self._poll)

    def _poll(self) -> None:
        """Each socket: clients come and gone, input to the guest."""
        try:
            self.poll_ports()
        except RingError as e:
            self.transport.needs_reset(str(e))
            return
        if self.host.is_running():
            self._arm_poll()

    def poll_ports(self) -> None:
        """One look at every port's host end (the poll's work, also for tests)."""
        for port in self.ports.values():
            self.refresh(port)
            self.flush_output(port)
            self.serve_rx(port)

    def spontaneous(self) -> None:
        """The explorer's injector: a control message out of turn, each
        port's host side told again (PORT_OPEN, as QEMU tells a chardev's
        open and close events whenever they come)."""
        try:
            for port in self.ports.values():
                self.send_control(port.id, VIRTIO_CONSOLE_PORT_OPEN,
                                  int(port.backend.connected))
        except RingError as e:
            self.transport.needs_reset(str(e))

    # --- for the toolstack --------------------------------------------------------------

    def port_named(self, name: str) -> Port | None:
        return next((p for p in self.ports.values() if p.name == name), None)

    def info(self) -> dict[str, Any]:
        return {"ports": [{"id": p.id, "name": p.name, "connection": p.backend.connection,
                           "path": p.backend.path, "host_connected": p.backend.client_there(),
                           "guest_connected": p.guest_connected}
                          for p in self.ports.values()],
                "counters": self.metrics.nonzero()}
