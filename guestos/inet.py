"""The guest's network stack, cut to what ping needs (Linux's net/ipv4/arp.c,
ip_input.c/ip_output.c and icmp.c): an ARP cache that learns and answers,
IPv4 without options or fragments, and ICMP echo, both ways.

One network device feeds it (virtio_net.py calls ``netif_receive`` with
each frame) and sends for it (``inet_init`` is given the device and its
exported transmit function, named by symbol number: the stack never names
a driver). Everything is in one page of guest memory, the INET struct and
its tables (below), so a restored kernel in a fresh process goes on with
the same cache, the same pings in flight and the same replies waiting.

* **ARP**: a request for our address is answered; the sender of any ARP
  (a request, a reply, a gratuitous one) is learnt. An IPv4 packet to an
  address not in the cache waits in the one pending slot (Linux's
  neighbour queue, of length one) while a request goes out; the reply
  sends it. A gratuitous ARP (sender = target address) is how a guest
  announces itself after a restore (``arp_announce``).
* **routing**: the guest's /24 is on the link; anything else goes to the
  gateway (``ip=ADDR::GW``, default 10.0.2.2, QEMU's user network).
* **ICMP**: an echo request to us is answered; an echo reply with our
  identifier is queued (at most ``REPLY_SLOTS``) with its round trip time,
  taken from the send time of its sequence number, for the ``icmp`` node's
  reader.

The ``icmp`` node (guestos/fs.py's device_create, made by ``inet_init``) is
ping's socket: write(fd, {u32 daddr, u16 seq}, 8) sends an echo request;
read(fd, buf, 16) gives the next reply, {u32 saddr, u16 seq, u8 ttl, u8 0,
u32 rtt_us, u32 bytes}, or 0 bytes if none has come (it never blocks: ping
sleeps between its requests and reads what came).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from guestos.fs import device_create, file_operations, wake_up_node
from guestos.kdata import driver_data, set_driver_data
from guestos.layout import Layout, Ref
from guestos.mm import alloc_pages, va
from guestos.printk import printk
from guestos.symbols import export, symbol, symbol_number
from guestos.time import now
from guestos.usercopy import copy_from_user, copy_to_user
from hypervisor.public.errno import EFAULT, EINVAL, ENOBUFS, ENODEV
from hypervisor.public.io.inet import (
    ARP_PKT,
    ARPHRD_ETHER,
    ARPOP_REPLY,
    ARPOP_REQUEST,
    ETH_ALEN,
    ETH_BROADCAST,
    ETH_HDR,
    ETH_P_ARP,
    ETH_P_IP,
    ICMP_ECHO,
    ICMP_ECHOREPLY,
    ICMP_HDR,
    IP_HDR,
    IPPROTO_ICMP,
    PING_DATA_LEN,
    arp_packet,
    eth_frame,
    icmp_echo,
    inet_checksum,
    ip_aton,
    ip_ntoa,
    ip_packet,
)
from hypervisor.public.native import NativeCpu

INET = Layout("inet", [
    ("netdev", "u64"),        # the device's VA (0: no device yet)
    ("xmit", "u64"),          # symbol of its transmit: xmit(cpu, netdev, frame) -> 0 | -errno
    ("mac", "u64"),           # our MAC, as a big-endian number
    ("ip", "u64"),            # our address (host order)
    ("gateway", "u64"),
    ("ident", "u64"),         # ping's ICMP identifier
    ("node", "u64"),          # the icmp node's index (guestos/fs.py), or -1
    ("ip_id", "u64"),         # the next IPv4 identification
    ("reply_head", "u64"),    # replies queued for the icmp node: head (next to read)
    ("reply_tail", "u64"),    #   and tail (next to fill), free-running
    ("pending_ip", "u64"),    # the packet waiting for ARP: its next hop (0: none)
    ("pending_len", "u64"),
    ("pending_since", "u64"),  #   since when (ARP_TIMEOUT_NS)
    ("arp_requests", "u64"),  # counters
    ("arp_replies", "u64"),
    ("arp_announces", "u64"),  # gratuitous ARPs sent
    ("arp_heard_announces", "u64"),  # gratuitous ARPs heard
    ("echo_requests", "u64"),  # echo requests sent
    ("echo_answered", "u64"),  # echo requests answered
    ("echo_replies", "u64"),  # echo replies of ours received
    ("replies_dropped", "u64"),  # ... with the queue full
    ("rx_dropped", "u64"),    # frames not for us or malformed
    ("tx_errors", "u64"),     # frames the device would not take
    ("arp_timeouts", "u64"),  # held packets dropped: their ARP reply came too late
])
ARP_OFF, ARP_SLOTS, ARP_ENTRY = 512, 16, struct.Struct("<I6sH")  # ip, mac, valid
assert INET.size <= ARP_OFF
REPLY_OFF, REPLY_SLOTS = 1024, 32
REPLY = struct.Struct("<IHBBII")  # saddr, seq, ttl, 0, rtt_us, bytes: what read gives
SENT_OFF, SENT_SLOTS = 1536, 64   # send time of each sequence number mod 64
PENDING_OFF = 2048                # the packet waiting for ARP (an IPv4 packet)
PENDING_MAX = 4096 - PENDING_OFF
ECHO_REQUEST = struct.Struct("<IH2x")  # what a write gives: daddr, seq
NETMASK = 0xFFFFFF00
DEFAULT_IP = "10.0.2.15"
DEFAULT_GATEWAY = "10.0.2.2"
PING_IDENT = 0x7076               # "pv"
NODE_NAME = "icmp"
NO_NODE = (1 << 64) - 1
ARP_TIMEOUT_NS = 1_000_000_000    # a packet waits this long for its ARP reply

Xmit = Callable[[NativeCpu, int, bytes], int]


def inet_key() -> None:
    """The stack's driver-data key (its INET page's VA)."""


export(inet_key)


def _inet(cpu: NativeCpu) -> Ref | None:
    addr = driver_data(cpu, inet_key)
    return INET.at(cpu, addr) if addr else None


def parse_ip_option(cmdline: str) -> tuple[int, int]:
    """Linux's ``ip=CLIENT:SERVER:GATEWAY:...``, only the client and gateway
    read: (ip, gateway), the defaults for what is missing or no address."""
    ip, gw = ip_aton(DEFAULT_IP), ip_aton(DEFAULT_GATEWAY)
    for word in cmdline.split():
        if word.startswith("ip="):
            fields = word[3:].split(":")
            for i, name in ((0, "ip"), (2, "gw")):
                if len(fields) > i and fields[i]:
                    try:
                        value = ip_aton(fields[i])
                    except ValueError:
                        continue
                    if name == "ip":
                        ip = value
                    else:
                        gw = value
    return ip, gw


def inet_init(cpu: NativeCpu, netdev: int, xmit: Xmit, mac: bytes, cmdline: str) -> int:
    """The device is up: the stack takes it (its first or only device).
    Returns our address."""
    inet = _inet(cpu)
    if inet is None:
        inet = INET.at(cpu, va(alloc_pages(cpu)))
        set_driver_data(cpu, inet_key, inet.va)
        inet.node = NO_NODE
        inet.ident = PING_IDENT
    inet.netdev, inet.xmit = netdev, symbol_number(xmit)
    inet.mac = int.from_bytes(mac, "big")
    inet.ip, inet.gateway = parse_ip_option(cmdline)
    _make_node(cpu, inet)
    return inet.ip


def _make_node(cpu: NativeCpu, inet: Ref) -> None:
    """The icmp node, if the kernel has a file layer to hold it."""
    node = device_create(cpu, NODE_NAME, icmp_fops, 0)
    if node >= 0:
        inet.node = node
    else:
        printk(cpu, f"inet: no icmp node ({node})")


def _mac(inet: Ref) -> bytes:
    return inet.mac.to_bytes(ETH_ALEN, "big")


def _send(cpu: NativeCpu, inet: Ref, frame: bytes) -> int:
    xmit: Xmit = symbol(inet.xmit)  # type: ignore[assignment]
    rc = xmit(cpu, inet.netdev, frame)
    if rc:
        inet.tx_errors = inet.tx_errors + 1
    return rc


# --- ARP ----------------------------------------------------------------------------------

def _arp_slot(cpu: NativeCpu, inet: Ref, i: int) -> tuple[int, bytes, int]:
    return ARP_ENTRY.unpack(cpu.read(inet.va + ARP_OFF + ARP_ENTRY.size * i, ARP_ENTRY.size))


def arp_lookup(cpu: NativeCpu, inet: Ref, ip: int) -> bytes | None:
    for i in range(ARP_SLOTS):
        addr, mac, valid = _arp_slot(cpu, inet, i)
        if valid and addr == ip:
            return mac
    return None


def arp_learn(cpu: NativeCpu, inet: Ref, ip: int, mac: bytes) -> None:
    """Enter or update ``ip``'s MAC: its own slot, else a free one, else
    the one its address hashes to (a cache of 16 entries)."""
    free = None
    for i in range(ARP_SLOTS):
        addr, _, valid = _arp_slot(cpu, inet, i)
        if valid and addr == ip:
            free = i
            break
        if not valid and free is None:
            free = i
    slot = ip % ARP_SLOTS if free is None else free
    cpu.write(inet.va + ARP_OFF + ARP_ENTRY.size * slot, ARP_ENTRY.pack(ip, mac, 1))


def arp_send(cpu: NativeCpu, inet: Ref, op: int, tha: bytes, tpa: int, dest: bytes) -> int:
    body = arp_packet(op, _mac(inet), inet.ip, tha, tpa)
    return _send(cpu, inet, eth_frame(dest, _mac(inet), ETH_P_ARP, body))


def arp_announce(cpu: NativeCpu) -> int:
    """A gratuitous ARP: our address and MAC to every host on the link
    (Linux's netdev_notify_peers -> arp_send(ARPOP_REQUEST, ip, ip)), so
    that peers and switches learn where we are again."""
    inet = _inet(cpu)
    if inet is None:
        return -ENODEV
    inet.arp_announces = inet.arp_announces + 1
    printk(cpu, f"inet: gratuitous ARP for {ip_ntoa(inet.ip)} is-at "
                f"{_mac(inet).hex(':')}")
    return arp_send(cpu, inet, ARPOP_REQUEST, b"\0" * ETH_ALEN, inet.ip, ETH_BROADCAST)


def _arp_rcv(cpu: NativeCpu, inet: Ref, body: bytes) -> None:
    if len(body) < ARP_PKT.size:
        inet.rx_dropped = inet.rx_dropped + 1
        return
    htype, ptype, hlen, plen, op, sha, spa, _, tpa = ARP_PKT.unpack_from(body)
    if htype != ARPHRD_ETHER or ptype != ETH_P_IP or hlen != ETH_ALEN or plen != 4:
        inet.rx_dropped = inet.rx_dropped + 1
        return
    sip, tip = int.from_bytes(spa, "big"), int.from_bytes(tpa, "big")
    if sip == tip:
        inet.arp_heard_announces = inet.arp_heard_announces + 1
        printk(cpu, f"inet: heard a gratuitous ARP: {ip_ntoa(sip)} is-at {sha.hex(':')}")
    if sip:
        arp_learn(cpu, inet, sip, sha)
    if op == ARPOP_REQUEST and tip == inet.ip and sip != tip:
        inet.arp_replies = inet.arp_replies + 1
        arp_send(cpu, inet, ARPOP_REPLY, sha, sip, sha)
    if inet.pending_ip and inet.pending_ip == sip:
        _send_pending(cpu, inet, sha)


def _send_pending(cpu: NativeCpu, inet: Ref, mac: bytes) -> None:
    """The packet held for this ARP reply, unless it waited past
    ARP_TIMEOUT_NS: then it is dropped, as Linux's neighbour code drops a
    queue whose resolution failed (neigh_invalidate)."""
    inet.pending_ip = 0
    if now(cpu) - inet.pending_since > ARP_TIMEOUT_NS:
        inet.arp_timeouts = inet.arp_timeouts + 1
        printk(cpu, "inet: a packet dropped: its ARP reply came too late")
        return
    packet = cpu.read(inet.va + PENDING_OFF, inet.pending_len)
    _send(cpu, inet, eth_frame(mac, _mac(inet), ETH_P_IP, packet))


# --- IPv4 ---------------------------------------------------------------------------------

def _next_hop(inet: Ref, daddr: int) -> int:
    return daddr if (daddr ^ inet.ip) & NETMASK == 0 else inet.gateway


def ip_send(cpu: NativeCpu, inet: Ref, daddr: int, protocol: int, payload: bytes) -> int:
    """An IPv4 packet to ``daddr``: sent if the next hop's MAC is known,
    else held while an ARP request asks for it (a held packet before it is
    replaced)."""
    inet.ip_id = inet.ip_id + 1
    packet = ip_packet(inet.ip, daddr, protocol, payload, inet.ip_id)
    hop = _next_hop(inet, daddr)
    mac = arp_lookup(cpu, inet, hop)
    if mac is not None:
        return _send(cpu, inet, eth_frame(mac, _mac(inet), ETH_P_IP, packet))
    if len(packet) > PENDING_MAX:
        return -ENOBUFS
    cpu.write(inet.va + PENDING_OFF, packet)
    inet.pending_ip, inet.pending_len, inet.pending_since = hop, len(packet), now(cpu)
    inet.arp_requests = inet.arp_requests + 1
    return arp_send(cpu, inet, ARPOP_REQUEST, b"\0" * ETH_ALEN, hop, ETH_BROADCAST)


def _ip_rcv(cpu: NativeCpu, inet: Ref, body: bytes) -> None:
    if len(body) < IP_HDR.size:
        inet.rx_dropped = inet.rx_dropped + 1
        return
    ver_ihl, _, tot_len, _, frag, ttl, proto, _, saddr, daddr = IP_HDR.unpack_from(body)
    ihl = (ver_ihl & 0xF) * 4
    if (ver_ihl >> 4 != 4 or ihl < IP_HDR.size or tot_len > len(body) or tot_len < ihl
            or inet_checksum(body[:ihl]) or frag & 0x3FFF
            or int.from_bytes(daddr, "big") != inet.ip or proto != IPPROTO_ICMP):
        inet.rx_dropped = inet.rx_dropped + 1
        return
    _icmp_rcv(cpu, inet, int.from_bytes(saddr, "big"), ttl, body[ihl:tot_len])


# --- ICMP ---------------------------------------------------------------------------------

def _icmp_rcv(cpu: NativeCpu, inet: Ref, saddr: int, ttl: int, icmp: bytes) -> None:
    if len(icmp) < ICMP_HDR.size or inet_checksum(icmp):
        inet.rx_dropped = inet.rx_dropped + 1
        return
    kind, _, _, ident, seq = ICMP_HDR.unpack_from(icmp)
    if kind == ICMP_ECHO:  # icmp_echo: the same data back
        inet.echo_answered = inet.echo_answered + 1
        ip_send(cpu, inet, saddr, IPPROTO_ICMP,
                icmp_echo(ICMP_ECHOREPLY, ident, seq, icmp[ICMP_HDR.size:]))
    elif kind == ICMP_ECHOREPLY and ident == inet.ident:
        _queue_reply(cpu, inet, saddr, seq, ttl, len(icmp))
    else:
        inet.rx_dropped = inet.rx_dropped + 1


def _queue_reply(cpu: NativeCpu, inet: Ref, saddr: int, seq: int, ttl: int, size: int) -> None:
    inet.echo_replies = inet.echo_replies + 1
    if inet.reply_tail - inet.reply_head >= REPLY_SLOTS:
        inet.replies_dropped = inet.replies_dropped + 1
        return
    sent = cpu.read_u64(inet.va + SENT_OFF + 8 * (seq % SENT_SLOTS))
    rtt_us = max(0, now(cpu) - sent) // 1000
    at = inet.va + REPLY_OFF + REPLY.size * (inet.reply_tail % REPLY_SLOTS)
    cpu.write(at, REPLY.pack(saddr, seq, ttl, 0, min(rtt_us, 0xFFFFFFFF), size))
    inet.reply_tail = inet.reply_tail + 1
    if inet.node != NO_NODE:
        wake_up_node(cpu, inet.node)


def icmp_send_echo(cpu: NativeCpu, daddr: int, seq: int) -> int:
    """An echo request of ping's size (56 bytes of data) to ``daddr``."""
    inet = _inet(cpu)
    if inet is None or not inet.netdev:
        return -ENODEV
    data = bytes(i & 0xFF for i in range(PING_DATA_LEN))
    cpu.write_u64(inet.va + SENT_OFF + 8 * (seq % SENT_SLOTS), now(cpu))
    inet.echo_requests = inet.echo_requests + 1
    return ip_send(cpu, inet, daddr, IPPROTO_ICMP, icmp_echo(ICMP_ECHO, inet.ident, seq, data))


def icmp_peek_reply(cpu: NativeCpu) -> bytes | None:
    """The next queued echo reply (REPLY's bytes), left queued, or None."""
    inet = _inet(cpu)
    if inet is None or inet.reply_head == inet.reply_tail:
        return None
    return cpu.read(inet.va + REPLY_OFF + REPLY.size * (inet.reply_head % REPLY_SLOTS),
                    REPLY.size)


def icmp_next_reply(cpu: NativeCpu) -> bytes | None:
    """The next queued echo reply (REPLY's bytes), taken off the queue, or None."""
    reply = icmp_peek_reply(cpu)
    if reply is not None:
        inet = _inet(cpu)
        inet.reply_head = inet.reply_head + 1  # type: ignore[union-attr]
    return reply


# --- frames from the device -------------------------------------------------------------

def netif_receive(cpu: NativeCpu, frame: bytes) -> None:
    """A frame the device received (Linux's netif_receive_skb): to ARP or
    IPv4, if it is for our MAC or broadcast."""
    inet = _inet(cpu)
    if inet is None:
        return
    if len(frame) < ETH_HDR.size:
        inet.rx_dropped = inet.rx_dropped + 1
        return
    dest, _, ethertype = ETH_HDR.unpack_from(frame)
    if dest not in (_mac(inet), ETH_BROADCAST):
        inet.rx_dropped = inet.rx_dropped + 1
        return
    body = frame[ETH_HDR.size:]
    if ethertype == ETH_P_ARP:
        _arp_rcv(cpu, inet, body)
    elif ethertype == ETH_P_IP:
        _ip_rcv(cpu, inet, body)
    else:
        inet.rx_dropped = inet.rx_dropped + 1


def inet_stats(cpu: NativeCpu) -> dict[str, int]:
    """The stack's counters (for tests and the curious)."""
    inet = _inet(cpu)
    if inet is None:
        return {}
    return {name: getattr(inet, name) for name in INET.fields}


# --- the icmp node (ping's socket) --------------------------------------------------------

def icmp_open(cpu: NativeCpu, file: Ref) -> int:
    return 0 if _inet(cpu) is not None else -ENODEV


def icmp_read(cpu: NativeCpu, file: Ref, ubuf: int, size: int) -> int | None:
    """The next echo reply (16 bytes), or 0 if none has come. It is taken
    off the queue only once copied: a bad buffer loses no reply."""
    if size < REPLY.size:
        return -EINVAL
    reply = icmp_peek_reply(cpu)
    if reply is None:
        return 0
    if not copy_to_user(cpu, ubuf, reply):
        return -EFAULT
    icmp_next_reply(cpu)
    return REPLY.size


def icmp_write(cpu: NativeCpu, file: Ref, ubuf: int, size: int) -> int | None:
    """{u32 daddr, u16 seq, 2 bytes 0}: an echo request sent."""
    if size != ECHO_REQUEST.size:
        return -EINVAL
    raw = copy_from_user(cpu, ubuf, size)
    if raw is None:
        return -EFAULT
    daddr, seq = ECHO_REQUEST.unpack(raw)
    rc = icmp_send_echo(cpu, daddr, seq)
    return rc if rc < 0 else size


icmp_fops = export(file_operations(icmp_open, icmp_read, icmp_write, no_llseek=True),
                   "guestos.inet.icmp_fops")
