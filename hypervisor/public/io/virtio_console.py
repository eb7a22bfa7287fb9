"""virtio-console (device id 3): its features, config space, queue layout and
control messages (the virtio 1.2 specification, section 5.3; Linux's
include/uapi/linux/virtio_console.h). All little-endian.

With MULTIPORT the queues are: port 0's receiveq 0 and transmitq 1, the
control receiveq 2 and transmitq 3, then port n's receiveq 2(n+1) and
transmitq 2(n+1)+1. Without it only port 0's two queues exist.

A control message is 8 bytes, ``{le32 id; le16 event; le16 value}``; a
RESIZE is followed by ``{le16 cols; le16 rows}`` and a PORT_NAME by the
name's UTF-8 bytes (the spec: no NUL).
"""

from __future__ import annotations

import struct

VIRTIO_ID_CONSOLE = 3

# features
VIRTIO_CONSOLE_F_SIZE = 0         # cols and rows are valid
VIRTIO_CONSOLE_F_MULTIPORT = 1    # max_nr_ports is valid, the control queues exist
VIRTIO_CONSOLE_F_EMERG_WRITE = 2  # emerg_wr is valid

# struct virtio_console_config (at VIRTIO_MMIO_CONFIG)
VIRTIO_CONSOLE_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
VIRTIO_CONSOLE_CFG_COLS = 0
VIRTIO_CONSOLE_CFG_ROWS = 2
VIRTIO_CONSOLE_CFG_MAX_NR_PORTS = 4
VIRTIO_CONSOLE_CFG_EMERG_WR = 8
VIRTIO_CONSOLE_CONFIG_SIZE = VIRTIO_CONSOLE_CONFIG.size  # 12

# struct virtio_console_control
VIRTIO_CONSOLE_CONTROL = struct.Struct("<IHH")  # id, event, value: 8 bytes
VIRTIO_CONSOLE_RESIZE = struct.Struct("<HH")    # cols, rows, after a RESIZE's header
VIRTIO_CONSOLE_BAD_ID = 0xFFFFFFFF  # the id of DEVICE_READY (Linux: unused)

# control events
VIRTIO_CONSOLE_DEVICE_READY = 0   # driver: value 1 ready, 0 failed
VIRTIO_CONSOLE_DEVICE_ADD = 1     # device: a port exists (Linux: PORT_ADD)
VIRTIO_CONSOLE_DEVICE_REMOVE = 2  # device: it is gone (Linux: PORT_REMOVE)
VIRTIO_CONSOLE_PORT_READY = 3     # driver: value 1 the port is set up, 0 failed
VIRTIO_CONSOLE_CONSOLE_PORT = 4   # device: the port is a console
VIRTIO_CONSOLE_RESIZE_EVENT = 5   # device: the console's size, cols and rows follow
VIRTIO_CONSOLE_PORT_OPEN = 6      # both: value 1 the sender's side is open, 0 closed
VIRTIO_CONSOLE_PORT_NAME = 7      # device: the port's name follows
VIRTIO_CONSOLE_EVENT_NAMES = ("DEVICE_READY", "DEVICE_ADD", "DEVICE_REMOVE", "PORT_READY",
                              "CONSOLE_PORT", "RESIZE", "PORT_OPEN", "PORT_NAME")

# the queues
VIRTIO_CONSOLE_PORT0_RXQ = 0
VIRTIO_CONSOLE_PORT0_TXQ = 1
VIRTIO_CONSOLE_CTRL_RXQ = 2       # device -> driver control messages
VIRTIO_CONSOLE_CTRL_TXQ = 3       # driver -> device


def port_rxq(port: int) -> int:
    """The receiveq (device -> driver data) of ``port`` under MULTIPORT."""
    return 0 if port == 0 else 2 * (port + 1)


def port_txq(port: int) -> int:
    """The transmitq (driver -> device data) of ``port`` under MULTIPORT."""
    return port_rxq(port) + 1


def nr_queues(max_nr_ports: int, multiport: bool = True) -> int:
    """How many queues a device of ``max_nr_ports`` has (Linux's init_vqs)."""
    return (max_nr_ports + 1) * 2 if multiport else 2


def queue_port(index: int) -> int | None:
    """The port whose data queue ``index`` is, or None for a control queue."""
    if index in (VIRTIO_CONSOLE_CTRL_RXQ, VIRTIO_CONSOLE_CTRL_TXQ):
        return None
    return 0 if index < 2 else index // 2 - 1
