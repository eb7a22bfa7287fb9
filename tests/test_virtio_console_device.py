"""The virtio-console device, driven from the host side with the fake driver
of test_virtio_device.py: a built (not started) domain with two ports, a
Unix socket and a file. Covered: the control protocol as QEMU's
virtio-serial (DEVICE_READY -> DEVICE_ADD per port; PORT_READY -> PORT_NAME
and PORT_OPEN if a client is there), a client's connect and disconnect,
input only while the guest has the port open, output to the socket and the
file, and bad control messages and buffers counted, never a host error."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.devices.console import Console, ConsoleMetrics, check_ports, new_state
from hypervisor.devices.kinds import check_entry, save_entry
from hypervisor.public.io.virtio import VIRTIO_F_VERSION_1, VIRTIO_MMIO_CONFIG
from hypervisor.public.io.virtio_console import (
    VIRTIO_CONSOLE_CFG_MAX_NR_PORTS,
    VIRTIO_CONSOLE_CONTROL,
    VIRTIO_CONSOLE_CTRL_RXQ,
    VIRTIO_CONSOLE_CTRL_TXQ,
    VIRTIO_CONSOLE_DEVICE_ADD,
    VIRTIO_CONSOLE_DEVICE_READY,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_PORT_NAME,
    VIRTIO_CONSOLE_PORT_OPEN,
    VIRTIO_CONSOLE_PORT_READY,
    port_rxq,
    port_txq,
)
from hypervisor.toolstack.config import parse_config
from tests.test_virtio_device import ALL_OK, NEEDS_RESET, Driver

ROOT = Path(__file__).resolve().parent.parent
FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_CONSOLE_F_MULTIPORT
ECHO, LOG = 1, 2  # the ports' ids


class ConsoleDriver(Driver):
    """The fake driver, with the console's control queues."""

    def start_console(self) -> None:
        self.negotiate(FEATURES)
        for q in (VIRTIO_CONSOLE_CTRL_RXQ, VIRTIO_CONSOLE_CTRL_TXQ, port_rxq(ECHO),
                  port_txq(ECHO), port_rxq(LOG), port_txq(LOG)):
            self.setup_queue(q, 16)
        self.driver_ok()
        assert self.status == ALL_OK
        self.seen = 0  # control messages read so far
        for _ in range(8):
            self.give(VIRTIO_CONSOLE_CTRL_RXQ, 64)

    def give(self, index: int, size: int) -> tuple[int, int]:
        """A device-writable buffer of ``size`` bytes on queue ``index``: (head, addr)."""
        addr = self.page()
        return self.add(self.rings[index], [(addr, size, True)]), addr

    def control(self, pid: int, event: int, value: int, raw: bytes | None = None) -> None:
        data = VIRTIO_CONSOLE_CONTROL.pack(pid, event, value) if raw is None else raw
        self.add(self.rings[VIRTIO_CONSOLE_CTRL_TXQ], [(self.buffer(data), len(data), False)])
        self.notify(VIRTIO_CONSOLE_CTRL_TXQ)

    def received(self) -> list[tuple[int, int, int, bytes]]:
        """The control messages the device sent since the last call."""
        ring = self.rings[VIRTIO_CONSOLE_CTRL_RXQ]
        idx, elems = self.used(ring)
        out = []
        for head, length in elems[self.seen:idx]:
            addr = self.desc_addr(ring, head)
            data = self.mem.read(addr, length)
            pid, event, value = VIRTIO_CONSOLE_CONTROL.unpack_from(data)
            out.append((pid, event, value, bytes(data[8:])))
            self.give(VIRTIO_CONSOLE_CTRL_RXQ, 64)  # refill, as the driver does
        self.seen = idx
        return out

    def desc_addr(self, ring, head: int) -> int:
        from hypervisor.public.io.virtio import VRING_DESC
        raw = self.mem.read(ring.desc + VRING_DESC.size * head, VRING_DESC.size)
        return VRING_DESC.unpack(raw)[0]

    def send(self, pid: int, data: bytes) -> None:
        self.add(self.rings[port_txq(pid)], [(self.buffer(data), len(data), False)])
        self.notify(port_txq(pid))


@pytest.fixture
def env(booted, tmp_path):
    sock, log = tmp_path / "e.sock", tmp_path / "log.txt"
    cfg = parse_config({"name": "vc", "memory": 16, "image": "firmware/guest.elf",
                        "channel": [f"name=echo, connection=socket, path={sock}",
                                    f"name=log, connection=file, path={log}"]},
                       ROOT / "vc.toml")
    hv, dom = booted(cfg)
    d = ConsoleDriver(hv, dom)
    d.start_console()
    return hv, dom, d, sock, log


