"""The wire layouts the guest's network stack and the host's user-mode
gateway share: Ethernet II, ARP for IPv4 over Ethernet (RFC 826), IPv4
(RFC 791) and ICMP echo (RFC 792). Network byte order (big-endian).

Declared once here: the guest kernel (guestos/net/) builds and parses
frames with these, and so does the device's user backend.
"""

from __future__ import annotations

import struct

ETH_ALEN = 6
ETH_HDR = struct.Struct("!6s6sH")            # dest, source, ethertype: 14 bytes
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_BROADCAST = b"\xff" * ETH_ALEN

# ARP (struct arphdr + the IPv4-over-Ethernet body): 28 bytes
ARP_PKT = struct.Struct("!HHBBH6s4s6s4s")    # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2

# IPv4 header without options (struct iphdr): 20 bytes
IP_HDR = struct.Struct("!BBHHHBBH4s4s")      # ver_ihl, tos, tot_len, id, frag_off, ttl,
                                            # protocol, check, saddr, daddr
IP_VERSION_IHL = 0x45                        # version 4, 5 words of header
IPPROTO_ICMP = 1
IP_DEFAULT_TTL = 64

# ICMP echo (struct icmphdr with its echo union): 8 bytes, then the data
ICMP_HDR = struct.Struct("!BBHHH")           # type, code, checksum, id, sequence
ICMP_ECHOREPLY = 0
ICMP_ECHO = 8
PING_DATA_LEN = 56                           # ping's default: 64 bytes of ICMP


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): the ones' complement of the ones'
    complement sum of the 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_aton(text: str) -> int:
    """'10.0.2.15' as a host-order u32; ValueError if it is no dotted quad."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise ValueError(f"{text!r} is not an IPv4 address (a.b.c.d)")
    return int.from_bytes(bytes(int(p) for p in parts), "big")


def ip_ntoa(addr: int) -> str:
    return ".".join(str(b) for b in addr.to_bytes(4, "big"))


def mac_aton(text: str) -> bytes:
    """'00:16:3e:00:00:01' as 6 bytes; ValueError if it is not one."""
    parts = text.split(":")
    if len(parts) != ETH_ALEN or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (six hex pairs: 00:16:3e:xx:xx:xx)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address (six hex pairs)") from None


def mac_ntoa(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def eth_frame(dest: bytes, source: bytes, ethertype: int, payload: bytes) -> bytes:
    return ETH_HDR.pack(dest, source, ethertype) + payload


def arp_packet(op: int, sha: bytes, spa: int, tha: bytes, tpa: int) -> bytes:
    return ARP_PKT.pack(ARPHRD_ETHER, ETH_P_IP, ETH_ALEN, 4, op, sha, spa.to_bytes(4, "big"),
                        tha, tpa.to_bytes(4, "big"))


def ip_packet(saddr: int, daddr: int, protocol: int, payload: bytes, ident: int = 0,
              ttl: int = IP_DEFAULT_TTL) -> bytes:
    hdr = IP_HDR.pack(IP_VERSION_IHL, 0, IP_HDR.size + len(payload), ident & 0xFFFF, 0, ttl,
                      protocol, 0, saddr.to_bytes(4, "big"), daddr.to_bytes(4, "big"))
    check = inet_checksum(hdr)
    return hdr[:10] + check.to_bytes(2, "big") + hdr[12:] + payload


def icmp_echo(kind: int, ident: int, seq: int, data: bytes) -> bytes:
    body = ICMP_HDR.pack(kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + data
    check = inet_checksum(body)
    return body[:2] + check.to_bytes(2, "big") + body[4:]
