"""What the network device counts: every counter declared once, with its
meaning (Firecracker's net/metrics.rs). A buffer or frame the device does
not act on is counted here, never trusted, never a host error."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class NetMetrics:
    """The device's counters (slots: a misspelt counter is an error)."""

    tx_frames: int = 0         # frames the guest sent, handed to the backend
    tx_bytes: int = 0
    tx_malformed: int = 0      # tx buffers refused: device-writable, shorter than the
                               # header, longer than a frame, or a bad header
    rx_frames: int = 0         # frames written into a buffer the guest posted
    rx_bytes: int = 0
    rx_dropped: int = 0        # frames for the guest with no rx buffer posted (or the
                               # device not live)
    rx_malformed: int = 0      # rx buffers refused: device-readable or too small
    ctrl_ok: int = 0           # control commands done
    ctrl_malformed: int = 0    # control commands refused (VIRTIO_NET_ERR)
    announces: int = 0         # ANNOUNCE set after a restore
    announce_acks: int = 0     # VIRTIO_NET_CTRL_ANNOUNCE_ACK received
    link_changes: int = 0      # the link went up or down
    backend_errors: int = 0    # the host side failed (a socket error): frames lost
    tx_dropped: int = 0        # frames the backend dropped: the queue to its peer full

    def nonzero(self) -> dict[str, int]:
        """The counters that moved, for the host's report."""
        return {name: value for name, value in asdict(self).items() if value}
