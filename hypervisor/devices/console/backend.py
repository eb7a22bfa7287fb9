"""The host's end of a console port (QEMU's chardevs behind a virtio-serial
port): a listening Unix socket that one client at a time connects to, or a
file that the guest's output is appended to.

Nothing here blocks: the device polls (``refresh``) from a host timer and
when the guest asks, and reads only what a guest buffer can take, so input
the guest has no room for waits in the socket, not in the host.

* **socket** (QEMU's ``-chardev socket,server=on,wait=off``): listening at
  ``path``; a client that connects opens the host side (the device sends
  PORT_OPEN 1), its end of file closes it (PORT_OPEN 0). A second client
  while one is connected is refused (accepted and closed at once). Output
  the socket will not take now (the client does not read) waits: the port
  is throttled, as QEMU throttles a generic port (virtio-console.c's
  flush_buf; only a console port, which this device never has, drops the
  rest so that hvc never blocks). With no client, output is discarded.
* **file** (QEMU's ``-chardev file``): output appended, no input; the host
  side is always open.
"""

from __future__ import annotations

import logging
import select
import socket
from dataclasses import dataclass, field

from hypervisor.devices import unixsock
from hypervisor.devices.virtio.queue import Chain

log = logging.getLogger(__name__)

SOCKET, FILE = "socket", "file"
CONNECTIONS = (SOCKET, FILE)


class BackendError(ValueError):
    """A port's host end cannot be set up; the message says why."""


class Backend:
    """What a port's host end does; the base class is a sink with no input."""

    connection = ""
    throttles = False  # output it cannot take now waits (else it is dropped)

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def connected(self) -> bool:
        """The host side is open (a client is there)."""
        return True

    def client_there(self) -> bool:
        """Someone is at the host's end: connected, or waiting to be taken."""
        return self.connected

    def refresh(self) -> str:
        """Take a new client or notice one gone: "connected", "disconnected" or ""."""
        return ""

    def read(self, size: int) -> bytes | None:
        """Up to ``size`` bytes of input: None if none now; b"" at the
        client's end of file (the host side is closed then)."""
        return None

    def read_data(self, size: int) -> bytes | None:
        """As read, but the end of file is left to be read later (None)."""
        return None

    def write(self, data: bytes) -> int:
        """Output: how many bytes the host took now (0 .. len(data))."""
        return len(data)

    def close(self) -> None:
        pass


class FileBackend(Backend):
    connection = FILE

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            self.file = open(path, "ab", buffering=0)  # noqa: SIM115 (held until close)
        except OSError as e:
            raise BackendError(f"cannot open {path} for a console port: "
                               f"{e.strerror or e}") from None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data) or 0
        except OSError as e:
            log.warning("console port file %s: %s", self.path, e)
            return 0

    def close(self) -> None:
        self.file.close()


class SocketBackend(Backend):
    connection = SOCKET
    throttles = True

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.client: socket.socket | None = None
        self.refused = 0  # clients turned away while one was connected
        try:
            self.listener, self._inode = unixsock.listen(path)
        except unixsock.SocketPathError as e:
            raise BackendError(f"console port socket {path}: {e}") from None

    @property
    def connected(self) -> bool:
        return self.client is not None

    def client_there(self) -> bool:
        return self.client is not None or bool(select.select([self.listener], [], [], 0)[0])

    def refresh(self) -> str:
        """A client gone (end of file, an error) closes the host side; a new
        one waiting at the listener opens it."""
        event = ""
        if self.client is not None and self._hung_up():
            self._drop_client()
            event = "disconnected"
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("console port socket %s: accept: %s", self.path, e)
                break
            if unixsock.is_probe(conn):
                conn.close()  # another listener's look at the path: no client
                continue
            if self.client is not None:
                self.refused += 1  # one client at a time, as a chardev
                conn.close()
                continue
            conn.setblocking(False)
            self.client = conn
            event = "connected" if event == "" else ""  # gone and back: no change seen
        return event

    def _hung_up(self) -> bool:
        assert self.client is not None
        return unixsock.hung_up(self.client)

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def read(self, size: int) -> bytes | None:
        if self.client is None or size <= 0:
            return None
        try:
            data = self.client.recv(size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self._drop_client()
        return data

    def read_data(self, size: int) -> bytes | None:
        if self.client is None or self._hung_up():
            return None
        return self.read(size)

    def write(self, data: bytes) -> int:
        if self.client is None:
            return 0
        try:
            return self.client.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return 0  # gone: the next refresh sees the end

    def close(self) -> None:
        self._drop_client()
        self.listener.close()
        unixsock.release(self.path, self._inode)


@dataclass
class Port:
    """One port of the device: its id, name and host end, and what the device
    knows of it."""

    id: int
    name: str
    backend: Backend
    console: bool = False           # CONSOLE_PORT is sent for it (never, yet)
    guest_connected: bool = False   # the guest has it open (its PORT_OPEN)
    rx_held: Chain | None = field(default=None, repr=False)  # a receive buffer, no input yet
    # a throttled output buffer (QEMU's port->elem and its offset): its data,
    # of which tx_done bytes went; used when all has gone
    tx_held: Chain | None = field(default=None, repr=False)
    tx_data: bytes = field(default=b"", repr=False)
    tx_done: int = 0


def open_backend(connection: str, path: str) -> Backend:
    """A port's host end of kind ``connection`` (socket or file) at ``path``."""
    if connection == SOCKET:
        return SocketBackend(path)
    if connection == FILE:
        return FileBackend(path)
    raise BackendError(f"console port connection {connection!r} unknown (one of "
                       f"{', '.join(CONNECTIONS)})")

