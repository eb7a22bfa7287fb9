"""The virtio balloon driver (Linux's drivers/virtio/virtio_balloon.c, for a
Xen PV guest).

Inflating gives pages to the host: take free pages, mark them PG_BALLOON (the
balloon's page list is that flag in mem_map, as Linux keeps it in struct
page), set their p2m entries invalid, unmap them from the kernel's linear
map, and send their frame numbers (machine frames: bus addresses here) on
the inflate queue; the device frees each frame nothing maps any more.
Deflating takes pages back the Xen way: XENMEM_populate_physmap gives each
pfn a fresh zeroed frame, the deflate queue tells the host which (before the
pages are used: MUST_TELL_HOST), then they are mapped and freed to the
allocator. Requests carry at most 256 page numbers; ``actual`` is written
after each.

The work (Linux's update_balloon_size_func on system_freezable_wq) runs when
a config change or the stats callback queues it, on the cpu of the device's
irq, and then from cpu0's timer tick, while freezable workers are not
frozen; it moves towards
num_pages a few batches at a time and stays queued until ``actual`` meets the
target; when the guest is short of memory it logs "Out of puff!" and tries
again 200 ms later. The device serves a request as soon as it is notified
(as the console and store backends do), so tell_host finds its buffer used
when the notify returns; a buffer not used means the device is broken.

PM: the driver's handlers are called by the virtio core (virtio.py), which
defers config changes from the freeze to the end of the restore and goes
through the handshake around the restore; the policy is chosen with
``virtio_balloon.policy=``:

* freeze: the worker is already frozen; with ``deflate`` the balloon is
  emptied first (Linux since 2012); then the device is reset
  (virtio_reset_device: the queues broken, the interrupt handlers flushed,
  status 0) and only then are the queues deleted.
* thaw (a checkpoint, or a failed suspend): the queues are made again; the
  balloon stays as it was (``deflate``: it refills to the target).
* restore (a new domain): ``discard`` (the 2012 commit): the host forgot the
  balloon, so the driver forgets its pages: each gets a fresh frame and goes
  back to the allocator and the RAM count, num_pages = 0, and the host's
  target makes the work inflate again. ``deflate``: the balloon is empty;
  refill. ``keep``: the balloon and the device's state came through the
  image; nothing to do. The option ``balloonbug=leak`` brings back what the
  first discard code did: the pages were only counted back, never freed,
  "a fancy way of leaking lots of memory" (the lab in docs/labs/balloon-s4.md).

``balloonbug=keepmap`` leaves the register page mapped inside xen_suspend,
so a pagetable names a frame that is not the domain's and the save refuses
the image (the lab in docs/labs/canonicalise.md).
"""

from __future__ import annotations

import struct

from guestos.cmdline import parse_word
from guestos.hypercall import with_args
from guestos.kdata import driver_data, kernel, read_start_info, set_driver_data
from guestos.layout import Layout, Ref
from guestos.mm import (
    PG_BALLOON,
    PTE_RW,
    alloc_pages,
    free_page,
    nr_free_pages,
    pfn_to_mfn,
    set_page_flags,
    va,
    zone,
)
from guestos.printk import printk
from guestos.symbols import export
from guestos.time import now
from guestos.workqueue import flush_work, queue_work, workqueue_frozen
from hypervisor.public.errno import EBUSY
from hypervisor.public.io.virtio import (
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_CFG_ACTUAL,
    VIRTIO_BALLOON_CFG_NUM_PAGES,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_S_AVAIL,
    VIRTIO_BALLOON_S_CACHES,
    VIRTIO_BALLOON_S_MAJFLT,
    VIRTIO_BALLOON_S_MEMFREE,
    VIRTIO_BALLOON_S_MEMTOT,
    VIRTIO_BALLOON_S_MINFLT,
    VIRTIO_BALLOON_S_SWAP_IN,
    VIRTIO_BALLOON_S_SWAP_OUT,
    VIRTIO_BALLOON_STAT,
    VIRTIO_BALLOON_VQ_DEFLATE,
    VIRTIO_BALLOON_VQ_INFLATE,
    VIRTIO_BALLOON_VQ_STATS,
    VIRTIO_ID_BALLOON,
)
from hypervisor.public.memory import XENMEM_populate_physmap, xen_memory_reservation
from hypervisor.public.native import NativeCpu
from hypervisor.public.xen import DOMID_SELF, INVALID_MFN, Hypercall

