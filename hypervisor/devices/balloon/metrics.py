"""What the balloon counts: every counter declared once, with its meaning
(Firecracker's balloon/metrics.rs). A request the device does not act on is
acknowledged all the same and counted here, never trusted."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class BalloonMetrics:
    """The balloon's counters (slots: a misspelt counter is an error)."""

    freed: int = 0         # frames inflate gave back to the hypervisor
    deflated: int = 0      # frames a deflate request named that are the domain's
    refused: int = 0       # page numbers refused: not the domain's, or still in use
    dropped: int = 0       # inflated frames not acted on while inhibited (policy drop):
                           # left with the domain, without their pfn
    dropped_deflates: int = 0  # deflated frames not acted on while inhibited (policy drop)
    queued: int = 0        # page numbers queued while inhibited (policy reconcile)
    reconciled: int = 0    # queued inflates freed at the release
    kept: int = 0          # queued inflates not freed at the release: used again, taken
                           # back by a deflate, or (never after a post-copy) still absent
    malformed: int = 0     # buffers ignored: device-writable, odd length, or too big
    stats_errors: int = 0  # a second statistics buffer while one was held

    def nonzero(self) -> dict[str, int]:
        """The counters that moved, for the host's report."""
        return {name: value for name, value in asdict(self).items() if value}
