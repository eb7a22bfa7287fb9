"""The balloon's device model: its config space, the features it offers,
what it does with a frame that a request names, the host's controls, and
the statistics poll (Firecracker's balloon/device.rs).

* **inflate** frees a frame only if the domain owns it and nothing maps it
  or uses it as a pagetable (only its allocation reference is left: the
  driver unmaps first); anything else is refused and counted, never freed.
* **deflate**: a PV guest gets fresh frames for its pfns the Xen way, with
  XENMEM_populate_physmap (a zeroed frame each, within its reservation); the
  deflate request then names those frames before the driver uses them
  (MUST_TELL_HOST), and the device checks they are the domain's and counts
  them. The frame allocation stays in one place, the memory op.
* **inhibit** (QEMU's qemu_balloon_inhibit, taken by post-copy's
  destination until the last page has arrived) is counted; while it is held
  the host changes no target, and the guest's requests follow the domain's
  post-copy policy. ``drop`` (QEMU's): each request is acknowledged and not
  acted on; a dropped inflate's frame stays the domain's without the pfn the
  guest gave up. ``reconcile``: each request is queued, in order, and at the
  release applied against each frame's final state: the last request that
  named a frame wins; an inflate is applied (the frame freed) only if the
  frame is still the domain's, unused, without a pfn in the M2P and present;
  anything else is kept. No frame leaves the domain while the inhibit is
  held, so a post-copy receiver's table of frames stays true.
* **statistics**: the device holds the one buffer the driver made available
  and gives it back every ``stats_interval_ns`` of virtual time (the host's
  poll); the driver refills it and makes it available again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from hypervisor.devices.balloon.event_handler import BalloonEventHandler
from hypervisor.devices.balloon.metrics import BalloonMetrics
from hypervisor.devices.virtio.mmio import VirtioDevice
from hypervisor.devices.virtio.queue import RingError
from hypervisor.public.io.virtio import (
    VIRTIO_BALLOON_CFG_ACTUAL,
    VIRTIO_BALLOON_CONFIG_SIZE,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_VQ_STATS,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BALLOON,
)
from hypervisor.public.xen import INVALID_MFN

if TYPE_CHECKING:
    import numpy as np

    from hypervisor.mm.frames import FrameTable

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # a descriptor table fills one page
POSTCOPY_DROP = "drop"            # QEMU's: acknowledged, not acted on
POSTCOPY_RECONCILE = "reconcile"  # queued, applied at the release
POSTCOPY_POLICIES = (POSTCOPY_DROP, POSTCOPY_RECONCILE)


class BalloonError(Exception):
    """A host request the balloon cannot carry out; the message says why."""


class Timers(Protocol):
    """The host's timers in virtual time (the scheduler's)."""

    def now(self) -> int: ...

    def add_timer(self, deadline_ns: int, owner: Any, fn: Callable[[], None]) -> None: ...

    def cancel_timers(self, owner: Any) -> None: ...


@dataclass(frozen=True)
class BalloonHost:
    """What the balloon is given by whoever creates it: the device never
    reaches up to the hypervisor or the domain it serves."""

    domid: int
    frames: FrameTable                 # who owns a frame and what it is used as
    m2p: np.ndarray                    # a frame set aside loses its pfn here
    remove_page: Callable[[int], int]  # Xen's guest_remove_page for the domain: 0 or -errno
    flush_tlbs: Callable[[], None]     # the domain's TLBs, after frames were freed
    timers: Timers                     # the statistics poll
    is_running: Callable[[], bool]     # the poll stops with the domain
    is_absent: Callable[[int], bool] = lambda mfn: False  # its contents not here yet


@dataclass(frozen=True)
class QueuedRequest:
    """One page number of a request made while inhibited (policy reconcile)."""

    inflate: bool  # an inflate; else a deflate
    mfn: int
    pfn: int       # the frame's pfn in the M2P when the request came (INVALID_MFN: none)


class Balloon(BalloonEventHandler, VirtioDevice):
    """The virtio memory balloon, the host's side. Its queue notifications
    are handled in event_handler.py, its saved state in persist.py."""

    device_id = VIRTIO_ID_BALLOON
    name = "virtio-balloon"

    def __init__(self, host: BalloonHost, stats_interval_ns: int = 0,
                 deflate_on_oom: bool = False, postcopy: str = POSTCOPY_DROP) -> None:
        if postcopy not in POSTCOPY_POLICIES:
            raise BalloonError(f"post-copy policy {postcopy!r} unknown (one of "
                               f"{', '.join(POSTCOPY_POLICIES)})")
        self.host = host
        self.domid = host.domid
        self.stats_interval_ns = stats_interval_ns
        self.deflate_on_oom = deflate_on_oom  # offered only if asked, as QEMU's property
        self.num_pages = 0       # the host's target
        self.actual = 0          # what the driver last said it holds
        self.inhibits = 0
        self.postcopy = postcopy  # what a request does while inhibited
        self.queue: list[QueuedRequest] = []  # policy reconcile: requests while inhibited
        self.metrics = BalloonMetrics()
        self.metrics_at_inhibit = BalloonMetrics()  # the counters when the inhibit was taken
        self.stats: dict[str, int] = {}
        self.stats_updated_ns: int | None = None
        self.stats_held: int | None = None  # head of the held stats buffer

    # --- what the transport asks --------------------------------------------------

    def features(self) -> int:
        return (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST
                | 1 << VIRTIO_BALLOON_F_STATS_VQ
                | int(self.deflate_on_oom) << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)

    def queue_sizes(self) -> list[int]:
        return [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]  # inflate, deflate, stats

    def config_bytes(self) -> bytes:
        """num_pages and actual, le32 each, in 4 KiB pages."""
        return (self.num_pages.to_bytes(4, "little") + self.actual.to_bytes(4, "little"))

    def config_read(self, offset: int, size: int) -> int:
        if offset + size > VIRTIO_BALLOON_CONFIG_SIZE:
            self.transport.bad_access(f"balloon config read at {offset:#x}, beyond its 8 bytes")
            return 0
        return int.from_bytes(self.config_bytes()[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < VIRTIO_BALLOON_CFG_ACTUAL or offset + size > VIRTIO_BALLOON_CONFIG_SIZE:
            self.transport.bad_access(f"balloon config write at {offset:#x}: only actual "
                                      "is the driver's")
            return
        raw = bytearray(self.config_bytes())
        raw[offset:offset + size] = value.to_bytes(size, "little")
        self.actual = int.from_bytes(raw[VIRTIO_BALLOON_CFG_ACTUAL:], "little")

    def activate(self) -> None:
        self._arm_poll()

    def reset(self) -> None:
        """The target and actual survive a reset (QEMU and Firecracker keep
        num_pages; the re-probed driver balloons to it again); a held stats
        buffer is gone with the queue."""
        self.stats_held = None
        self.host.timers.cancel_timers(self)

    # --- what a request does to a frame ----------------------------------------------

    def _ours(self, mfn: int) -> bool:
        ft = self.host.frames
        return 0 < mfn < ft.nr_frames and ft.owner[mfn] == self.domid and not ft.xenheap[mfn]

    def _unused(self, mfn: int) -> str:
        """Why ``mfn`` may not leave the domain, or "" if it may."""
        ft = self.host.frames
        if not self._ours(mfn):
            return "not the domain's"
        if ft.ref_count[mfn] != 1 or ft.type_count[mfn] or ft.pinned[mfn] \
                or not ft.allocated[mfn]:
            return "still mapped or in use"
        return ""

    def inflate_frame(self, mfn: int) -> bool:
        """An inflate request names ``mfn``; whether it was freed."""
        why = self._unused(mfn)
        if why:
            self.metrics.refused += 1
            log.info("d%d balloon: inflate of mfn %#x refused: %s", self.domid, mfn, why)
            return False
        if self.inhibits:
            self._hold(mfn, inflate=True)
            return False
        self._free(mfn)
        return True

    def _free(self, mfn: int) -> None:
        rc = self.host.remove_page(mfn)
        if rc:
            raise AssertionError(f"balloon: mfn {mfn:#x} checked, yet remove_page says {rc}")
        self.metrics.freed += 1

    def deflate_frame(self, mfn: int) -> None:
        """A deflate request names ``mfn``, a frame populate_physmap gave the
        guest: it must be the domain's."""
        if not self._ours(mfn):
            self.metrics.refused += 1
            return
        if self.inhibits:
            self._hold(mfn, inflate=False)
            if self.postcopy == POSTCOPY_DROP:
                return
        self.metrics.deflated += 1

    def _hold(self, mfn: int, inflate: bool) -> None:
        """A checked request while inhibited, as the policy says: dropped
        (virtio_balloon_handle_output while virtio_balloon_inhibited()), or
        queued. A queued inflate's frame loses its pfn in the M2P, as
        guest_remove_page would take it: a pfn there at the release says the
        guest uses the frame again."""
        if self.postcopy == POSTCOPY_DROP:
            if inflate:
                self.metrics.dropped += 1
            else:
                self.metrics.dropped_deflates += 1
            return
        m2p = self.host.m2p
        self.queue.append(QueuedRequest(inflate, mfn, int(m2p[mfn])))
        self.metrics.queued += 1
        if inflate:
            m2p[mfn] = INVALID_MFN

    # --- the host's controls -------------------------------------------------------------

    def set_target(self, pages: int) -> None:
        """The balloon should hold ``pages`` pages (num_pages)."""
        if self.inhibits:
            raise BalloonError("ballooning is inhibited (post-copy is running: its pages are "
                               "still arriving, or a balloon-inhibit took it): the target is "
                               "unchanged; try again when the inhibit is lifted")
        if not 0 <= pages < 1 << 32:
            raise BalloonError(f"a balloon of {pages} pages is impossible")
        self.num_pages = pages
        self.transport.config_changed()

    def inhibit(self) -> None:
        if not self.inhibits:  # the counters as it found them: its release reports the rest
            self.metrics_at_inhibit = dataclasses.replace(self.metrics)
        self.inhibits += 1

    def uninhibit(self) -> int:
        """Drop one inhibit; when the last goes, apply what was queued.
        Returns how many frames that freed."""
        if self.inhibits == 0:
            raise BalloonError("the balloon is not inhibited")
        self.inhibits -= 1
        return 0 if self.inhibits else self.reconcile()

    def reconcile(self) -> int:
        """Apply the queue against each frame's final state: the last request
        naming a frame decides (inflate then deflate of one frame is nothing);
        an inflate frees the frame only if ``_kept`` finds no reason not to,
        so a frame is never freed twice, nor while the guest uses it, nor
        while absent. Returns how many frames were freed."""
        last: dict[int, QueuedRequest] = {}
        inflated: set[int] = set()
        for req in self.queue:
            last[req.mfn] = req
            if req.inflate:
                inflated.add(req.mfn)
        self.queue = []
        freed = 0
        for mfn, req in last.items():
            if mfn not in inflated:
                continue  # a fresh frame deflated: nothing to apply
            why = self._kept(mfn) if req.inflate else "taken back by a deflate"
            if why:
                self.metrics.kept += 1
                log.info("d%d balloon: queued inflate of mfn %#x (pfn %#x) not applied: %s",
                         self.domid, mfn, req.pfn, why)
                continue
            self._free(mfn)
            self.metrics.reconciled += 1
            freed += 1
        if freed:
            self.host.flush_tlbs()
        return freed

    def _kept(self, mfn: int) -> str:
        """Why a frame whose last request was an inflate stays, or "" to free it."""
        why = self._unused(mfn)
        if why:
            return why
        if self.host.m2p[mfn] != INVALID_MFN:
            return "its pfn is back in the M2P: the guest uses it again"
        if self.host.is_absent(mfn):
            return "still absent: its page has not arrived"
        return ""

    # --- the statistics poll -------------------------------------------------------------

    def _arm_poll(self) -> None:
        timers = self.host.timers
        timers.cancel_timers(self)
        if self.stats_interval_ns:
            timers.add_timer(timers.now() + self.stats_interval_ns, self, self._poll)

    def _poll(self) -> None:
        """The host asks for fresh statistics: give the held buffer back."""
        if not self._return_stats():
            return
        if self.host.is_running():
            self._arm_poll()

    def _return_stats(self) -> bool:
        """Give the held stats buffer back (used), if the queue is live;
        False if the ring broke doing it."""
        t = self.transport
        q = t.queues[VIRTIO_BALLOON_VQ_STATS]
        if self.stats_held is not None and t.live and q.ready:
            head, self.stats_held = self.stats_held, None
            try:
                q.push(t.mem, head, 0)
            except RingError as e:
                t.needs_reset(str(e))
                return False
            t.used_notify(q)
        return True

    def spontaneous(self) -> None:
        """The explorer's injector: a stats request out of turn."""
        self._return_stats()

    # --- for the toolstack --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What ``balloon-stats`` shows."""
        return {"num_pages": self.num_pages, "actual": self.actual, "inhibits": self.inhibits,
                "postcopy": self.postcopy, "queued": len(self.queue),
                "counters": self.metrics.nonzero(),
                "stats": dict(self.stats), "stats_updated_ns": self.stats_updated_ns}