from . import virtio_mmio as vm
from . import virtio_ring
from .virtio import (
    PRIV_OFFSET,
    dev_at,
    has_feature,
    register_virtio_driver,
    virtio_device_ready,
    virtio_driver,
    virtio_reset_device,
    vq_at,
)

POLICIES = ("discard", "deflate", "keep")
POLICY_DISCARD, POLICY_DEFLATE, POLICY_KEEP = range(3)
KNOWN_FEATURES = (1 << VIRTIO_BALLOON_F_MUST_TELL_HOST | 1 << VIRTIO_BALLOON_F_STATS_VQ
                  | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
BATCHES_PER_RUN = 16       # requests of 256 pages the work sends per timer tick
OUT_OF_PUFF_NS = 200_000_000
RESERVE_PAGES = 256        # free pages the balloon leaves the kernel
STATS_TAGS = (VIRTIO_BALLOON_S_SWAP_IN, VIRTIO_BALLOON_S_SWAP_OUT, VIRTIO_BALLOON_S_MAJFLT,
              VIRTIO_BALLOON_S_MINFLT, VIRTIO_BALLOON_S_MEMFREE, VIRTIO_BALLOON_S_MEMTOT,
              VIRTIO_BALLOON_S_AVAIL, VIRTIO_BALLOON_S_CACHES)

VBALLOON = Layout("virtio_balloon", [
    ("num_pages", "u64"),     # pages in the balloon
    ("policy", "u64"),        # POLICY_*
    ("leak_bug", "u64"),      # option balloonbug=leak
    ("work_queued", "u64"),
    ("stats_pending", "u64"), # the host returned the stats buffer: refill it
    ("retry_at", "u64"),      # out of puff: the work waits until then
    ("pfns", "u64"),          # pfn of the page holding the request (le32 frames)
    ("stats", "u64"),         # pfn of the stats buffer
    ("fills", "u64"),
    ("leaks", "u64"),
    ("out_of_puff", "u64"),
    ("not_acked", "u64"),
    ("stats_requests", "u64"),
    ("discarded", "u64"),     # pages the last discard took back
    ("map_bug", "u64"),       # option balloonbug=keepmap
    ("stop_update", "u64"),   # the freeze stopped the balloon's users (Linux's stop_update)
])
assert VBALLOON.size <= 4096 - PRIV_OFFSET
EXTENTS_OFFSET = 1024         # in the request page: u64 pfns for populate_physmap


def _state(cpu: NativeCpu) -> int:
    """The balloon's virtio device (0: no balloon): the work has no device
    argument, and there is one balloon."""
    return driver_data(cpu, virtio_balloon_driver)


def _dev(cpu: NativeCpu) -> Ref:
    return dev_at(cpu, _state(cpu))


def _vb(cpu: NativeCpu) -> Ref:
    return VBALLOON.at(cpu, _dev(cpu).priv)


def _vq(cpu: NativeCpu, index: int) -> Ref:
    return vq_at(cpu, _dev(cpu), index)


def balloon_pages(cpu: NativeCpu) -> int:
    return _vb(cpu).num_pages if _state(cpu) else 0


# --- probe -------------------------------------------------------------------------------

def virtballoon_probe(cpu: NativeCpu, dev: Ref) -> int:
    """The core negotiated the features; make the state, the queues, say so."""
    if _state(cpu):
        printk(cpu, f"virtio-mmio at {dev.base:#x}: only one balloon is supported; ignored")
        return -EBUSY
    cmdline = read_start_info(cpu).cmd_line.split(b"\0")[0].decode(errors="replace")
    policy = parse_word(cmdline, "virtio_balloon.policy", "deflate")
    if policy not in POLICIES:
        printk(cpu, f"virtio_balloon: policy {policy!r} unknown (one of "
               f"{', '.join(POLICIES)}); using deflate")
        policy = "deflate"
    dev.priv = dev.va + PRIV_OFFSET
    set_driver_data(cpu, virtio_balloon_driver, dev.va)
    vb = _vb(cpu)
    vb.policy = POLICIES.index(policy)
    vb.leak_bug = 1 if "balloonbug=leak" in cmdline.split() else 0
    dev.keepmap_bug = 1 if "balloonbug=keepmap" in cmdline.split() else 0
    vb.pfns, vb.stats = alloc_pages(cpu), alloc_pages(cpu)
    init_vqs(cpu)
    virtio_device_ready(cpu, dev)
    printk(cpu, f"virtio_balloon: device at {dev.base:#x}, event channel {dev.port}, "
           f"features {dev.features:#x}, policy {policy}"
           + (" (option balloonbug=leak: the 2012 discard bug)" if vb.leak_bug else ""))
    if towards_target(cpu):
        queue_update(cpu)
    return 0


def init_vqs(cpu: NativeCpu) -> None:
    """The queues, numbered by offered position, and the first stats buffer
    made available and kicked, before DRIVER_OK, as Linux's init_vqs does
    (the device holds the kick until DRIVER_OK)."""
    dev = _dev(cpu)
    stats = has_feature(dev, VIRTIO_BALLOON_F_STATS_VQ)
    vm.find_vqs(cpu, dev, [None, None, stats_request] if stats else [None, None])
    if stats:
        _add_stats_buffer(cpu)


def _del_vqs(cpu: NativeCpu) -> None:
    vm.del_vqs(cpu, _dev(cpu))


# --- the target -----------------------------------------------------------------------------

def towards_target(cpu: NativeCpu) -> int:
    """Pages to add to the balloon (negative: to take out)."""
    target = vm.config_read(cpu, _dev(cpu), VIRTIO_BALLOON_CFG_NUM_PAGES)
    return target - _vb(cpu).num_pages


def update_balloon_size(cpu: NativeCpu) -> None:
    vm.config_write(cpu, _dev(cpu), VIRTIO_BALLOON_CFG_ACTUAL, _vb(cpu).num_pages)


def _queue_work(cpu: NativeCpu) -> None:
    """The work on system_freezable_wq, which the freezer stops before the
    freeze; under option virtio.nodetach on system_wq, which it does not."""
    queue_work(cpu, update_balloon_size_func, freezable=not _dev(cpu).nodetach)


def queue_update(cpu: NativeCpu) -> None:
    """Probe or restore found the balloon off its target: queue the work."""
    vb = _vb(cpu)
    vb.work_queued = 1
    vb.retry_at = 0  # a new target is worth trying at once, out of puff or not
    _queue_work(cpu)


def virtballoon_changed(cpu: NativeCpu, dev: Ref) -> None:
    """The config changed (the core holds changes back while frozen): queue
    the work, unless the freeze stopped it, and run it now if it may run."""
    if _vb(cpu).stop_update:
        return
    queue_update(cpu)
    flush_work(cpu, update_balloon_size_func, now(cpu))


def _accounts_ram(cpu: NativeCpu) -> bool:
    """Without DEFLATE_ON_OOM, ballooned pages leave the RAM count
    (adjust_managed_page_count)."""
    return not has_feature(_dev(cpu), VIRTIO_BALLOON_F_DEFLATE_ON_OOM)


def _adjust_ram(cpu: NativeCpu, delta: int) -> None:
    if _accounts_ram(cpu):
        z = zone(cpu)
        z.totalram_pages = z.totalram_pages + delta


# --- requests ------------------------------------------------------------------------------

def _put_frames(cpu: NativeCpu, mfns: list[int]) -> None:
    cpu.write(va(_vb(cpu).pfns), struct.pack(f"<{len(mfns)}I", *mfns))


def tell_host(cpu: NativeCpu, index: int, n: int) -> bool:
    """Send the request page's first n frame numbers on queue ``index`` and
    see it used."""
    dev, vq = _dev(cpu), _vq(cpu, index)
    head = virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, _vb(cpu).pfns), 4 * n,
                               writable=False)
    if head < 0:
        if not vq.present:  # deleted at the freeze: Linux would use a freed virtqueue
            printk(cpu, f"virtio_balloon: a request on queue {index}, which the freeze "
                   "deleted: not sent")
        return False
    vm.notify(cpu, dev, vq)
    while (got := virtio_ring.get_buf(cpu, vq)) is not None:
        if got[0] == head:
            return True
    vb = _vb(cpu)
    vb.not_acked = vb.not_acked + 1
    printk(cpu, f"virtio_balloon: the device did not use request {head} on queue {index}")
    return False


