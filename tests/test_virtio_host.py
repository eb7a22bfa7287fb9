"""The host side of the console, blk and net devices, as the review of them
asked it mended: whose a Unix socket's path is (one rule, devices/unixsock.py),
a console port that throttles for a slow client, buffers with no room, the
net backend that never blocks the loop, disks locked against a second
writer and given each explorer run as its own, the image check's limits,
the CLI closing its domain. Driven from the host side, with the fake
drivers of test_virtio_device.py and its neighbours: no guest runs."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from hypervisor.devices import unixsock
from hypervisor.devices.blk import Block, BlockError
from hypervisor.devices.console import BackendError as ConsoleBackendError
from hypervisor.devices.console import SocketBackend
from hypervisor.devices.kinds import BUS, check_entry
from hypervisor.devices.net import backend as net_backend
from hypervisor.devices.net.backend import OUT_MAX, BackendError, StreamBackend
from hypervisor.public.io.virtio_console import VIRTIO_CONSOLE_PORT_OPEN, port_rxq, port_txq
from hypervisor.public.io.virtio_net import (
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_HDR,
)
from hypervisor.toolstack import cli, explore
from hypervisor.toolstack.config import ConfigError, parse_config
from tests.test_blk_device import make_image
from tests.test_virtio_console_device import ECHO, con, connect, env  # noqa: F401 (fixture)
from tests.test_virtio_net import CTRL, drv, net  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent


# --- a Unix socket's path ------------------------------------------------------------

def test_a_net_listener_never_removes_a_file_nor_takes_a_live_socket(env, tmp_path):  # noqa: F811
    hv, dom, d, sock, _ = env
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(BackendError, match="no socket"):
        StreamBackend("listen", f"unix:{precious}")
    assert precious.read_text() == "keep me"
    # the console listens at sock: the net backend refuses it, and its probe
    # is no client of the console (no PORT_OPEN 1 then 0 to the guest)
    with pytest.raises(BackendError, match="in use"):
        StreamBackend("listen", f"unix:{sock}")
    with pytest.raises(ConsoleBackendError, match="in use"):
        SocketBackend(str(sock))
    con(dom).poll_ports()
    assert d.received() == [] and con(dom).metrics.connects == 0
    assert sock.exists()


def test_a_stale_socket_is_replaced_and_close_removes_only_its_own(tmp_path):
    path = tmp_path / "seg.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # nobody listens: as a process that is gone leaves it
    stale.close()
    first = StreamBackend("listen", f"unix:{path}")
    path.unlink()  # someone took the path since: the close leaves theirs
    other = SocketBackend(str(path))
    first.close()
    assert path.exists()
    other.close()
    assert not path.exists()


def test_a_probe_is_no_peer_of_a_net_listener(tmp_path):
    path = tmp_path / "seg.sock"
    listener = StreamBackend("listen", f"unix:{path}")
    with pytest.raises(unixsock.SocketPathError, match="in use"):
        unixsock.clear_stale(str(path))
    assert listener.poll() == [] and not listener.connected() and listener.errors == 0
    listener.close()


# --- the console --------------------------------------------------------------------

def _throttle(machine: tuple) -> tuple[object, socket.socket, bytes, int]:
    """A client that does not read, and more output than its socket takes."""
    hv, dom, d, sock, _ = machine
    c = connect(sock)
    c.setblocking(False)
    con(dom).poll_ports()
    d.received()
    backend = con(dom).ports[ECHO].backend
    backend.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = b"".join(bytes([65 + i]) * 4000 for i in range(12))
    for i in range(12):
        d.send(ECHO, sent[4000 * i:4000 * (i + 1)])
    idx = d.used(d.rings[port_txq(ECHO)])[0]
    assert idx < 12 and con(dom).metrics.tx_throttled == 1
    return d, c, sent, idx


def test_output_waits_for_a_slow_client_and_none_is_lost(env):  # noqa: F811
    hv, dom, _, _, _ = env
    d, c, sent, _ = _throttle(env)
    got = b""
    for _ in range(10_000):
        if len(got) == len(sent):
            break
        try:
            got += c.recv(65536)
        except BlockingIOError:
            con(dom).poll_ports()  # the poll sends the held rest, then the queue
    assert got == sent
    assert d.used(d.rings[port_txq(ECHO)])[0] == 12
    m = con(dom).metrics
    assert (m.tx_bytes, m.tx_dropped, m.tx_discarded) == (len(sent), 0, 0)
    c.close()


def test_a_client_gone_while_throttled_discards_the_rest(env):  # noqa: F811
    hv, dom, _, _, _ = env
    d, c, sent, idx = _throttle(env)
    c.close()
    con(dom).poll_ports()
    assert d.received() == [(ECHO, VIRTIO_CONSOLE_PORT_OPEN, 0, b"")]
    d.notify(port_txq(ECHO))  # the rest: discarded, the host side closed
    assert d.used(d.rings[port_txq(ECHO)])[0] == 12
    m = con(dom).metrics
    assert m.tx_bytes + m.tx_discarded == len(sent) and m.tx_dropped == 0


def test_an_input_buffer_with_no_room_is_used_empty_and_counted(env):  # noqa: F811
    hv, dom, d, sock, _ = env
    c = connect(sock)
    con(dom).poll_ports()
    d.control(ECHO, VIRTIO_CONSOLE_PORT_OPEN, 1)
    ring = d.rings[port_rxq(ECHO)]
    empty = d.add(ring, [(d.page(), 64, False)])  # device-readable: no byte for input
    head, addr = d.give(port_rxq(ECHO), 64)
    d.notify(port_rxq(ECHO))
    c.sendall(b"hi")
    con(dom).poll_ports()
    assert d.used(ring) == (2, [(empty, 0), (head, 2)])
    assert con(dom).metrics.malformed == 1
    c.close()


# --- net ------------------------------------------------------------------------------

def test_an_ack_of_no_bytes_is_not_written(drv):  # noqa: F811
    ack = drv.page()
    drv.mem.write(ack, b"\xaa")
    cmd = drv.buffer(VIRTIO_NET_CTRL_HDR.pack(VIRTIO_NET_CTRL_ANNOUNCE,
                                              VIRTIO_NET_CTRL_ANNOUNCE_ACK))
    head = drv.add(drv.rings[CTRL], [(cmd, 2, False), (ack, 0, True)])
    drv.notify(CTRL)
    assert drv.used(drv.rings[CTRL]) == (1, [(head, 0)])
    assert bytes(drv.mem.read(ack, 1)) == b"\xaa"
    assert net(drv).metrics.ctrl_malformed == 1 and net(drv).metrics.ctrl_ok == 0


def test_a_peer_that_does_not_read_never_blocks_the_sender():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the wire fills at once
    backend = StreamBackend.from_socket(a)
    frame = b"f" * 1500
    try:
        for _ in range(2 * OUT_MAX // len(frame)):
            backend.send(frame)  # a blocking send would wait for ever here
        assert backend.connected() and backend.errors == 0 and backend.dropped > 0
        queued = 2 * OUT_MAX // len(frame) - backend.dropped
        b.setblocking(False)
        got = bytearray()
        for _ in range(10_000):
            try:
                got += b.recv(1 << 16)
            except BlockingIOError:
                if len(got) == queued * (4 + len(frame)):
                    break
                backend.poll()  # the queue goes out as the peer reads
        assert got == (len(frame).to_bytes(4, "big") + frame) * queued
    finally:
        backend.close()
        b.close()


def test_host_errors_in_the_poll_are_counted(drv, tmp_path, monkeypatch):  # noqa: F811
    listener = StreamBackend("listen", f"unix:{tmp_path / 'l.sock'}")

    def refuse() -> None:
        raise OSError(errno.EMFILE, "Too many open files")
    real = listener.listener
    listener.listener = SimpleNamespace(accept=refuse, close=real.close)
    assert listener.poll() == [] and listener.errors == 1 and not listener.connected()
    listener.listener = real
    listener.close()

    class NoName(socket.socket):
        def connect_ex(self, addr):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(net_backend.socket, "socket", NoName)
    dialler = StreamBackend("connect", "nowhere.invalid:5")  # no exception: counted
    assert dialler.errors == 1 and not dialler.connected()
    assert dialler.poll() == [] and dialler.errors == 2
    monkeypatch.undo()

    dev = net(drv)

    def broken() -> list[bytes]:
        raise OSError(errno.EIO, "backend gone")
    monkeypatch.setattr(dev.backend, "poll", broken)
    dev._poll()  # the timer's work: never a host exception
    assert dev.metrics.backend_errors == 1


# --- the image check ------------------------------------------------------------------

@pytest.mark.parametrize("entry, why", [
    ({"bus": BUS, "kind": ["blk"]}, "does not know"),
    ({"bus": BUS, "kind": {"a": 1}}, "does not know"),
    ({"bus": BUS, "base": 0, "port": 1, "kind": "blk", "path": "/x", "read_only": False,
      "serial": "s" * 21, "capacity": 8, "queue_size": 256}, "at most 20"),
    ({"bus": BUS, "base": 0, "port": 1, "kind": "blk", "path": "/x", "read_only": False,
      "serial": "", "capacity": -2, "queue_size": 256}, "negative"),
    ({"bus": BUS, "base": 0, "port": 1, "kind": "net", "mac": "00:16:3e:00:00:01",
      "backend": {"type": "socket", "connect": "nowhere"}, "announce": True},
     "neither HOST:PORT"),
    ({"bus": BUS, "base": 0, "port": 1, "kind": "net", "mac": "00:16:3e:00:00:01",
      "backend": {"type": "socket", "listen": 5}, "announce": True}, "no address"),
], ids=["kind a list", "kind a dict", "serial", "capacity", "address", "address type"])
def test_the_image_check_refuses_what_a_restore_would(entry, why):
    assert why in check_entry(entry)


# --- disks ----------------------------------------------------------------------------

def test_a_writable_image_is_locked_against_a_second_user(tmp_path):
    image = make_image(tmp_path / "disk.img")
    readers = [Block(str(image), read_only=True), Block(str(image), read_only=True)]
    with pytest.raises(BlockError, match="write lock"):
        Block(str(image))
    for r in readers:
        r.close()
    writer = Block(str(image))
    with pytest.raises(BlockError, match="shared lock"):
        Block(str(image), read_only=True)
    writer.close()


def test_one_image_twice_in_a_configuration_is_refused(tmp_path):
    image = make_image(tmp_path / "disk.img")
    with pytest.raises(ConfigError, match="given twice"):
        parse_config({"name": "vd", "memory": 8, "image": "firmware/guest.elf",
                      "disk": [f"{image},raw,xvda,ro", f"{image},raw,xvdb,ro"]},
                     ROOT / "vd.toml")


def test_adding_a_disk_does_not_flush_every_disk(booted, tmp_path, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    image, other = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")
    cfg = parse_config({"name": "vd", "memory": 8, "image": "firmware/guest.elf",
                        "disk": [f"{image},raw,xvda,rw", f"{other},raw,xvdb,rw"]},
                       ROOT / "vd.toml")
    booted(cfg)
    assert synced == []


def test_host_paths_are_resolved_as_disks_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    cfg = parse_config({"name": "n", "memory": 8, "image": str(ROOT / "firmware/guest.elf"),
                        "channel": ["name=a, connection=socket, path=a.sock"],
                        "vif": ["type=socket, listen=unix:seg.sock"]},
                       Path("cfg/n.toml"))
    assert cfg.channels[0].path == str(tmp_path / "cfg" / "a.sock")
    assert cfg.vifs[0].listen == f"unix:{tmp_path / 'cfg' / 'seg.sock'}"


# --- the explorer's runs --------------------------------------------------------------

def test_each_explorer_run_writes_its_own_copy_of_a_disk(tmp_path, monkeypatch):
    image = make_image(tmp_path / "disk.img")
    ro = make_image(tmp_path / "ro.img")
    config = tmp_path / "d.toml"
    config.write_text(f'name = "d"\nmemory = 8\nimage = "{ROOT / "firmware/guest.elf"}"\n'
                      f'disk = ["{image},raw,xvda,rw", "{ro},raw,xvdb,ro"]\n')
    seen = []

    def boot(cfg, **_):
        disk, other = cfg.disks
        seen.append(disk.target)
        assert disk.target != image and disk.target.name == image.name  # its serial
        assert disk.target.read_bytes() == image.read_bytes() and other.target == ro
        raise RuntimeError("booted")
    monkeypatch.setattr(explore, "boot", boot)
    for seed in (1, 2):
        with pytest.raises(RuntimeError, match="booted"):
            explore.run_one(explore.Scenario(str(config)), seed)
    assert len(set(seen)) == 2 and not any(p.exists() for p in seen)  # removed after


@pytest.mark.parametrize("spec", ["channel", "vif"])
def test_explore_refuses_a_socket_the_runs_would_share(tmp_path, spec, capsys):
    config = tmp_path / "s.toml"
    line = ('channel = ["name=a, connection=socket, path=a.sock"]' if spec == "channel"
            else 'vif = ["type=socket, listen=unix:seg.sock"]')
    config.write_text(f'name = "s"\nmemory = 8\nimage = "{ROOT / "firmware/guest.elf"}"\n'
                      f'{line}\n')
    assert cli.main(["explore", str(config), "--seeds", "1-2"]) == 2
    err = capsys.readouterr().err
    assert "socket" in err and len(err.strip().splitlines()) == 1


# --- the CLI --------------------------------------------------------------------------

def test_run_and_restore_close_the_machine_whatever_the_outcome(tmp_path, monkeypatch):
    closed = []
    hv = SimpleNamespace(close=lambda: closed.append(1))

    def fail(*_a, **_k):
        raise RuntimeError("the run failed")
    monkeypatch.setattr(cli, "boot", lambda *a, **k: (hv, None))
    monkeypatch.setattr(cli, "_run_booted", fail)
    with pytest.raises(RuntimeError):
        cli.main(["run", str(ROOT / "examples" / "console.toml")])
    from hypervisor.toolstack import restore
    stats = SimpleNamespace(pages=0, tables=0, localise_s=0.0, pinned=0, total_s=0.0)
    monkeypatch.setattr(restore, "restore_image",
                        lambda *a, **k: (hv, SimpleNamespace(domid=1, name="x"), stats))
    monkeypatch.setattr(cli, "_run_or_save", fail)
    with pytest.raises(RuntimeError):
        cli.main(["restore", str(tmp_path / "img")])
    assert closed == [1, 1]


def test_the_gateway_remembers_at_most_learnt_max_senders():
    """A guest announcing ever new addresses: the table stays bounded, the
    rest counted; an address already known is still updated."""
    from hypervisor.public.io.inet import ARPOP_REQUEST, ETH_P_ARP, arp_packet, eth_frame
    user = net_backend.UserBackend()
    mac = bytes.fromhex("00163e000001")
    for n in range(net_backend.LEARNT_MAX + 40):
        ip = 0x0A000300 + n
        user.send(eth_frame(b"\xff" * 6, mac, ETH_P_ARP, arp_packet(ARPOP_REQUEST, mac, ip,
                                                                  bytes(6), ip)))
    assert len(user.stats.learnt) == net_backend.LEARNT_MAX
    assert user.stats.not_learnt == 40 and user.stats.announcements == net_backend.LEARNT_MAX + 40


def test_a_dial_without_a_descriptor_left_is_counted_not_raised(monkeypatch):
    b = StreamBackend("connect", "127.0.0.1:1")
    if b.sock is not None:  # the first dial, made at once
        b.sock.close()
        b.sock = None

    def no_fd(*a, **k):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(net_backend.socket, "socket", no_fd)
    before = b.errors
    b._dial()
    assert b.errors == before + 1 and b.sock is None
    b.close()
