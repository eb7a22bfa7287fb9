"""virtio-net: the device driven by a fake driver (frames, the stream
framing, bad buffers, drops, the announcement), and the guest's ping: to the
user network's gateway, between two guests joined by the socket backend in
one process, and across a checkpoint and a save restored in a fresh process
(at most one packet lost; the restored guest announces itself with a
gratuitous ARP the gateway hears, and acks VIRTIO_NET_S_ANNOUNCE); and two
guests on the socket backend, one saved half way through its ping and
restored in a fresh process that dials the other again."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from hypervisor import domctl
from hypervisor.devices.net import (
    USER_GATEWAY,
    USER_GATEWAY_MAC,
    Net,
    StreamBackend,
    UserBackend,
    restore_state,
    save_state,
)
from hypervisor.devices.net.persist import net_host
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
from hypervisor.public.io.virtio import VIRTIO_F_VERSION_1, VIRTIO_MMIO_CONFIG
from hypervisor.public.io.virtio_net import (
    VIRTIO_NET_CFG_STATUS,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
)
from hypervisor.toolstack.builder import build_domain
from hypervisor.toolstack.checkpoint import try_save
from hypervisor.toolstack.config import ConfigError, parse_config
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.session import Observer, run_domain
from tests.conftest import ROOT, booting, checkout_env
from tests.test_virtio_device import ALL_OK, NEEDS_RESET, Driver

RX, TX, CTRL = 0, 1, 2
GUEST_IP = ip_aton("10.0.2.15")
GUEST_MAC = bytes.fromhex("00163e000001")
FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
HDR = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
REPLY = re.compile(r"64 bytes from (\S+): icmp_seq=(\d+) time=\d+\.\d{3} ms")
SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received, (\d+)% packet loss")


def net_config(cmdline: str, vif: str, name: str = "n", seed: int = 1):
    return parse_config({"name": name, "memory": 16, "image": "firmware/guest.elf",
                         "seed": seed, "cmdline": cmdline, "vif": [vif]}, ROOT / "n.toml")


# --- the device, with a fake driver -------------------------------------------------------

@pytest.fixture
def drv(booted):
    hv, dom = booted(net_config("run=hello", "type=user"))
    d = Driver(hv, dom)
    d.negotiate(FEATURES)
    for q in (RX, TX, CTRL):
        d.setup_queue(q, 16)
    d.driver_ok()
    assert d.status == ALL_OK
    return d


def net(d: Driver) -> Net:
    return d.t.device


def post_rx(d: Driver, n: int = 1, size: int = 2048) -> list[int]:
    heads = [d.add(d.rings[RX], [(d.page(), size, True)]) for _ in range(n)]
    d.notify(RX)
    return heads


def send(d: Driver, frame: bytes, hdr: bytes = HDR, writable: bool = False) -> None:
    data = hdr + frame
    d.add(d.rings[TX], [(d.buffer(data), len(data), writable)])
    d.notify(TX)


def received(d: Driver) -> list[bytes]:
    """The frames in the used rx buffers, their headers checked."""
    _, elems = d.used(d.rings[RX])
    out = []
    for head, length in elems:
        addr = struct_desc_addr(d, head)
        data = d.mem.read(addr, length)
        assert VIRTIO_NET_HDR.unpack_from(data) == (0, 0, 0, 0, 0, 0, 1)
        out.append(bytes(data[VIRTIO_NET_HDR.size:]))
    return out


def struct_desc_addr(d: Driver, head: int) -> int:
    from hypervisor.public.io.virtio import VRING_DESC
    ring = d.rings[RX]
    return VRING_DESC.unpack(d.mem.read(ring.desc + VRING_DESC.size * head, VRING_DESC.size))[0]


def arp_request_for_gateway() -> bytes:
    return eth_frame(ETH_BROADCAST, GUEST_MAC, ETH_P_ARP,
                     arp_packet(ARPOP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), USER_GATEWAY))


def echo_to_gateway(seq: int) -> bytes:
    return eth_frame(USER_GATEWAY_MAC, GUEST_MAC, ETH_P_IP,
                     ip_packet(GUEST_IP, USER_GATEWAY, IPPROTO_ICMP,
                               icmp_echo(ICMP_ECHO, 7, seq, b"x" * 56)))


def test_config_space_has_the_mac_and_the_link_up(drv):
    mac = bytes(drv.read(VIRTIO_MMIO_CONFIG + i, 1) for i in range(6))
    assert mac == GUEST_MAC
    assert drv.read(VIRTIO_MMIO_CONFIG + VIRTIO_NET_CFG_STATUS, 2) == VIRTIO_NET_S_LINK_UP


def test_the_gateway_answers_arp_and_echo_into_the_buffers_posted(drv):
    post_rx(drv, 2)
    send(drv, arp_request_for_gateway())
    send(drv, echo_to_gateway(5))
    arp, echo = received(drv)
    dest, src, kind = ETH_HDR.unpack_from(arp)
    assert (dest, src, kind) == (GUEST_MAC, USER_GATEWAY_MAC, ETH_P_ARP)
    op, sha, spa = ARP_PKT.unpack_from(arp, ETH_HDR.size)[4:7]
    assert (op, sha, int.from_bytes(spa, "big")) == (ARPOP_REPLY, USER_GATEWAY_MAC, USER_GATEWAY)
    ip = echo[ETH_HDR.size:]
    assert inet_checksum(ip[:IP_HDR.size]) == 0 and IP_HDR.unpack_from(ip)[6] == IPPROTO_ICMP
    icmp = ip[IP_HDR.size:]
    assert inet_checksum(icmp) == 0
    assert ICMP_HDR.unpack_from(icmp)[0::3] == (ICMP_ECHOREPLY, 7) and icmp[8:] == b"x" * 56
    assert net(drv).metrics.nonzero() == {"tx_frames": 2, "tx_bytes": 42 + 98,
                                          "rx_frames": 2, "rx_bytes": 42 + 98}


def test_a_frame_with_no_buffer_posted_is_dropped_and_counted(drv):
    send(drv, echo_to_gateway(1))  # no rx buffer: the reply is dropped
    post_rx(drv)
    send(drv, echo_to_gateway(2))
    assert len(received(drv)) == 1
    m = net(drv).metrics
    assert (m.rx_dropped, m.rx_frames, m.tx_frames) == (1, 1, 2)


def test_bad_buffers_are_counted_and_returned_never_sent(drv):
    post_rx(drv, 1, size=20)  # too small for any frame: refused, not written
    post_rx(drv, 1, size=2048)
    send(drv, echo_to_gateway(1), writable=True)            # device-writable
    send(drv, b"\0" * 4)                                    # shorter than an Ethernet header
    send(drv, b"\0" * 1515)                                 # longer than a frame
    send(drv, echo_to_gateway(2), hdr=VIRTIO_NET_HDR.pack(1, 0, 0, 0, 0, 0, 0))  # CSUM asked
    send(drv, echo_to_gateway(3))
    m = net(drv).metrics
    assert (m.tx_malformed, m.tx_frames, m.rx_malformed, m.rx_frames) == (4, 1, 1, 1)
    assert drv.used(drv.rings[TX])[0] == 5  # every one returned
    assert not drv.status & NEEDS_RESET
    assert net(drv).backend.stats.echo_replies == 1


def test_the_gateway_drops_what_it_does_not_answer(drv):
    post_rx(drv)
    other = eth_frame(USER_GATEWAY_MAC, GUEST_MAC, ETH_P_IP,
                      ip_packet(GUEST_IP, ip_aton("8.8.8.8"), IPPROTO_ICMP,
                                icmp_echo(ICMP_ECHO, 7, 1, b"")))
    send(drv, other)
    send(drv, eth_frame(USER_GATEWAY_MAC, GUEST_MAC, 0x86DD, b"\0" * 40))  # IPv6
    assert net(drv).backend.stats.dropped == 2 and received(drv) == []


def test_a_restored_device_asks_for_an_announcement_and_the_ack_clears_it(drv):
    state = save_state(net(drv))
    assert state["announce"] is True
    dev = net(drv)
    again = restore_state({**state}, net_host(drv.hv, drv.dom))
    assert again.announce_pending and not dev.announce_pending
    again.close()
    dev.announce_pending = True  # as the restored one: the driver becomes ready
    drv.negotiate(FEATURES)
    for q in (RX, TX, CTRL):
        drv.setup_queue(q, 16)
    drv.driver_ok()
    status = drv.read(VIRTIO_MMIO_CONFIG + VIRTIO_NET_CFG_STATUS, 2)
    assert status == VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE
    assert drv.isr & 2  # a config change
    cmd = drv.buffer(VIRTIO_NET_CTRL_HDR.pack(VIRTIO_NET_CTRL_ANNOUNCE,
                                              VIRTIO_NET_CTRL_ANNOUNCE_ACK))
    ack = drv.page()
    drv.mem.write(ack, b"\xff")
    drv.add(drv.rings[CTRL], [(cmd, 2, False), (ack, 1, True)])
    drv.notify(CTRL)
    assert bytes(drv.mem.read(ack, 1)) == bytes([VIRTIO_NET_OK])
    assert drv.read(VIRTIO_MMIO_CONFIG + VIRTIO_NET_CFG_STATUS, 2) == VIRTIO_NET_S_LINK_UP
    bad = drv.buffer(VIRTIO_NET_CTRL_HDR.pack(9, 9))
    drv.add(drv.rings[CTRL], [(bad, 2, False), (ack, 1, True)])
    drv.add(drv.rings[CTRL], [(bad, 2, False)])  # no ack byte at all
    drv.notify(CTRL)
    m = dev.metrics
    assert (m.announces, m.announce_acks, m.ctrl_ok, m.ctrl_malformed) == (1, 1, 1, 2)
    assert not drv.status & NEEDS_RESET


def test_socket_backend_frames_with_qemus_stream_framing():
    a, b = socket.socketpair()
    backend = StreamBackend.from_socket(a)
    try:
        backend.send(b"frame-one")
        assert b.recv(100) == len(b"frame-one").to_bytes(4, "big") + b"frame-one"
        wire = b"".join(len(f).to_bytes(4, "big") + f for f in (b"x" * 60, b"y" * 1514))
        b.sendall(wire[:30])
        assert backend.poll() == []  # half a frame waits for the rest
        b.sendall(wire[30:])
        assert backend.poll() == [b"x" * 60, b"y" * 1514]
        b.sendall((100_000).to_bytes(4, "big"))  # not QEMU's framing: the peer is dropped
        assert backend.poll() == [] and not backend.connected() and backend.errors == 1
    finally:
        backend.close()
        b.close()


def test_user_backend_learns_a_gratuitous_arp():
    user = UserBackend()
    user.send(eth_frame(ETH_BROADCAST, GUEST_MAC, ETH_P_ARP,
                        arp_packet(ARPOP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GUEST_IP)))
    assert user.stats.announcements == 1 and user.poll() == []


@pytest.mark.parametrize("spec, why", [
    ("type=tap", "type must be user or socket"),
    ("type=socket", "needs one of listen"),
    ("type=socket, listen=nowhere", "neither HOST:PORT nor unix:PATH"),
    ("mac=00:16:3e:00:01", "not a MAC address"),
    ("mac=01:16:3e:00:00:01", "multicast"),
    ("type=user, listen=unix:/x", "for type=socket"),
    ("colour=blue", "is not one of"),
])
def test_bad_vif_specs_are_refused_with_their_reason(spec, why):
    with pytest.raises(ConfigError, match=why):
        net_config("", spec)


def test_a_vif_spec_in_xl_spelling():
    cfg = net_config("", "mac=00:16:3E:00:00:2a, type=socket, connect=127.0.0.1:5555")
    assert cfg.device_states() == [{"kind": "net", "bus": "virtio-mmio",
                                     "mac": "00:16:3e:00:00:2a", "announce": False,
                                     "backend": {"type": "socket",
                                                 "connect": "127.0.0.1:5555"}}]


# --- the guest's ping ----------------------------------------------------------------------

def replies(console: str) -> list[int]:
    return [int(m.group(2)) for m in REPLY.finditer(console)]


def summary(console: str) -> tuple[int, int, int]:
    m = SUMMARY.search(console)
    assert m, console[-2000:]
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_ping_to_the_gateway(booted):
    hv, dom = booted(net_config("run=ping:0:3:20", "type=user"))
    r = run_domain(hv, dom, None)
    out = r.console.decode()
    assert r.reason == "poweroff", out[-2000:]
    assert "PING 10.0.2.2 56(84) bytes of data." in out
    assert replies(out) == [1, 2, 3]
    assert summary(out) == (3, 3, 0)
    assert "--- 10.0.2.2 ping statistics ---" in out
    stats = dom.devices[0].device.backend.stats
    assert (stats.arp_replies, stats.echo_replies) == (1, 3)


def test_ping_with_no_network_device_says_so(booted):
    hv, dom = booted(parse_config({"name": "n", "memory": 16, "image": "firmware/guest.elf",
                                   "cmdline": "run=ping:0:1:10"}, ROOT / "n.toml"))
    r = run_domain(hv, dom, None)
    assert "ping: no icmp node" in r.console.decode()


def two_guests(hv, address: str, pings: int, interval_ms: int):
    a = build_domain(hv, net_config(f"ip=10.0.2.15 run=ping:0x0a000210:{pings}:{interval_ms}",
                                    f"mac=00:16:3e:00:00:0a, type=socket, listen={address}",
                                    name="a"))
    b = build_domain(hv, net_config(f"ip=10.0.2.16 run=ping:0x0a00020f:{pings}:{interval_ms}",
                                    f"mac=00:16:3e:00:00:0b, type=socket, connect={address}",
                                    name="b"))
    return a, b


def test_two_guests_ping_each_other_over_a_unix_socket(booted, tmp_path):
    hv = booted.bare(64, seed=1)
    a, b = two_guests(hv, f"unix:{tmp_path / 'seg.sock'}", 3, 20)
    hv.run()
    for dom, peer in ((a, "10.0.2.16"), (b, "10.0.2.15")):
        out = bytes(dom.console_out).decode()
        assert f"64 bytes from {peer}: icmp_seq=3" in out, out[-2000:]
        assert summary(out) == (3, 3, 0)


@pytest.mark.slow
def test_two_guests_ping_each_other_over_tcp_across_a_checkpoint_of_one(booted, tmp_path):
    hv = booted.bare(64, seed=2)
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a, b = two_guests(hv, f"127.0.0.1:{port}", 10, 50)
    outcome = {}

    def save(d) -> bool:
        outcome["o"] = try_save(hv, d, tmp_path / "a.img", checkpoint=True)
        return True

    # the run comes back every 100 us, so that the toolstack handles a's
    # suspend then, not after b has run on alone to its end
    r = run_domain(hv, a, None, requests=[parse_request("255ms checkpoint")], on_suspend=save,
                   checkpoint_dir=tmp_path, observer=Observer(100_000, lambda t: None))
    assert r.reason == "poweroff"
    hv.run()
    for dom in (a, b):
        out = bytes(dom.console_out).decode()
        sent, got, _ = summary(out)
        assert sent == 10 and got >= 9, "\n".join(bytes(d.console_out).decode() for d in (a, b))
    assert "virtio_net: frozen: device detached" in bytes(a.console_out).decode()


# --- across a checkpoint and a save ----------------------------------------------------------

RESTORE_SCRIPT = """
import sys
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import Observer, run_domain
hv, dom, _ = restore_image(sys.argv[1])
r = run_domain(hv, dom, None)
print(r.console.decode())
dev = dom.devices[0].device
print("GATEWAY", dev.backend.stats.announcements, dev.metrics.announce_acks)
print("END", r.reason)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """One guest pinging the gateway every 20 ms, checkpointed at 50 ms and
    saved at 110 ms (the run ends there); the image restored in a fresh process."""
    path = tmp_path_factory.mktemp("net") / "ping.img"
    out: dict = {}
    with booting() as boot:
        hv, dom = boot(net_config("run=ping:0:10:20", "type=user"))
        outcomes = []

        def save(d) -> bool:
            last = len(outcomes) == 1
            outcomes.append(try_save(hv, d, path if last else path.with_suffix(".ck"),
                                     checkpoint=not last))
            return not last

        r = run_domain(hv, dom, None, requests=[parse_request("50ms suspend"),
                                                 parse_request("110ms suspend")],
                       on_suspend=save)
        assert [o.ok for o in outcomes] == [True, True], [o.error for o in outcomes]
        out["before"] = r.console.decode()
        out["reason"] = r.reason
    p = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, str(path)], cwd=ROOT,
                       env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out["after"] = p.stdout
    return out


