"""The migration's transports: xl's ssh rune (xl_migrate.c main_migrate and
create_migration_child) and a plain TCP connection, each giving the
handshake (migrate.py) a Channel.

* ssh: ``exec ssh HOST pvlab migrate-receive[ -p]`` run under ``sh -c`` in a
  child whose stdin and stdout are the channel; ``-s CMD`` puts CMD in ssh's
  place, and an empty CMD runs HOST itself as the whole command, as xl's -s
  does. SIGPIPE is ignored, as xl ignores it: a receiver that dies is an
  error on the next write, not the sender's death.
* TCP: the sender connects to HOST:PORT, where ``pvlab migrate-receive
  --listen HOST:PORT`` accepts one connection.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO

from hypervisor.toolstack.migrate import Channel

log = logging.getLogger(__name__)

CHILD_REPORT_WAIT_S = 2.0  # migration_child_report's wait for the transport's exit
RECEIVER = "pvlab migrate-receive"  # what the rune runs on the other host
SSH_PREFIX = "ssh:"


@dataclass(frozen=True)
class Destination:
    """Where a migration goes: a TCP ``host`` and ``port``, or a ``rune``
    (the command whose stdin and stdout are the wire)."""

    host: str
    port: int | None = None
    rune: str | None = None

    def describe(self) -> str:
        return f"{self.host}:{self.port}" if self.rune is None else f"`{self.rune}`"


def parse_hostport(text: str) -> tuple[str, int]:
    """HOST:PORT (PORT 0 to 65535); ValueError saying what is wrong."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:7001)")
    return host.strip("[]"), int(port)


def ssh_rune(host: str, ssh_command: str = "ssh", paused: bool = False) -> str:
    """main_migrate's rune: ``exec SSH HOST pvlab migrate-receive[ -p]``, or
    HOST itself when the ssh command is empty."""
    if not ssh_command:
        return host
    return f"exec {ssh_command} {host} {RECEIVER}{' -p' if paused else ''}"


def parse_destination(text: str) -> Destination:
    """A ``migrate`` request's argument: ``[-s CMD] [-p] DEST``, DEST being
    HOST:PORT (TCP, to a ``migrate-receive --listen``) or ssh:HOST (the ssh
    rune; -s CMD in ssh's place, -p the target leaves the domain paused).
    ValueError saying what is wrong."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"migrate {text!r}: {e}") from None
    ssh_command, paused, dest = "ssh", False, []
    while words:
        w = words.pop(0)
        if w == "-s" and words:
            ssh_command = words.pop(0)
        elif w == "-p":
            paused = True
        else:
            dest.append(w)
    if len(dest) != 1:
        raise ValueError(f"migrate {text!r}: want [-s CMD] [-p] HOST:PORT or ssh:HOST")
    if dest[0].startswith(SSH_PREFIX) and dest[0] != SSH_PREFIX:
        host = dest[0][len(SSH_PREFIX):]
        return Destination(host, rune=ssh_rune(host, ssh_command, paused))
    if paused or ssh_command != "ssh":
        raise ValueError(f"migrate {text!r}: -s and -p go with ssh:HOST (a TCP receiver "
                         "takes -p itself)")
    host, port = parse_hostport(dest[0])
    return Destination(host, port)


def open_channel(dest: Destination, stderr: IO[bytes] | None = None) -> Channel:
    """The channel to ``dest``: the rune's child, or a TCP connection.
    OSError if it cannot be made."""
    if dest.rune is not None:
        return create_migration_child(dest.rune, stderr)
    return connect_tcp(dest.host, dest.port or 0)


def create_migration_child(rune: str, stderr: IO[bytes] | None = None) -> Channel:
    """``sh -c RUNE`` with pipes on its stdin and stdout (the child's stderr
    is ours unless ``stderr`` is given)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's default; xl's too
    child = subprocess.Popen(["sh", "-c", rune], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=stderr)
    assert child.stdin is not None and child.stdout is not None
    return Channel(child.stdout, child.stdin, rune,
                   lambda wait: migration_child_report(child, wait))


def migration_child_report(child: subprocess.Popen[bytes], wait: bool = True) -> int | None:
    """The transport's exit status, waited for a little (xl's 2 s): logged
    if it failed; None if it has not exited (it is left to run)."""
    if not wait:
        return child.poll()
    try:
        status = child.wait(CHILD_REPORT_WAIT_S)
    except subprocess.TimeoutExpired:
        log.warning("migration child [%d] not exiting, no longer waiting (exit status will "
                    "be unreported)", child.pid)
        return None
    if status:
        log.info("migration transport process [%d] exited with error status %d", child.pid,
                 status)
    return status


def _socket_channel(sock: socket.socket) -> Channel:
    return Channel(sock.makefile("rb"), sock.makefile("wb"), None, lambda _wait: sock.close())


def connect_tcp(host: str, port: int) -> Channel:
    """A connection to a ``pvlab migrate-receive --listen``."""
    return _socket_channel(socket.create_connection((host, port)))


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening socket for one migration (port 0: any free one); OSError
    if it cannot bind."""
    sock = socket.create_server((host, port), family=_family(host))
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def accept_one(sock: socket.socket) -> Channel:
    """The one connection; the listening socket is closed after it."""
    try:
        conn, _ = sock.accept()
    finally:
        sock.close()
    return _socket_channel(conn)


def stdio_channel() -> Channel:
    """This process's stdin and stdout, as ``xl migrate-receive`` speaks
    (ssh's end of the rune). The wire keeps copies of the two descriptors;
    stdin becomes /dev/null and stdout joins stderr, so that nothing else
    printed can land on the wire, and closing the channel ends the wire."""
    sys.stdout.flush()
    wire_in, wire_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return Channel(os.fdopen(wire_in, "rb"), os.fdopen(wire_out, "wb"))


__all__ = ["Destination", "accept_one", "connect_tcp", "create_migration_child",
           "listen_tcp", "migration_child_report", "open_channel", "parse_destination",
           "parse_hostport", "ssh_rune", "stdio_channel"]