def fill_balloon(cpu: NativeCpu, num: int) -> int:
    """Give up to ``num`` (at most 256) pages to the host; returns how many."""
    vb = _vb(cpu)
    num = min(num, VIRTIO_BALLOON_ARRAY_PFNS_MAX, max(0, nr_free_pages(cpu) - RESERVE_PAGES))
    if num <= 0:
        vb.out_of_puff = vb.out_of_puff + 1
        vb.retry_at = now(cpu) + OUT_OF_PUFF_NS
        printk(cpu, f"virtio_balloon: Out of puff! Can't get pages ({nr_free_pages(cpu)} "
               f"free, {RESERVE_PAGES} kept); trying again in 200 ms")
        return 0
    k = kernel(cpu)
    pfns = [alloc_pages(cpu, zero=False) for _ in range(num)]
    mfns = [pfn_to_mfn(cpu, pfn) for pfn in pfns]
    for pfn in pfns:
        set_page_flags(cpu, pfn, set_=PG_BALLOON)
        cpu.write_u64(k.mfn_list + 8 * pfn, INVALID_MFN)
        cpu.hypercall(Hypercall.update_va_mapping, va(pfn), 0, 0)
    _put_frames(cpu, mfns)
    vb.num_pages = vb.num_pages + num
    _adjust_ram(cpu, -num)
    vb.fills = vb.fills + 1
    if not tell_host(cpu, VIRTIO_BALLOON_VQ_INFLATE, num):
        _give_back(cpu, pfns, mfns)  # the host took none of them: they are still ours
        return 0
    return num


