"""Where the daemon's ``migrate`` sends a domain: QEMU's migration URIs.

* ``tcp:HOST:PORT``: a connection to ``pvlab migrate-receive --listen
  HOST:PORT`` on the other host;
* ``exec:COMMAND``: COMMAND run under ``sh -c`` with the wire on its stdin
  and stdout, as QEMU's exec: and as xl runs its ssh rune: ``exec:ssh HOST
  pvlab migrate-receive`` is ``xl migrate``'s way. What COMMAND says on its
  stderr (the receiver's "migration target: ..." lines, relayed by ssh) is
  handed line by line to the caller.

``open_uri`` makes migrate.Channel of either, with a way to cut it from
another thread (a daemon that stops while its job waits for the receiver).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hypervisor.toolstack.migrate import Channel

CONNECT_TIMEOUT_S = 30.0
EXIT_WAIT_S = 10.0   # how long the end of an exec: waits for its command to exit


@dataclass
class Wire:
    """An open migration URI: its channel, and how to cut it at once."""

    channel: Channel
    cut: Callable[[], None]


def check_uri(uri: str) -> str:
    """ValueError, in one line, unless ``uri`` is one the daemon can open."""
    kind, _, rest = uri.partition(":")
    if kind == "tcp":
        _host_port(rest, uri)
    elif kind != "exec" or not rest.strip():
        raise ValueError(f"uri {uri!r}: give tcp:HOST:PORT or exec:COMMAND")
    return uri


def _host_port(text: str, uri: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"uri {uri!r}: give tcp:HOST:PORT, PORT 1 to 65535")
    return host, int(port)


def open_uri(uri: str, stderr_line: Callable[[str], None]) -> Wire:
    """Connect (tcp:) or start the command (exec:); OSError if that fails."""
    kind, _, rest = check_uri(uri).partition(":")
    if kind == "tcp":
        return _tcp(*_host_port(rest, uri))
    return _exec(rest, stderr_line)


def _tcp(host: str, port: int) -> Wire:
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.settimeout(None)

    def cut() -> None:
        sock.shutdown(socket.SHUT_RDWR)
    return Wire(Channel(sock.makefile("rb"), sock.makefile("wb"), None,
                        lambda _wait: sock.close()), cut)


def _exec(command: str, stderr_line: Callable[[str], None]) -> Wire:
    """The command in a child of its own session (transport.create_migration_child,
    with its stderr relayed and a way to kill it)."""
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    err = proc.stderr

    def relay() -> None:
        for line in err:
            stderr_line(line.decode(errors="replace").rstrip("\n"))
    relay_thread = threading.Thread(target=relay, name="migrate-stderr", daemon=True)
    relay_thread.start()

    def close(wait: bool) -> None:
        """The command's end: waited for after a failure; after a success it
        runs on (the receiver keeps the domain), its lines relayed until it
        closes its stderr."""
        if wait:
            try:
                proc.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            relay_thread.join(EXIT_WAIT_S)
    return Wire(Channel(proc.stdout, proc.stdin, command, close), proc.kill)


__all__ = ["Wire", "check_uri", "open_uri"]
