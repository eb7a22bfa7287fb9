"""GDB's remote serial protocol on a socket: packets, checksums, escapes and
acknowledgements, the transport under the gdb server (gdbsx.py).

A packet is ``$payload#cc``: cc the sum of the payload's bytes modulo 256,
in two hex digits; in the payload ``}`` escapes the next byte (which is
XORed with 0x20), so that ``$``, ``#``, ``}`` and ``*`` can be sent. Each
side acknowledges a packet with ``+`` (``-``: send it again) until both
agree to stop (QStartNoAckMode). A lone 0x03 byte, outside any packet, is
gdb's interrupt (Ctrl-C) while the target runs.
"""

from __future__ import annotations

import select
import socket

INTERRUPT = b"\x03"
_ESCAPE = 0x7D  # '}'
_SPECIAL = frozenset(b"$#}*")


class ConnectionClosed(Exception):
    """gdb went away."""


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in _SPECIAL:
            out += bytes((_ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append(next(it, 0) ^ 0x20 if b == _ESCAPE else b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """The packet that carries ``payload``."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


class Connection:
    """One gdb connection: whole packets in, packets out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.acks = True  # until QStartNoAckMode
        self.interrupt = False  # a 0x03 came
        self.last_sent = b""

    def _fill(self) -> None:
        data = self.sock.recv(4096)
        if not data:
            raise ConnectionClosed
        self.buf += data

    def _take_packet(self) -> bytes | None:
        """A whole packet's payload from the buffer, or None; drops the acks
        and interrupts before it, and answers a damaged packet with ``-``."""
        while self.buf:
            head = self.buf[0]
            if head == ord("$"):
                end = self.buf.find(b"#")
                if end < 0 or len(self.buf) < end + 3:
                    return None
                body, cc = bytes(self.buf[1:end]), bytes(self.buf[end + 1:end + 3])
                del self.buf[:end + 3]
                if cc != b"%02x" % checksum(body) and self.acks:
                    self.sock.sendall(b"-")
                    continue
                if self.acks:
                    self.sock.sendall(b"+")
                return unescape(body)
            del self.buf[0]
            if head == INTERRUPT[0]:
                self.interrupt = True
            elif head == ord("-") and self.last_sent:
                self.sock.sendall(self.last_sent)
        return None

    def read_packet(self) -> bytes:
        """The next packet's payload, waiting for it."""
        while True:
            payload = self._take_packet()
            if payload is not None:
                return payload
            self._fill()

    def poll_interrupt(self) -> bool:
        """Whether gdb sent Ctrl-C since it was last asked (never waits)."""
        if select.select([self.sock], [], [], 0)[0]:
            try:
                self._fill()
            except ConnectionClosed:
                return False
        self._take_acks_and_interrupts()
        hit, self.interrupt = self.interrupt, False
        return hit

    def _take_acks_and_interrupts(self) -> None:
        while self.buf and self.buf[0] != ord("$"):
            head = self.buf.pop(0)
            if head == INTERRUPT[0]:
                self.interrupt = True

    def send(self, payload: bytes) -> None:
        self.last_sent = frame(payload)
        self.sock.sendall(self.last_sent)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