def _give_back(cpu: NativeCpu, pfns: list[int], mfns: list[int]) -> None:
    """Pages out of the balloon onto frames we hold: map, unmark, free."""
    k, vb = kernel(cpu), _vb(cpu)
    for pfn, mfn in zip(pfns, mfns, strict=True):
        cpu.write_u64(k.mfn_list + 8 * pfn, mfn)
        cpu.hypercall(Hypercall.update_va_mapping, va(pfn), (mfn << 12) | PTE_RW, 0)
        set_page_flags(cpu, pfn, clear=PG_BALLOON)
        free_page(cpu, pfn)
    vb.num_pages = vb.num_pages - len(pfns)
    _adjust_ram(cpu, len(pfns))


def _ballooned(cpu: NativeCpu, num: int) -> list[int]:
    """The first ``num`` pfns of the balloon list (PG_BALLOON in mem_map)."""
    k = kernel(cpu)
    flags = cpu.read(zone(cpu).mem_map, k.nr_pages).translate(_BALLOON_BYTES)
    out: list[int] = []
    pos = flags.find(1)
    while pos >= 0 and len(out) < num:
        out.append(pos)
        pos = flags.find(1, pos + 1)
    return out


_BALLOON_BYTES = bytes(1 if b & PG_BALLOON else 0 for b in range(256))


def _populate(cpu: NativeCpu, pfns: list[int]) -> list[int]:
    """XENMEM_populate_physmap: a fresh zeroed frame for each pfn (as many as
    the reservation allows); returns their mfns, and sets the p2m."""
    k = kernel(cpu)
    ext = va(_vb(cpu).pfns) + EXTENTS_OFFSET
    cpu.write(ext, struct.pack(f"<{len(pfns)}Q", *pfns))
    res = xen_memory_reservation(extent_start=ext, nr_extents=len(pfns), extent_order=0,
                                 domid=DOMID_SELF)
    done = cpu.hypercall(Hypercall.memory_op, XENMEM_populate_physmap,
                         with_args(cpu, bytes(res)))
    done = max(0, done)
    mfns = list(struct.unpack(f"<{done}Q", cpu.read(ext, 8 * done))) if done else []
    for pfn, mfn in zip(pfns, mfns, strict=False):
        cpu.write_u64(k.mfn_list + 8 * pfn, mfn)
    return mfns


def leak_balloon(cpu: NativeCpu, num: int) -> int:
    """Take up to ``num`` (at most 256) pages back; returns how many."""
    vb = _vb(cpu)
    pfns = _ballooned(cpu, min(num, VIRTIO_BALLOON_ARRAY_PFNS_MAX, vb.num_pages))
    if not pfns:
        return 0
    mfns = _populate(cpu, pfns)
    if len(mfns) < len(pfns):
        printk(cpu, f"virtio_balloon: only {len(mfns)} of {len(pfns)} pages could be given "
               "frames again; trying again in 200 ms")
        vb.retry_at = now(cpu) + OUT_OF_PUFF_NS
        pfns = pfns[:len(mfns)]
        if not pfns:
            return 0
    _put_frames(cpu, mfns)
    # MUST_TELL_HOST: the host hears of the pages before they are used
    tell_host(cpu, VIRTIO_BALLOON_VQ_DEFLATE, len(mfns))
    _give_back(cpu, pfns, mfns)
    vb.leaks = vb.leaks + 1
    return len(pfns)