def test_ping_goes_on_across_a_checkpoint_and_a_save_restored_elsewhere(saved):
    before, after = saved["before"], saved["after"]
    assert saved["reason"] == "suspend"
    assert "END poweroff" in after, after[-3000:]
    assert "suspend hypercall returned 1" in before  # the checkpoint: the guest went on
    seqs = replies(before) + replies(after)
    sent, got, _ = summary(after)
    assert sent == 10 and got >= 9, after[-3000:]
    assert sorted(set(seqs)) == sorted(seqs) and len(seqs) == got  # none twice
    assert set(range(1, 11)) - set(seqs) <= {min(set(range(1, 11)) - set(seqs), default=0)}


def test_the_restored_guest_announces_itself(saved):
    after = saved["after"]
    assert "inet: gratuitous ARP for 10.0.2.15 is-at 00:16:3e:00:00:01" in after
    assert "virtio_net: announced (VIRTIO_NET_S_ANNOUNCE acked)" in after
    assert "GATEWAY 1 1" in after  # heard by the gateway, acked on the control queue
    assert "gratuitous ARP" not in saved["before"]  # a checkpoint's guest never left


def test_a_net_image_names_the_device_and_its_backend(saved):
    assert "virtio_net: restored" in saved["after"]


# --- two guests, one saved and restored in a fresh process ----------------------------------

