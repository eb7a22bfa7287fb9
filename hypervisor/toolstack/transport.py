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
    (the command whose stdin and stdout are the wire); whether it switches
    to post-copy (``postcopy``), after how many pre-copy rounds at most
    (``precopy_iterations``, None: Xen's 5; 0: a pure post-copy)."""

    host: str
    port: int | None = None
    rune: str | None = None
    postcopy: bool = False
    precopy_iterations: int | None = None

    def describe(self) -> str:
        return f"{self.host}:{self.port}" if self.rune is None else f"`{self.rune}`"


def parse_hostport(text: str) -> tuple[str, int]:
    """HOST:PORT (PORT 0 to 65535); ValueError saying what is wrong."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:7001)")
    return host.strip("[]"), int(port)


def ssh_rune(host: str, ssh_command: str = "ssh", paused: bool = False,
             remus: bool = False) -> str:
    """main_migrate's rune: ``exec SSH HOST pvlab migrate-receive[ -p]``
    (main_remus's with `` -r``), or HOST itself when the ssh command is empty."""
    if not ssh_command:
        return host
    flag = " -r" if remus else " -p" if paused else ""
    return f"exec {ssh_command} {host} {RECEIVER}{flag}"


MIGRATE_USAGE = ("[-s CMD] [-p] [--postcopy] [--precopy-iterations N] HOST:PORT or "
                 "ssh:HOST")


def parse_destination(text: str) -> Destination:
    """A ``migrate`` request's argument: ``[-s CMD] [-p] [--postcopy]
    [--precopy-iterations N] DEST``, DEST being HOST:PORT (TCP, to a
    ``migrate-receive --listen``) or ssh:HOST (the ssh rune; -s CMD in ssh's
    place, -p the target leaves the domain paused). ``--postcopy`` switches
    to post-copy where the pre-copy policy stops, and
    ``--precopy-iterations`` bounds its rounds (Otto's xl options; 0 with
    --postcopy: no round, a pure post-copy). ValueError saying what is wrong."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"migrate {text!r}: {e}") from None
    ssh_command, paused, postcopy, rounds, dest = "ssh", False, False, None, []
    while words:
        w = words.pop(0)
        if w == "-s" and words:
            ssh_command = words.pop(0)
        elif w == "-p":
            paused = True
        elif w == "--postcopy":
            postcopy = True
        elif w == "--precopy-iterations" and words:
            rounds = _iterations(text, words.pop(0))
        else:
            dest.append(w)
    if len(dest) != 1:
        raise ValueError(f"migrate {text!r}: want {MIGRATE_USAGE}")
    if rounds == 0 and not postcopy:
        raise ValueError(f"migrate {text!r}: --precopy-iterations 0 needs --postcopy (no "
                         "round at all is a pure post-copy)")
    if dest[0].startswith(SSH_PREFIX) and dest[0] != SSH_PREFIX:
        host = dest[0][len(SSH_PREFIX):]
        return Destination(host, rune=ssh_rune(host, ssh_command, paused), postcopy=postcopy,
                           precopy_iterations=rounds)
    if paused or ssh_command != "ssh":
        raise ValueError(f"migrate {text!r}: -s and -p go with ssh:HOST (a TCP receiver "
                         "takes -p itself)")
    host, port = parse_hostport(dest[0])
    return Destination(host, port, postcopy=postcopy, precopy_iterations=rounds)


def _iterations(text: str, word: str) -> int:
    if not word.isdigit():
        raise ValueError(f"migrate {text!r}: --precopy-iterations wants a number of rounds, "
                         f"not {word!r}")
    return int(word)


def parse_remus_target(text: str) -> tuple[Destination, int | None]:
    """A ``remus`` request's argument: ``[-s CMD] [-i MS] DEST``, DEST being
    HOST:PORT (a ``migrate-receive -r --listen``) or ssh:HOST (main_remus's
    rune, ``... pvlab migrate-receive -r``); the interval in ns (None: xl's
    default). ValueError, one line, saying what is wrong."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"remus {text!r}: {e}") from None
    ssh_command, interval, dest = "ssh", None, []
    while words:
        w = words.pop(0)
        if w == "-s" and words:
            ssh_command = words.pop(0)
        elif w == "-i" and words:
            interval = _interval_ns(words.pop(0))
        else:
            dest.append(w)
    if len(dest) != 1:
        raise ValueError(f"remus {text!r}: want [-s CMD] [-i MS] HOST:PORT or ssh:HOST, "
                         "e.g. '3ms remus 127.0.0.1:7001 -i 5'")
    if dest[0].startswith(SSH_PREFIX) and dest[0] != SSH_PREFIX:
        host = dest[0][len(SSH_PREFIX):]
        return Destination(host, rune=ssh_rune(host, ssh_command, remus=True)), interval
    if ssh_command != "ssh":
        raise ValueError(f"remus {text!r}: -s goes with ssh:HOST")
    host, port = parse_hostport(dest[0])
    if port == 0:
        raise ValueError(f"remus {text!r}: port 0 is no backup's port")
    return Destination(host, port), interval


def _interval_ns(ms: str) -> int:
    """xl remus -i MS, in ns."""
    if not ms.isdigit() or int(ms) == 0:
        raise ValueError(f"remus -i {ms}: the interval is a number of milliseconds, "
                         "more than 0")
    return int(ms) * 1_000_000


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
    """A connection as a Channel; small messages (the handshake's, Remus's
    acknowledgements) leave at once (no Nagle)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        return accept_next(sock)
    finally:
        sock.close()


def accept_next(sock: socket.socket, timeout: float | None = None) -> Channel:
    """A connection on a socket kept listening (a post-copy's resume may
    come on it after a drop: QEMU's migrate-recover); OSError (TimeoutError)
    if none came within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        conn, _ = sock.accept()
    finally:
        sock.settimeout(None)
    conn.settimeout(None)
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


__all__ = ["Destination", "accept_next", "accept_one", "connect_tcp", "create_migration_child",
           "listen_tcp", "migration_child_report", "open_channel", "parse_destination",
           "parse_hostport", "parse_remus_target", "ssh_rune", "stdio_channel"]