# --- the work --------------------------------------------------------------------------------

@export
def update_balloon_size_func(cpu: NativeCpu, t_now: int) -> None:
    """The work (on the freezable workqueue): queued again until the balloon
    meets its target and the stats are refilled."""
    if not _state(cpu):
        return
    vb = _vb(cpu)
    if vb.work_queued or vb.stats_pending:
        _queue_work(cpu)
    if vb.stop_update:  # the freeze stopped it: the queues are deleted
        return
    if vb.stats_pending:
        vb.stats_pending = 0
        stats_handle_request(cpu)
    if not vb.work_queued or t_now < vb.retry_at:
        return
    for _ in range(BATCHES_PER_RUN):
        diff = towards_target(cpu)
        if diff > 0:
            moved = fill_balloon(cpu, diff)
        elif diff < 0:
            moved = leak_balloon(cpu, -diff)
        else:
            break
        update_balloon_size(cpu)
        if not moved:
            break
    if towards_target(cpu) == 0:
        vb.work_queued = 0
        printk(cpu, f"virtio_balloon: balloon at its target: {vb.num_pages} pages "
               f"({zone(cpu).totalram_pages} pages of RAM, {nr_free_pages(cpu)} free)")


# --- statistics ------------------------------------------------------------------------------

def _add_stats_buffer(cpu: NativeCpu) -> None:
    free = nr_free_pages(cpu) * 4096
    values = {VIRTIO_BALLOON_S_MEMFREE: free, VIRTIO_BALLOON_S_AVAIL: free,
              VIRTIO_BALLOON_S_MEMTOT: zone(cpu).totalram_pages * 4096}
    data = b"".join(VIRTIO_BALLOON_STAT.pack(tag, values.get(tag, 0)) for tag in STATS_TAGS)
    vb = _vb(cpu)
    cpu.write(va(vb.stats), data)
    vq = _vq(cpu, VIRTIO_BALLOON_VQ_STATS)
    if virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, vb.stats), len(data),
                           writable=False) >= 0:
        vm.notify(cpu, _dev(cpu), vq)


def stats_handle_request(cpu: NativeCpu) -> None:
    """The host used the stats buffer: take it back, refill it, give it again."""
    vq = _vq(cpu, VIRTIO_BALLOON_VQ_STATS)
    if virtio_ring.get_buf(cpu, vq) is None:
        return
    vb = _vb(cpu)
    vb.stats_requests = vb.stats_requests + 1
    _add_stats_buffer(cpu)


# --- the stats queue's callback ----------------------------------------------------------