def con(dom) -> Console:
    return dom.devices[0].device


def connect(path: Path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(path))
    return c


def test_config_space_and_features(env):
    hv, dom, d, _, _ = env
    assert d.read(VIRTIO_MMIO_CONFIG + VIRTIO_CONSOLE_CFG_MAX_NR_PORTS) == 3
    assert con(dom).features() == FEATURES


def test_device_ready_adds_every_port_and_port_ready_names_it(env):
    hv, dom, d, sock, _ = env
    d.control(0xFFFFFFFF, VIRTIO_CONSOLE_DEVICE_READY, 1)
    assert d.received() == [(ECHO, VIRTIO_CONSOLE_DEVICE_ADD, 1, b""),
                            (LOG, VIRTIO_CONSOLE_DEVICE_ADD, 1, b"")]
    d.control(ECHO, VIRTIO_CONSOLE_PORT_READY, 1)
    assert d.received() == [(ECHO, VIRTIO_CONSOLE_PORT_NAME, 1, b"echo")]  # nobody there
    d.control(LOG, VIRTIO_CONSOLE_PORT_READY, 1)
    assert d.received() == [(LOG, VIRTIO_CONSOLE_PORT_NAME, 1, b"log"),
                            (LOG, VIRTIO_CONSOLE_PORT_OPEN, 1, b"")]  # a file is open
    # a client that is there when the driver asks: PORT_OPEN 1 in the answer
    c = connect(sock)
    d.control(ECHO, VIRTIO_CONSOLE_PORT_READY, 1)
    assert d.received() == [(ECHO, VIRTIO_CONSOLE_PORT_NAME, 1, b"echo"),
                            (ECHO, VIRTIO_CONSOLE_PORT_OPEN, 1, b"")]
    c.close()
    assert con(dom).metrics.control_in == 4


def test_connect_input_output_disconnect(env):
    hv, dom, d, sock, log = env
    c = connect(sock)
    con(dom).poll_ports()
    assert d.received() == [(ECHO, VIRTIO_CONSOLE_PORT_OPEN, 1, b"")]
    c.sendall(b"hello\n")
    head, addr = d.give(port_rxq(ECHO), 4096)
    d.notify(port_rxq(ECHO))
    con(dom).poll_ports()
    assert d.used(d.rings[port_rxq(ECHO)])[0] == 0, "input before the guest opened the port"
    d.control(ECHO, VIRTIO_CONSOLE_PORT_OPEN, 1)
    idx, elems = d.used(d.rings[port_rxq(ECHO)])
    assert idx == 1 and elems[0] == (head, 6)
    assert hv.machine.memory.read(addr, 6) == b"hello\n"
    d.send(ECHO, b"HELLO\n")
    assert c.recv(100) == b"HELLO\n"
    d.send(LOG, b"to the file\n")
    assert log.read_bytes() == b"to the file\n"
    c.close()
    con(dom).poll_ports()
    assert d.received() == [(ECHO, VIRTIO_CONSOLE_PORT_OPEN, 0, b"")]
    d.send(ECHO, b"nobody\n")  # the host side is closed: used, discarded
    m = con(dom).metrics
    assert (m.rx_bytes, m.tx_bytes, m.tx_discarded, m.connects, m.disconnects) == \
        (6, 6 + 12, 7, 1, 1)


def test_second_client_refused(env):
    hv, dom, d, sock, _ = env
    first, second = connect(sock), connect(sock)
    con(dom).poll_ports()
    assert second.recv(10) == b""  # closed by the device
    assert con(dom).ports[ECHO].backend.refused == 1
    first.close()


@pytest.mark.parametrize("raw, why", [
    (b"\x01\x00", "short"),
    (VIRTIO_CONSOLE_CONTROL.pack(ECHO, 99, 1), "unknown event"),
    (VIRTIO_CONSOLE_CONTROL.pack(7, VIRTIO_CONSOLE_PORT_READY, 1), "no such port"),
    (VIRTIO_CONSOLE_CONTROL.pack(ECHO, VIRTIO_CONSOLE_DEVICE_ADD, 1), "the device's event"),
], ids=["short", "unknown event", "no such port", "the device's event"])
def test_bad_control_messages_counted(env, raw, why):
    hv, dom, d, _, _ = env
    d.control(0, 0, 0, raw=raw)
    assert con(dom).metrics.bad_control == 1, why
    assert d.used(d.rings[VIRTIO_CONSOLE_CTRL_TXQ])[0] == 1  # used all the same
    assert d.status == ALL_OK and d.received() == []


