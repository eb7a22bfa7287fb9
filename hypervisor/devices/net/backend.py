"""The network device's host backends: where the frames a guest sends go,
and where the frames it receives come from.

* ``user`` (QEMU's -netdev user, slirp): a network of its own, 10.0.2.0/24,
  with the gateway 10.0.2.2 (MAC 52:55:0a:00:02:02, slirp's). The gateway
  answers ARP for its address and ICMP echo to it, the reply built by the
  host; it routes nothing else: every other frame is dropped and counted.
  A gratuitous ARP (an announcement) is counted and its sender learnt.
* ``socket`` (QEMU's -netdev socket / stream): frames on a stream socket,
  each a 4-byte big-endian length then the frame (net/stream.c's framing),
  over TCP (``HOST:PORT``) or a Unix socket (``unix:PATH``), listening or
  connecting. Two domains joined this way share an Ethernet segment, in
  one process or in two.

A backend never blocks the machine: the device polls it from a host timer
(``poll``); a socket is non-blocking and read as far as it has data. What
the peer's socket will not take now waits in a bounded queue (``OUT_MAX``),
sent from the poll; a frame past it is dropped and counted (``dropped``), as
a NIC drops what its full wire cannot take. A host error (a socket's, a
name that does not resolve) is counted (``errors``) and drops the peer (the
link goes down), never an exception out of ``send`` or ``poll``.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from hypervisor.devices import unixsock
from hypervisor.public.io.inet import (
    ARP_PKT,
    ARPOP_REPLY,
    ARPOP_REQUEST,
    ETH_BROADCAST,
    ETH_HDR,
    ETH_P_ARP,
    ETH_P_IP,
    ICMP_ECHO,
    ICMP_ECHOREPLY,
    ICMP_HDR,
    IP_HDR,
    IPPROTO_ICMP,
    arp_packet,
    eth_frame,
    icmp_echo,
    inet_checksum,
    ip_aton,
    ip_packet,
)
from hypervisor.public.io.virtio_net import VIRTIO_NET_MAX_FRAME

log = logging.getLogger(__name__)

USER_GATEWAY = ip_aton("10.0.2.2")
USER_GATEWAY_MAC = bytes.fromhex("52550a000202")
FRAME_LEN = 4                  # the stream framing's length word
READ_CHUNK = 65536
LEARNT_MAX = 16  # addresses the gateway remembers (slirp's ARP table is as small)
OUT_MAX = 256 * 1024           # bytes queued for a peer that does not read


class BackendError(ValueError):
    """A backend cannot be opened; the message says why and what to change."""


@dataclass
class UserStats:
    """What the user network's gateway saw."""

    arp_replies: int = 0       # ARP requests for the gateway answered
    echo_replies: int = 0      # echo requests to the gateway answered
    announcements: int = 0     # gratuitous ARPs heard
    arp_asked: int = 0         # ARP requests the gateway sent unasked (``unsolicited``)
    dropped: int = 0           # frames the gateway does not route or answer
    not_learnt: int = 0        # senders not remembered: the table was full (LEARNT_MAX)
    learnt: dict[str, str] = field(default_factory=dict)  # ip -> mac heard


class Backend:
    """What the device needs of a backend."""

    kind = ""
    errors = 0                 # host failures (a socket error): frames lost
    dropped = 0                # frames sent with the queue to the peer full

    def send(self, frame: bytes) -> None:
        """The guest sent ``frame``."""

    def poll(self) -> list[bytes]:
        """Frames for the guest that arrived since the last poll."""
        return []

    def unsolicited(self) -> list[bytes]:
        """A frame the network sends the guest unasked, if it has one (the
        explorer's injector, through the device's ``spontaneous``)."""
        return []

    def connected(self) -> bool:
        """Whether a peer is there (the link status)."""
        return True

    def config(self) -> dict[str, Any]:
        """How to open it again (persist.py)."""
        return {"type": self.kind}

    def close(self) -> None:
        pass