RESTORE_FAST = """
import sys
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import run_domain
hv, dom, _ = restore_image(sys.argv[1], clock="fast")
r = run_domain(hv, dom, None)
print(r.console.decode())
print("ACKS", dom.devices[0].device.metrics.announce_acks)
print("END", r.reason)
"""
# the steps the test gives each phase before it fails (a step is 5 or 10 ms
# of the fast clock, that much host time: about two minutes in all)
MAX_STEPS = 12_000


def test_two_guests_ping_across_a_save_of_one_restored_in_a_fresh_process(booted, tmp_path):
    """B listens and runs on in this process; A dials it, pings it 10 times
    every 100 ms, is saved after the 5th reply and destroyed (its socket
    closes); A's image is restored in a child process that dials B again.
    Two processes share the segment, so the clock is the fast one (host
    time): the save comes at the 5th reply, not at a time."""
    seg, image = tmp_path / "seg.sock", tmp_path / "a.img"
    hv = booted.bare(64, seed=1, clock="fast")
    # B's one ping to A sleeps its minute out: B outlives A's run however slow the host
    b = build_domain(hv, net_config("ip=10.0.2.16 run=ping:0x0a00020f:1:60000",
                                    f"mac=00:16:3e:00:00:0b, type=socket, listen=unix:{seg}",
                                    name="b"))
    a = build_domain(hv, net_config("ip=10.0.2.15 run=ping:0x0a000210:10:100",
                                    f"mac=00:16:3e:00:00:0a, type=socket, connect=unix:{seg}",
                                    name="a"))
    for _ in range(MAX_STEPS):
        if b"icmp_seq=5 " in bytes(a.console_out):
            break
        domctl.run(hv, domctl.system_time(hv) + 5_000_000)
    assert b"icmp_seq=5 " in bytes(a.console_out), bytes(a.console_out).decode()[-2000:]
    outcome = {}

    def save(d) -> bool:
        outcome["o"] = try_save(hv, d, image)
        return False

    at_us = domctl.system_time(hv) // 1000 + 1000
    r = run_domain(hv, a, None, requests=[parse_request(f"{at_us}us suspend")], on_suspend=save)
    assert r.reason == "suspend" and outcome["o"].ok, outcome["o"].error
    before = bytes(a.console_out).decode()
    b_at_save = len(b.console_out)
    domctl.destroydomain(hv, a)  # its connection closes: B's listener takes the next
    child = subprocess.Popen([sys.executable, "-c", RESTORE_FAST, str(image)], cwd=ROOT,
                             env=checkout_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(MAX_STEPS):
            if child.poll() is not None:
                break
            domctl.run(hv, domctl.system_time(hv) + 10_000_000)  # B answers meanwhile
    finally:
        if child.poll() is None:
            child.kill()
        after, err = child.communicate()
    assert child.returncode == 0, err[-3000:]
    assert "END poweroff" in after, after[-3000:]
    b_out = bytes(b.console_out).decode()
    assert b.shutdown_reason is None, b_out[-2000:]  # B ran on all along
    seqs = replies(before) + replies(after)
    assert 5 in replies(before) and 10 not in replies(before)  # saved half way
    sent, got, _ = summary(after)
    assert sent == 10 and got >= 9, after[-3000:]
    assert len(set(seqs)) == len(seqs) == got  # none twice
    missing = set(range(1, 11)) - set(seqs)
    assert missing <= {min(missing, default=0)}
    # the restored A announced itself: B heard its gratuitous ARP, A acked ANNOUNCE
    assert "virtio_net: restored" in after and "ACKS 1" in after
    assert "virtio_net: announced (VIRTIO_NET_S_ANNOUNCE acked)" in after
    heard = "inet: heard a gratuitous ARP: 10.0.2.15 is-at 00:16:3e:00:00:0a"
    assert heard in b_out[b_at_save:] and heard not in b_out[:b_at_save], b_out[-2000:]
