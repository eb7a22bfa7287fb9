"""A person at the guest's console: what ``xl console`` (Xen's
tools/console/client/main.c) does for ``pvlab run --console``.

The terminal is put in raw mode, as xenconsole's cfmakeraw does, so every
byte typed goes to the guest as it is typed: the guest's line discipline
echoes it and edits the line (guestos/tty.py), not the host's. Output gets
``\\r`` before each ``\\n`` while the terminal is raw (the host's tty no
longer adds it; a Linux guest's tty would, with ONLCR). Ctrl-] (0x1d, xl's
escape character) detaches. Input that is not a terminal (a pipe, a file) is
passed on as it comes, and its end reaches the guest as Ctrl-D, the end of
file a terminal types (so a shell reading it exits).

The client only reads and writes the host's side; the bytes reach the guest
through the console daemon's ``feed`` (control.type_on_console), the one way
in that scripted ``type`` requests take too."""

from __future__ import annotations

import os
import select
import sys
import termios
import tty
from typing import BinaryIO

ESCAPE_CHAR = 0x1D  # Ctrl-]
EOF_CHAR = b"\x04"  # Ctrl-D


class ConsoleClient:
    """The host's terminal (or whatever stdin is) attached to a guest's console."""

    def __init__(self, fd: int | None = None, out: BinaryIO | None = None) -> None:
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.out = sys.stdout.buffer if out is None else out
        self.detached = False     # Ctrl-] was typed
        self.closed = False       # the input ended (a pipe's end)
        self._saved: list | None = None
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)

    @property
    def raw(self) -> bool:
        return self._saved is not None

    def poll(self, timeout_s: float = 0.0) -> bytes:
        """What was typed since the last poll (waiting up to ``timeout_s``
        for it): b"" if nothing; up to Ctrl-] when that detaches."""
        if self.closed or self.detached:
            return b""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return b""
        data = os.read(self.fd, 4096)
        if not data:
            self.closed = True
            return EOF_CHAR

        if ESCAPE_CHAR in data:
            self.detached = True
            data = data[:data.index(ESCAPE_CHAR)]
        return data

    def write(self, data: bytes) -> None:
        """Console output (and the toolstack's notes) to the terminal."""
        if self.raw:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.out.write(data)
        self.out.flush()

    def close(self) -> None:
        """Give the terminal back as it was."""
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