class UserBackend(Backend):
    """The user-mode network's gateway, answering ARP and ICMP echo."""

    kind = "user"

    def __init__(self) -> None:
        self.stats = UserStats()
        self.pending: list[bytes] = []

    def send(self, frame: bytes) -> None:
        dest, src, ethertype = ETH_HDR.unpack_from(frame)
        body = frame[ETH_HDR.size:]
        if ethertype == ETH_P_ARP and len(body) >= ARP_PKT.size:
            self._arp(src, body)
        elif ethertype == ETH_P_IP and len(body) >= IP_HDR.size and dest == USER_GATEWAY_MAC:
            self._ip(src, body)
        else:
            self.stats.dropped += 1

    def _learn(self, spa: bytes, sha: bytes) -> None:
        """Remember who has an address, as slirp's ARP table: at most
        LEARNT_MAX entries (a guest sending from ever new addresses must not
        grow the host's memory); past it, counted and not kept."""
        ip = ".".join(map(str, spa))
        if ip not in self.stats.learnt and len(self.stats.learnt) >= LEARNT_MAX:
            self.stats.not_learnt += 1
            return
        self.stats.learnt[ip] = sha.hex(":")

    def _arp(self, src: bytes, body: bytes) -> None:
        _, ptype, _, _, op, sha, spa, _, tpa = ARP_PKT.unpack_from(body)
        spa_i, tpa_i = int.from_bytes(spa, "big"), int.from_bytes(tpa, "big")
        if ptype != ETH_P_IP:
            self.stats.dropped += 1
            return
        if spa_i == tpa_i:  # gratuitous: the sender announces itself (RFC 5227)
            self.stats.announcements += 1
            self._learn(spa, sha)
            return
        if op == ARPOP_REQUEST and tpa_i == USER_GATEWAY:
            self.stats.arp_replies += 1
            self._learn(spa, sha)
            reply = arp_packet(ARPOP_REPLY, USER_GATEWAY_MAC, USER_GATEWAY, sha, spa_i)
            self.pending.append(eth_frame(src, USER_GATEWAY_MAC, ETH_P_ARP, reply))
            return
        if op == ARPOP_REPLY and tpa_i == USER_GATEWAY:  # an answer to unsolicited()
            self._learn(spa, sha)
            return
        self.stats.dropped += 1

    def unsolicited(self) -> list[bytes]:
        """The gateway asks who has the first address it learnt (slirp's
        arp_request before it forwards to a guest); none before it learnt one."""
        if not self.stats.learnt:
            return []
        ip = next(iter(self.stats.learnt))
        self.stats.arp_asked += 1
        request = arp_packet(ARPOP_REQUEST, USER_GATEWAY_MAC, USER_GATEWAY, bytes(6),
                             ip_aton(ip))
        return [eth_frame(ETH_BROADCAST, USER_GATEWAY_MAC, ETH_P_ARP, request)]

    def _ip(self, src: bytes, body: bytes) -> None:
        ver_ihl, _, tot_len, ident, _, _, proto, _, saddr, daddr = IP_HDR.unpack_from(body)
        ihl = (ver_ihl & 0xF) * 4
        icmp = body[ihl:tot_len]
        if (ver_ihl >> 4 != 4 or ihl < IP_HDR.size or tot_len > len(body)
                or inet_checksum(body[:ihl]) or proto != IPPROTO_ICMP
                or int.from_bytes(daddr, "big") != USER_GATEWAY or len(icmp) < ICMP_HDR.size
                or inet_checksum(icmp)):
            self.stats.dropped += 1
            return
        kind, _, _, echo_id, seq = ICMP_HDR.unpack_from(icmp)
        if kind != ICMP_ECHO:
            self.stats.dropped += 1
            return
        self.stats.echo_replies += 1
        reply = icmp_echo(ICMP_ECHOREPLY, echo_id, seq, icmp[ICMP_HDR.size:])
        packet = ip_packet(USER_GATEWAY, int.from_bytes(saddr, "big"), IPPROTO_ICMP, reply,
                           ident)
        self.pending.append(eth_frame(src, USER_GATEWAY_MAC, ETH_P_IP, packet))

    def poll(self) -> list[bytes]:
        out, self.pending = self.pending, []
        return out


