"""A listening Unix socket at a path, for the backends that listen on one
(a console port's socket, a net ``listen=unix:PATH``): one rule for whose
the path is, written once.

QEMU refuses to listen where something is; pvlab removes only a socket
nobody listens on (one left by a process that is gone, as a restore in a
new process finds its old one's). Anything else at the path is an error:
a regular file is never removed, a live listener never taken over.

The probe that tells a live socket from a stale one connects: a listener
refuses nothing, and the connection waits in its backlog until accepted.
So a listener, when it accepts, drops a connection that has already hung
up having sent nothing (``is_probe``): another listener's probe is not a
client. Close removes the path only if it is still the socket made here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat


class SocketPathError(ValueError):
    """The path cannot be listened on; the message says why (without the path)."""


def clear_stale(path: str) -> None:
    """Remove a socket at ``path`` that nobody listens on; nothing there is
    fine; SocketPathError if the path is in use or is no socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise SocketPathError(e.strerror or str(e)) from None
    if not stat.S_ISSOCK(mode):
        raise SocketPathError("the path exists and is no socket (it is left as it is)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # nobody listens: a stale socket
            return
        if e.errno not in (errno.EAGAIN, errno.EINPROGRESS):  # a full backlog is a live one
            raise SocketPathError(e.strerror or str(e)) from None
    finally:
        probe.close()
    raise SocketPathError("in use: another domain or process listens on it")


def listen(path: str, backlog: int = 1) -> tuple[socket.socket, int]:
    """A non-blocking socket listening at ``path`` (a stale one there
    removed first) and the inode of its path, for ``release``."""
    clear_stale(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(backlog)
        inode = os.stat(path).st_ino
    except OSError as e:
        s.close()
        raise SocketPathError(e.strerror or str(e)) from None
    s.setblocking(False)
    return s, inode


def release(path: str, inode: int) -> None:
    """Remove ``path`` if it is still the socket of ``inode`` (another may
    have taken the path since)."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


def hung_up(conn: socket.socket) -> bool:
    """The peer closed its end: a peek finds the end of file (input still
    before it is not the end: that is read first)."""
    if not select.select([conn], [], [], 0)[0]:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def is_probe(conn: socket.socket) -> bool:
    """A connection just accepted that hung up having sent nothing: another
    listener's ``clear_stale`` probe, not a client."""
    return hung_up(conn)
