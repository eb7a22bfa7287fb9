"""The balloon's queue notifications: inflate, deflate and statistics.

The transport calls ``handle_queue`` when the driver notifies a queue; the
requests are taken here, checked, acknowledged, and each page number handed
to the model (device.py) to act on. This class is mixed into Balloon, as
Firecracker's balloon/event_handler.rs is a second ``impl Balloon`` block:
one object, its notification handling in a file of its own. It uses the
model's ``host`` (flush_tlbs, timers), ``inflate_frame`` and ``deflate_frame``.

Every request is acknowledged with used length 0, acted on or not. A buffer
the device cannot take (device-writable, a length that is no whole number
of page numbers, a request larger than a driver ever sends) is counted as
malformed and acknowledged, never read.
"""

from __future__ import annotations

from hypervisor.devices.balloon.metrics import BalloonMetrics
from hypervisor.devices.virtio.mmio import VirtioMmio
from hypervisor.devices.virtio.queue import Chain, SplitQueue
from hypervisor.public.io.virtio import (
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_PFN,
    VIRTIO_BALLOON_S_NAMES,
    VIRTIO_BALLOON_STAT,
    VIRTIO_BALLOON_VQ_INFLATE,
    VIRTIO_BALLOON_VQ_STATS,
)

# the most a request may carry: an inflate or deflate request's page numbers
# (Linux sends at most VIRTIO_BALLOON_ARRAY_PFNS_MAX; Firecracker refuses a
# longer descriptor), a statistics buffer (ten-byte entries, a few dozen
# tags). Beyond them one notify could keep the host busy for minutes.
REQUEST_MAX_BYTES = VIRTIO_BALLOON_ARRAY_PFNS_MAX * VIRTIO_BALLOON_PFN.size
STATS_MAX_BYTES = 4096


def _readable_bytes(chain: Chain) -> int:
    return sum(b.length for b in chain.readable())


class BalloonEventHandler:
    """Queue notifications of the balloon (mixed into Balloon)."""

    transport: VirtioMmio
    metrics: BalloonMetrics
    stats: dict[str, int]
    stats_held: int | None      # head of the statistics buffer the device holds
    stats_updated_ns: int | None

    def handle_queue(self, q: SplitQueue) -> None:
        """The driver notified ``q``; a RingError goes up to the transport."""
        if q.index == VIRTIO_BALLOON_VQ_STATS:
            self.process_stats_queue(q)
        else:
            self.process_page_queue(q, inflate=q.index == VIRTIO_BALLOON_VQ_INFLATE)

    def process_page_queue(self, q: SplitQueue, inflate: bool) -> None:
        """Take every inflate (or deflate) request: le32 page numbers, which in
        this machine are machine frame numbers."""
        mem = self.transport.mem
        done = 0
        freed = False
        try:
            while (chain := q.pop(mem)) is not None:
                if _readable_bytes(chain) <= REQUEST_MAX_BYTES:
                    freed |= self._page_request(q, chain, inflate)
                else:
                    self.metrics.malformed += 1
                q.push(mem, chain.head, 0)
                done += 1
        finally:
            # no stale translation may reach a freed frame, also when a ring
            # error (the driver ballooned a ring page, say) cut the loop short
            if freed:
                self.host.flush_tlbs()
        if done:
            self.transport.used_notify(q)

    def _page_request(self, q: SplitQueue, chain: Chain, inflate: bool) -> bool:
        """One request's page numbers, acted on; whether a frame was freed."""
        freed = False
        for buf in chain.buffers:
            if buf.writable or buf.length % VIRTIO_BALLOON_PFN.size:
                self.metrics.malformed += 1
                continue
            data = self.transport.mem.read(buf.addr, buf.length, f"queue {q.index} buffer")
            for (mfn,) in VIRTIO_BALLOON_PFN.iter_unpack(data):
                if inflate:
                    freed |= self.inflate_frame(mfn)
                else:
                    self.deflate_frame(mfn)
        return freed

    def process_stats_queue(self, q: SplitQueue) -> None:
        """The driver made a statistics buffer available: the device reads it
        and holds it until the host's next poll gives it back. A second buffer
        while one is held is a driver error: the older one goes back."""
        mem = self.transport.mem
        while (chain := q.pop(mem)) is not None:
            if self.stats_held is not None:
                self.metrics.stats_errors += 1
                q.push(mem, self.stats_held, 0)
                self.transport.used_notify(q)
            self.stats_held = chain.head
            if _readable_bytes(chain) > STATS_MAX_BYTES:
                self.metrics.malformed += 1  # held, but not read: too big
                continue
            data = b"".join(mem.read(b.addr, b.length, "stats buffer")
                            for b in chain.readable())
            self._parse_stats(data)

    def _parse_stats(self, data: bytes) -> None:
        """Packed {le16 tag; le64 val} entries; unknown tags are ignored."""
        if len(data) % VIRTIO_BALLOON_STAT.size:
            self.metrics.malformed += 1
        whole = len(data) - len(data) % VIRTIO_BALLOON_STAT.size
        self.stats = {VIRTIO_BALLOON_S_NAMES[tag]: val
                      for tag, val in VIRTIO_BALLOON_STAT.iter_unpack(data[:whole])
                      if tag < len(VIRTIO_BALLOON_S_NAMES)}
        self.stats_updated_ns = self.host.timers.now()