def parse_address(text: str) -> tuple[int, Any]:
    """``HOST:PORT`` or ``unix:PATH`` as (family, address); BackendError if neither."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise BackendError(f"socket address {text!r}: the path after unix: is missing")
        return socket.AF_UNIX, path
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"socket address {text!r} is neither HOST:PORT nor unix:PATH")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


class StreamBackend(Backend):
    """Frames over a stream socket with QEMU's framing; ``listen`` waits for
    one peer (another takes its place when it goes), ``connect`` dials, and
    dials again while no one answers."""

    kind = "socket"

    def __init__(self, mode: str, address: str) -> None:
        if mode not in ("listen", "connect"):
            raise BackendError(f"socket backend: {mode!r} is neither listen nor connect")
        self.mode, self.address = mode, address
        self.family, self.addr = parse_address(address)
        self.listener: socket.socket | None = None
        self.sock: socket.socket | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()  # framed bytes the peer's socket has not taken yet
        self.errors = self.dropped = 0
        if mode == "listen":
            self._listen()
        else:
            self._dial()

    @classmethod
    def from_socket(cls, sock: socket.socket) -> StreamBackend:
        """A backend on a socket already connected (one end of a socketpair)."""
        self = cls.__new__(cls)
        self.mode, self.address, self.family, self.addr = "connect", "", sock.family, None
        self.listener, self.inbuf, self.outbuf = None, bytearray(), bytearray()
        self.errors = self.dropped = 0
        self._stream(sock)
        self.sock = sock
        return self

    def _listen(self) -> None:
        try:
            if self.family == socket.AF_UNIX:
                self.listener, self._inode = unixsock.listen(self.addr)
                return
            s = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(self.addr)
                s.listen(1)
            except OSError:
                s.close()
                raise
        except (OSError, unixsock.SocketPathError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise BackendError(f"socket backend: cannot listen on {self.address}: "
                               f"{why}") from None
        s.setblocking(False)
        self.listener = s

    def _stream(self, s: socket.socket) -> None:
        """Non-blocking; over TCP without Nagle's delay (a frame goes at once,
        as QEMU's stream backend sends it)."""
        s.setblocking(False)
        if s.family != socket.AF_UNIX:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _dial(self) -> None:
        s = None
        try:
            s = socket.socket(self.family, socket.SOCK_STREAM)  # EMFILE too: counted
            self._stream(s)
            rc = s.connect_ex(self.addr)
        except OSError as e:  # the host's name does not resolve (gaierror), ...
            if s is not None:
                s.close()
            self.errors += 1
            log.info("net socket %s: cannot dial: %s", self.address, e)
            return
        if rc not in (0, errno.EINPROGRESS):
            s.close()  # nobody there yet: dialled again at the next poll
            return
        self.sock = s

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            s, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.errors += 1
            log.info("net socket %s: accept failed: %s", self.address, e)
            return
        if unixsock.is_probe(s):
            s.close()  # another listener's look at the path, not a peer
            return
        self._stream(s)
        self.sock, self.inbuf, self.outbuf = s, bytearray(), bytearray()
        log.info("net socket %s: a peer connected", self.address)

    def _drop(self, why: str) -> None:
        log.info("net socket %s: %s", self.address, why)
        if self.sock is not None:
            self.sock.close()
        self.sock, self.inbuf, self.outbuf = None, bytearray(), bytearray()

    def connected(self) -> bool:
        return self.sock is not None

    def send(self, frame: bytes) -> None:
        """The frame queued for the peer and as much of the queue sent as
        its socket takes now; dropped (counted) if the queue is full."""
        if self.sock is None:
            self.poll_connection()
        if self.sock is None:
            self.errors += 1
            return
        if len(self.outbuf) + FRAME_LEN + len(frame) > OUT_MAX:
            self.dropped += 1  # the wire is full (QEMU's queue would hold it)
            return
        self.outbuf += len(frame).to_bytes(FRAME_LEN, "big") + frame
        self._flush()

    def _flush(self) -> None:
        """Queued bytes into the socket, as far as it takes them."""
        while self.sock is not None and self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.errors += 1
                self._drop(f"send failed: {e}")
                return
            del self.outbuf[:sent]

    def poll_connection(self) -> None:
        if self.sock is not None:
            return
        if self.listener is not None:
            self._accept()
        else:
            self._dial()

    def poll(self) -> list[bytes]:
        self.poll_connection()
        self._flush()
        if self.sock is None:
            return []
        while True:
            try:
                chunk = self.sock.recv(READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as e:
                self.errors += 1
                self._drop(f"receive failed: {e}")
                return []
            if not chunk:
                self._drop("the peer closed the connection")
                return []
            self.inbuf += chunk
        frames = []
        while len(self.inbuf) >= FRAME_LEN:
            n = int.from_bytes(self.inbuf[:FRAME_LEN], "big")
            if n > VIRTIO_NET_MAX_FRAME + 4 or n == 0:
                self.errors += 1
                self._drop(f"a frame of {n} bytes: the stream is not QEMU's framing")
                return frames
            if len(self.inbuf) < FRAME_LEN + n:
                break
            frames.append(bytes(self.inbuf[FRAME_LEN:FRAME_LEN + n]))
            del self.inbuf[:FRAME_LEN + n]
        return frames

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, self.mode: self.address}

    def close(self) -> None:
        for s in (self.sock, self.listener):
            if s is not None:
                s.close()
        if self.listener is not None and self.family == socket.AF_UNIX:
            unixsock.release(self.addr, self._inode)  # only if still ours
        self.sock = self.listener = None


def open_backend(config: dict[str, Any]) -> Backend:
    """The backend ``config`` names: {"type": "user"} or {"type": "socket",
    "listen" or "connect": ADDRESS}. BackendError if it cannot be opened."""
    kind = config.get("type")
    if kind == "user":
        return UserBackend()
    if kind == "socket":
        modes = [m for m in ("listen", "connect") if m in config]
        if len(modes) != 1:
            raise BackendError("a socket vif needs one of listen=ADDRESS or connect=ADDRESS")
        return StreamBackend(modes[0], str(config[modes[0]]))
    raise BackendError(f"vif type {kind!r} unknown (user or socket)")


__all__ = ["ETH_BROADCAST", "USER_GATEWAY", "USER_GATEWAY_MAC", "Backend", "BackendError",
           "StreamBackend", "UserBackend", "open_backend", "parse_address"]