def test_bad_buffers_counted(env):
    hv, dom, d, _, _ = env
    ring = d.rings[VIRTIO_CONSOLE_CTRL_TXQ]
    d.add(ring, [(d.page(), 8, True)])  # device-writable on a transmitq
    d.add(ring, [(d.page(), 4096, False)])  # bigger than any message
    d.notify(VIRTIO_CONSOLE_CTRL_TXQ)
    d.add(d.rings[port_txq(ECHO)], [(d.page(), 16, True)])
    d.notify(port_txq(ECHO))
    assert con(dom).metrics.malformed == 3
    assert d.status == ALL_OK


def test_guest_failures_and_a_ring_error(env):
    hv, dom, d, _, _ = env
    d.control(0xFFFFFFFF, VIRTIO_CONSOLE_DEVICE_READY, 0)
    d.control(ECHO, VIRTIO_CONSOLE_PORT_READY, 0)
    assert con(dom).metrics.guest_failures == 2
    ring = d.rings[port_txq(ECHO)]
    d.set_avail_idx(ring, 100)  # more than the queue holds
    d.notify(port_txq(ECHO))
    assert d.status & NEEDS_RESET


def test_reset_closes_the_guest_side_only(env):
    hv, dom, d, sock, _ = env
    c = connect(sock)
    d.control(ECHO, VIRTIO_CONSOLE_PORT_OPEN, 1)
    con(dom).poll_ports()
    d.write(0x70, 0)  # status 0
    port = con(dom).ports[ECHO]
    assert not port.guest_connected and port.backend.connected
    c.close()


def test_spontaneous_tells_each_ports_host_side_again(env):
    """The explorer's injector: a control message out of turn (PORT_OPEN
    with the host side as it is), none from a reset device."""
    hv, dom, d, sock, _ = env
    con(dom).spontaneous()
    assert d.received() == [(ECHO, VIRTIO_CONSOLE_PORT_OPEN, 0, b""),
                            (LOG, VIRTIO_CONSOLE_PORT_OPEN, 1, b"")]
    d.write(0x70, 0)
    con(dom).spontaneous()
    assert con(dom).metrics.control_dropped == 2


def test_state_saved_and_checked(env, tmp_path):
    hv, dom, d, sock, log = env
    d.write(0x70, 0)
    entry = save_entry(dom.devices[0])
    assert entry["kind"] == "console" and check_entry(entry) is None
    assert entry["ports"] == [{"name": "echo", "connection": "socket", "path": str(sock)},
                              {"name": "log", "connection": "file", "path": str(log)}]
    assert check_entry({**entry, "ports": [{"name": "x"}]}) is not None
    assert check_ports([{"name": "a", "connection": "pty", "path": "p"}]) is not None
    assert new_state([("a", "file", "p")])["ports"] == [
        {"name": "a", "connection": "file", "path": "p"}]


def test_socket_in_use_is_refused_and_stale_one_replaced(booted, tmp_path):
    from hypervisor.devices.console import BackendError, SocketBackend
    path = str(tmp_path / "s.sock")
    first = SocketBackend(path)
    with pytest.raises(BackendError, match="in use"):
        SocketBackend(path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.close()
    stale.bind(path)  # a socket file nobody listens on, as a dead process leaves
    stale.close()
    again = SocketBackend(path)
    again.close()
    assert not Path(path).exists()


def test_metrics_declared():
    assert ConsoleMetrics().nonzero() == {}


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.one_of(
    st.binary(max_size=40),
    st.builds(VIRTIO_CONSOLE_CONTROL.pack, st.integers(0, 5), st.integers(0, 9),
              st.integers(0, 2))), min_size=1, max_size=6))
def test_any_control_message_is_served_never_a_host_error(env, messages):
    """Whatever the driver sends on the control transmitq, each buffer is
    used, the device stays live, and what it refused is counted."""
    hv, dom, d, _, _ = env
    ring = d.rings[VIRTIO_CONSOLE_CTRL_TXQ]
    before = d.used(ring)[0]
    for raw in messages:
        if raw:
            d.control(0, 0, 0, raw=raw)
        d.received()  # the driver takes the answers and refills
    assert d.used(ring)[0] == (before + sum(1 for m in messages if m)) & 0xFFFF
    assert d.status == ALL_OK
    m = con(dom).metrics
    assert m.control_in + m.bad_control + m.malformed >= sum(1 for x in messages if x)
