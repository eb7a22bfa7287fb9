"""The virtio memory balloon, the host's side (virtio 1.2 section 5.5; QEMU's
hw/virtio/virtio-balloon.c, Firecracker's devices/virtio/balloon).

Queues by offered position: inflate 0, deflate 1, stats 2. Features:
VERSION_1, MUST_TELL_HOST, STATS_VQ, and DEFLATE_ON_OOM if the domain's
configuration asks (QEMU's deflate-on-oom property, off by default). Config: num_pages (the
host's target balloon size) and actual (the driver's), le32, in 4 KiB pages.

* **inflate**: each entry is a bus frame number, here a machine frame. The
  frame is freed only if the domain owns it and nothing maps it or uses it
  as a pagetable (only its allocation reference is left: the driver unmaps
  first); anything else is refused and counted, never freed.
* **deflate**: a PV guest gets fresh frames for its pfns the Xen way, with
  XENMEM_populate_physmap (a zeroed frame each, within its reservation); the
  deflate request then names those frames before the driver uses them
  (MUST_TELL_HOST), and the device checks they are the domain's and counts
  them. The frame allocation stays in one place, the memory op.
* every request is acknowledged with used length 0.
* **stats**: the device holds the one buffer the driver made available and
  returns it every ``stats_interval`` of virtual time (the host's poll); the
  driver refills it and makes it available again. A second buffer while one
  is held is a driver error: the older one goes back, counted (as QEMU).
* **inhibit** (QEMU's qemu_balloon_inhibit, taken by migration while
  post-copy runs): counted; while it is held, inflate requests are
  acknowledged but no frame is freed: each is set aside (unmapped, without
  its pfn) and freed when the last inhibit goes, if it is still the domain's
  and still unmapped. So nothing is lost and nothing is freed twice. Host
  target changes are refused meanwhile.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from hypervisor.devices.virtio_mmio import VirtioDevice
from hypervisor.devices.virtqueue import RingError, SplitQueue
from hypervisor.mm.frames import INVALID_M2P
from hypervisor.public.io.virtio import (
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_CFG_ACTUAL,
    VIRTIO_BALLOON_CONFIG_SIZE,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_PFN,
    VIRTIO_BALLOON_S_NAMES,
    VIRTIO_BALLOON_STAT,
    VIRTIO_BALLOON_VQ_INFLATE,
    VIRTIO_BALLOON_VQ_STATS,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BALLOON,
)

if TYPE_CHECKING:
    from hypervisor.domain import Domain

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # a descriptor table fills one page
# the most a request may carry: an inflate or deflate request's page numbers
# (Linux sends at most VIRTIO_BALLOON_ARRAY_PFNS_MAX; Firecracker refuses a
# longer descriptor), a statistics buffer (ten-byte entries, a few dozen tags)
REQUEST_MAX_BYTES = VIRTIO_BALLOON_ARRAY_PFNS_MAX * VIRTIO_BALLOON_PFN.size
STATS_MAX_BYTES = 4096


class BalloonError(Exception):
    """A host request the balloon cannot carry out; the message says why."""


class Balloon(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    name = "virtio-balloon"

    def __init__(self, dom: Domain, stats_interval_ns: int = 0,
                 deflate_on_oom: bool = False) -> None:
        self.domain = dom
        self.hv = dom.hypervisor
        self.stats_interval_ns = stats_interval_ns
        self.deflate_on_oom = deflate_on_oom  # offered only if asked, as QEMU's property
        self.num_pages = 0       # the host's target
        self.actual = 0          # what the driver last said it holds
        self.inhibits = 0
        self.set_aside: list[int] = []  # frames inflated while inhibited
        self.counters: Counter[str] = Counter()
        self.stats: dict[str, int] = {}
        self.stats_updated_ns: int | None = None
        self.stats_held: int | None = None  # head of the held stats buffer

    # --- what the transport asks --------------------------------------------------

    def features(self) -> int:
        return (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST
                | 1 << VIRTIO_BALLOON_F_STATS_VQ
                | int(self.deflate_on_oom) << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)

    def queue_sizes(self) -> list[int]:
        return [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]

    def config_bytes(self) -> bytes:
        return (self.num_pages.to_bytes(4, "little") + self.actual.to_bytes(4, "little"))

    def config_read(self, offset: int, size: int) -> int:
        if offset + size > VIRTIO_BALLOON_CONFIG_SIZE:
            self.transport._bad(f"balloon config read at {offset:#x}, beyond its 8 bytes")
            return 0
        return int.from_bytes(self.config_bytes()[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < VIRTIO_BALLOON_CFG_ACTUAL or offset + size > VIRTIO_BALLOON_CONFIG_SIZE:
            self.transport._bad(f"balloon config write at {offset:#x}: only actual is the "
                                "driver's")
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
        self.hv.scheduler.cancel_timers(self)

    def handle_queue(self, q: SplitQueue) -> None:
        if q.index == VIRTIO_BALLOON_VQ_STATS:
            self._stats_buffer(q)
            return
        inflate = q.index == VIRTIO_BALLOON_VQ_INFLATE
        mem = self.transport.mem
        done = 0
        freed = False
        try:
            while (chain := q.pop(mem)) is not None:
                if sum(b.length for b in chain.readable()) > REQUEST_MAX_BYTES:
                    # more page numbers than a request carries: acknowledged, not
                    # acted on (else one notify could keep the host busy for minutes)
                    self.counters["malformed"] += 1
                    q.push(mem, chain.head, 0)
                    done += 1
                    continue
                for buf in chain.buffers:
                    if buf.writable or buf.length % 4:
                        self.counters["malformed"] += 1  # acknowledged, not acted on
                        continue
                    data = mem.read(buf.addr, buf.length, f"queue {q.index} buffer")
                    for i in range(0, buf.length, 4):
                        mfn = int.from_bytes(data[i:i + 4], "little")
                        if inflate:
                            freed |= self._inflate(mfn)
                        else:
                            self._deflate(mfn)
                q.push(mem, chain.head, 0)
                done += 1
        finally:
            # no stale translation may reach a freed frame, also when a ring
            # error (the driver ballooned a ring page, say) cut the loop short
            if freed:
                self.hv.flush_tlbs(self.domain)
        if done:
            self.transport.used_notify(q)

    # --- inflate and deflate -----------------------------------------------------------

    def _ours(self, mfn: int) -> bool:
        ft = self.hv.machine.frames
        return 0 < mfn < ft.nr_frames and ft.owner[mfn] == self.domain.domid \
            and not ft.xenheap[mfn]

    def _unused(self, mfn: int) -> str:
        """Why ``mfn`` may not leave the domain, or "" if it may."""
        ft = self.hv.machine.frames
        if not self._ours(mfn):
            return "not the domain's"
        if ft.ref_count[mfn] != 1 or ft.type_count[mfn] or ft.pinned[mfn] \
                or not ft.allocated[mfn]:
            return "still mapped or in use"
        return ""

    def _inflate(self, mfn: int) -> bool:
        why = self._unused(mfn)
        if why:
            self.counters["refused"] += 1
            log.info("d%d balloon: inflate of mfn %#x refused: %s", self.domain.domid, mfn, why)
            return False
        if self.inhibits:
            self.hv.machine.m2p[mfn] = INVALID_M2P  # the guest gave up its pfn
            self.set_aside.append(mfn)
            self.counters["inhibited"] += 1
            return False
        self._free(mfn)
        return True

    def _free(self, mfn: int) -> None:
        rc = self.hv.reservation.remove_page(self.domain, mfn)
        if rc:
            raise AssertionError(f"balloon: mfn {mfn:#x} checked, yet remove_page says {rc}")
        self.counters["freed"] += 1

    def _deflate(self, mfn: int) -> None:
        if not self._ours(mfn):
            self.counters["refused"] += 1
            return
        self.counters["deflated"] += 1

    # --- the host's controls -------------------------------------------------------------

    def set_target(self, pages: int) -> None:
        """The balloon should hold ``pages`` pages (num_pages)."""
        if self.inhibits:
            raise BalloonError("ballooning is inhibited (as post-copy migration inhibits it "
                               "while it runs): the target is unchanged; try again when the "
                               "inhibit is lifted")
        if not 0 <= pages < 1 << 32:
            raise BalloonError(f"a balloon of {pages} pages is impossible")
        self.num_pages = pages
        self.transport.config_changed()

    def inhibit(self) -> None:
        self.inhibits += 1

    def uninhibit(self) -> int:
        """Drop one inhibit; when the last goes, free what was set aside that
        is still unused. Returns how many frames that freed."""
        if self.inhibits == 0:
            raise BalloonError("the balloon is not inhibited")
        self.inhibits -= 1
        if self.inhibits:
            return 0
        freed = 0
        for mfn in self.set_aside:
            if self._unused(mfn) or self.hv.machine.m2p[mfn] != INVALID_M2P:
                self.counters["refused"] += 1  # the guest took it back meanwhile
                continue
            self._free(mfn)
            freed += 1
        self.set_aside.clear()
        if freed:
            self.hv.flush_tlbs(self.domain)
        return freed

    # --- statistics ---------------------------------------------------------------------

    def _stats_buffer(self, q: SplitQueue) -> None:
        mem = self.transport.mem
        while (chain := q.pop(mem)) is not None:
            if self.stats_held is not None:
                # more than one buffer outstanding: give the older back
                self.counters["stats_errors"] += 1
                q.push(mem, self.stats_held, 0)
                self.transport.used_notify(q)
            self.stats_held = chain.head
            if sum(b.length for b in chain.readable()) > STATS_MAX_BYTES:
                self.counters["malformed"] += 1  # held, but not read: too big
                continue
            data = b"".join(mem.read(b.addr, b.length, "stats buffer")
                            for b in chain.readable())
            if len(data) % VIRTIO_BALLOON_STAT.size:
                self.counters["malformed"] += 1
            stats = {}
            for off in range(0, len(data) - VIRTIO_BALLOON_STAT.size + 1,
                             VIRTIO_BALLOON_STAT.size):
                tag, val = VIRTIO_BALLOON_STAT.unpack_from(data, off)
                if tag < len(VIRTIO_BALLOON_S_NAMES):  # unknown tags are ignored
                    stats[VIRTIO_BALLOON_S_NAMES[tag]] = val
            self.stats = stats
            self.stats_updated_ns = self.hv.scheduler.now()

    def _arm_poll(self) -> None:
        sched = self.hv.scheduler
        sched.cancel_timers(self)
        if self.stats_interval_ns:
            sched.add_timer(sched.now() + self.stats_interval_ns, self, self._poll)

    def _poll(self) -> None:
        """The host asks for fresh statistics: give the held buffer back."""
        t = self.transport
        q = t.queues[VIRTIO_BALLOON_VQ_STATS]
        if self.stats_held is not None and t.live and q.ready:
            head, self.stats_held = self.stats_held, None
            try:
                q.push(t.mem, head, 0)
            except RingError as e:
                t.needs_reset(str(e))
                return
            t.used_notify(q)
        if self.domain.is_running:
            self._arm_poll()

    # --- for the toolstack --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"num_pages": self.num_pages, "actual": self.actual, "inhibits": self.inhibits,
                "set_aside": len(self.set_aside), "counters": dict(self.counters),
                "stats": dict(self.stats), "stats_updated_ns": self.stats_updated_ns}

    def state(self) -> dict[str, Any]:
        """What an image carries (the keep policy needs the target and actual)."""
        return {"kind": "balloon", "num_pages": self.num_pages, "actual": self.actual,
                "stats_interval_ns": self.stats_interval_ns,
                "deflate_on_oom": self.deflate_on_oom}
