"""What the console counts: every counter declared once, with its meaning
(Firecracker's metrics.rs shape). A control message or buffer the device
cannot take is acknowledged all the same and counted here, never trusted."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class ConsoleMetrics:
    """The console's counters (slots: a misspelt counter is an error)."""

    rx_bytes: int = 0          # host input given to the guest
    tx_bytes: int = 0          # guest output the host took
    tx_discarded: int = 0      # guest output with the host side closed, or for no port
    tx_dropped: int = 0        # guest output a file port could not write (an error)
    tx_throttled: int = 0      # times output waited for a client that did not read
    control_in: int = 0        # control messages from the driver acted on
    control_out: int = 0       # control messages sent to the driver
    control_dropped: int = 0   # ... not sent: the control receiveq had no buffer
    bad_control: int = 0       # control messages refused: short, unknown event or port
    malformed: int = 0         # buffers refused: the wrong direction, too big, or an
                               # input buffer with no writable byte
    guest_failures: int = 0    # DEVICE_READY 0 or PORT_READY 0: the driver gave up
    connects: int = 0          # host clients that opened a port
    disconnects: int = 0       # ... and closed it

    def nonzero(self) -> dict[str, int]:
        """The counters that moved, for the host's report."""
        return {name: value for name, value in asdict(self).items() if value}
