"""The terminal bridged to a domain's console socket: what xenconsole (Xen's
tools/console/client/main.c) does for ``xl console``.

xenconsole opens the pty xenconsoled made for the domain and copies bytes
both ways until the escape character; here the daemon's console socket
plays the pty (raw bytes both ways: what is typed reaches the guest through
its console backend, the guest's output comes back, the recent history
first). The terminal's side is console.py's ConsoleClient, the one that
``pvlab run --console`` uses: raw mode, Ctrl-] detaching, a pipe's end
typed as Ctrl-D."""

from __future__ import annotations

import os
import select
import socket
import sys
from pathlib import Path

from hypervisor.toolstack.console import ConsoleClient

DETACHED, CLOSED = "detached", "closed"


class AttachError(Exception):
    """The console socket cannot be reached."""


def attach(path: Path, name: str, term: ConsoleClient | None = None,
           half_close: bool = False) -> str:
    """Copy bytes between the terminal and the console socket at ``path``
    until Ctrl-] (DETACHED) or the daemon closes the socket (CLOSED). With
    ``half_close`` (a virtio-console port, where Ctrl-D means nothing) the
    end of piped input shuts the socket's sending half instead of typing
    Ctrl-D: the port's host side closes once the input is read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise AttachError(f"cannot attach to the console of {name} at {path}: "
                      f"{e.strerror or e}") from None
    if term is None:
        if os.isatty(sys.stdin.fileno()):
            print(f"pvlab: attached to the console of domain {name}; Ctrl-] detaches",
                  file=sys.stderr, flush=True)
        term = ConsoleClient()
    try:
        return _bridge(sock, term, half_close)
    finally:
        term.close()
        sock.close()


def _bridge(sock: socket.socket, term: ConsoleClient, half_close: bool = False) -> str:
    """The copying loop (xenconsole's console_loop)."""
    while True:
        watched = [sock] if term.closed else [sock, term.fd]
        ready, _, _ = select.select(watched, [], [])
        # the guest's output first: what came before Ctrl-] is shown
        if sock in ready:
            try:
                data = sock.recv(4096)
            except ConnectionError:
                data = b""
            if not data:
                return CLOSED
            term.write(data)
        if term.fd in ready:
            typed = term.poll(0.0)
            if half_close and term.closed:
                typed = typed[:-1]  # the Ctrl-D standing for the end of input
            if typed and not _send(sock, typed):
                return CLOSED
            if half_close and term.closed:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    return CLOSED
            if term.detached:
                return DETACHED


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionError):
        return False
    return True