@export
def stats_request(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    """The host used the stats buffer: the work refills it (unless the
    freeze stopped the balloon's users)."""
    vb = _vb(cpu)
    if vb.stop_update:
        return
    vb.stats_pending = 1
    _queue_work(cpu)
    flush_work(cpu, update_balloon_size_func, now(cpu))


# --- PM ----------------------------------------------------------------------------------------

def virtballoon_detach(cpu: NativeCpu, dev: Ref) -> None:
    """Stop the balloon's users before the reset: its work (on the freezable
    workqueue, which the freezer has stopped) and its callbacks, which queue
    no more work (Linux's stop_update). Option virtio.nodetach skips this
    and queues the work where the freezer does not stop it: the work then
    runs while the queues are deleted (the ring says so with a FAILURE)."""
    if dev.nodetach:
        printk(cpu, "virtio_balloon: option virtio.nodetach: the freeze leaves the work "
               "running")
        return
    _vb(cpu).stop_update = 1
    if not workqueue_frozen(cpu):
        printk(cpu, "virtio_balloon: freeze with the worker still running")


def virtballoon_freeze(cpu: NativeCpu, dev: Ref) -> int:
    """The driver's freeze (the core has deferred config changes): first its
    users stopped (virtballoon_detach). Under ``deflate`` the balloon is
    emptied (Linux's remove_common); then the device is reset before its
    queues are deleted, so that neither side uses a queue while it goes."""
    vb = _vb(cpu)
    virtballoon_detach(cpu, dev)
    if vb.policy == POLICY_DEFLATE:
        while vb.num_pages:  # remove_common: leak everything, telling the host
            if not leak_balloon(cpu, vb.num_pages):
                printk(cpu, f"virtio_balloon: freeze: {vb.num_pages} pages could not be "
                       "taken back")
                break
        update_balloon_size(cpu)
    virtio_reset_device(cpu, dev)
    _del_vqs(cpu)
    printk(cpu, f"virtio_balloon: frozen: device reset, queues deleted, {vb.num_pages} "
           f"pages in the balloon (policy {POLICIES[vb.policy]})")
    return 0


def _restore_common(cpu: NativeCpu) -> int:
    """Linux's virtballoon_restore, once the core has reset the device and
    negotiated again: the queues, DRIVER_OK, the work if the balloon is off
    its target, and ``actual`` written."""
    init_vqs(cpu)
    _vb(cpu).stop_update = 0  # the queues are there again: the users may go on
    virtio_device_ready(cpu, _dev(cpu))
    if towards_target(cpu):
        queue_update(cpu)
    update_balloon_size(cpu)
    return 0


def virtballoon_thaw(cpu: NativeCpu, dev: Ref) -> int:
    """The same domain goes on (a checkpoint, or a suspend that failed): the
    device is set up again and the balloon stays as the freeze left it."""
    rc = _restore_common(cpu)
    if rc == 0:
        printk(cpu, f"virtio_balloon: thawed: {_vb(cpu).num_pages} pages in the balloon")
    return rc


def virtballoon_restore(cpu: NativeCpu, dev: Ref) -> int:
    """A new domain: the host kept the target, not the balloon's frames.
    ``discard`` forgets the balloon first (Linux e562966); then the device is
    set up again and the work moves towards the target."""
    vb = _vb(cpu)
    if vb.policy == POLICY_DISCARD and vb.num_pages:
        _discard(cpu)
    rc = _restore_common(cpu)
    if rc == 0:
        printk(cpu, f"virtio_balloon: restored: {vb.num_pages} pages in the balloon, "
               f"target {vb.num_pages + towards_target(cpu)}")
    return rc

def _discard(cpu: NativeCpu) -> None:
    """The host has forgotten the balloon: every page leaves it and goes back
    to the kernel, num_pages = 0. A ballooned pfn has no frame, so each page
    gets a fresh one (populate_physmap) before it is freed to the allocator."""
    vb = _vb(cpu)
    if vb.leak_bug:
        _discard_as_shipped(cpu)
        return
    n = vb.num_pages
    while vb.num_pages:
        pfns = _ballooned(cpu, min(vb.num_pages, VIRTIO_BALLOON_ARRAY_PFNS_MAX))
        mfns = _populate(cpu, pfns) if pfns else []
        if not mfns:
            printk(cpu, f"virtio_balloon: discard: no frames for {vb.num_pages} pages")
            break
        _give_back(cpu, pfns[:len(mfns)], mfns)
    vb.discarded = n - vb.num_pages
    printk(cpu, f"virtio_balloon: restore: discarded the balloon's {vb.discarded} pages "
           "(fresh frames, back to the allocator)")


def _discard_as_shipped(cpu: NativeCpu) -> None:
    """balloonbug=leak: the restore of Linux e562966, which only moved the
    counters. Each page leaves the balloon and joins the RAM count, but gets no
    frame and is never freed: "a fancy way of leaking lots of memory"."""
    vb = _vb(cpu)
    n = vb.num_pages
    for pfn in _ballooned(cpu, n):
        set_page_flags(cpu, pfn, clear=PG_BALLOON)
    vb.num_pages = 0
    _adjust_ram(cpu, n)
    vb.discarded = n
    printk(cpu, f"virtio_balloon: restore: discarded the balloon's {n} pages "
           "(counted back as RAM, never freed: LEAKED)")


virtio_balloon_driver = register_virtio_driver(export(virtio_driver(
    "virtio_balloon", VIRTIO_ID_BALLOON, KNOWN_FEATURES, probe=virtballoon_probe,
    freeze=virtballoon_freeze, restore=virtballoon_restore, thaw=virtballoon_thaw,
    config_changed=virtballoon_changed), "guestos.drivers.virtio_balloon.virtio_balloon_driver"))
