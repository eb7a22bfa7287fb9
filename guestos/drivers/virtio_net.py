"""The virtio network driver (Linux's drivers/net/virtio_net.c, cut to one
queue pair, no offloads, no mergeable buffers).

* **receive**: ``RX_BUFS`` buffers of 2 KiB (half a page each: a PV guest's
  pages are not machine-contiguous, so a buffer never crosses one) are
  posted on the receive queue at probe and after a restore
  (try_fill_recv); ``rx_posted`` says which the device holds. The queue's
  callback (skb_recv_done, in the irq thread) only schedules the poll
  (napi_schedule); the poll (virtnet_poll, a work item on system_wq: NAPI's
  softirq, which the freezer does not stop) runs on that cpu after its
  next upcall's yield, takes each used buffer, hands the frame after its
  12-byte header to the stack (guestos/inet.py's netif_receive, which may
  transmit: an ARP reply, an echo reply), posts every buffer the device
  does not hold again and takes back the transmit slots the device used.
* **transmit** (start_xmit): the frame behind a zeroed header, copied into
  one of ``TX_SLOTS`` slots, one descriptor; the buffers the device used
  are taken back first (free_old_xmit_skbs). The transmit queue's callback
  (skb_xmit_done) schedules the poll too. Nothing is sent while the device
  is detached (netif_device_detach at the freeze): the frame is dropped and
  counted, as a stopped queue would refuse it.
* **config** (virtnet_config_changed_work): the MAC (VIRTIO_NET_F_MAC) at
  probe, the link status; VIRTIO_NET_S_ANNOUNCE makes the driver send a
  gratuitous ARP (netdev_notify_peers) and ack it on the control queue
  (virtnet_ack_link_announce: VIRTIO_NET_CTRL_ANNOUNCE_ACK).
* **PM** (virtnet_freeze / virtnet_restore): the freeze detaches the device
  (no transmit may start: netif_device_detach) and disables the poll
  (virtnet_napi_disable: a poll scheduled is run to its end first, as
  napi_disable waits for it, and none is scheduled after), resets it with
  virtio_reset_device (the handlers flushed), then deletes its queues
  (the buffers the device held are its no more: free_unused_bufs). The
  restore makes them again, posts the receive buffers, sets DRIVER_OK,
  enables the poll and attaches the device again; the device's
  announcement follows as a config change, which the core delivers once
  the restore is done. The option ``virtio.nodetach=1`` skips the detach
  and the disable: a poll scheduled before the freeze then runs after it,
  on the cpu that took the interrupt, and refills the deleted receive
  queue (or transmits an answer on the deleted transmit queue); the ring
  prints its FAILURE line.

The driver's state is a VNET struct in the device page's private half, its
buffers in pages it allocates at probe and keeps.
"""

from __future__ import annotations

from guestos.inet import arp_announce, inet_init, netif_receive
from guestos.kdata import driver_data, read_start_info, set_driver_data
from guestos.layout import Layout, Ref
from guestos.mm import alloc_pages, va
from guestos.printk import printk
from guestos.smp import xen_send_IPI_one
from guestos.symbols import export
from guestos.workqueue import queue_work
from hypervisor.public.errno import EBUSY, EINVAL, ENOBUFS, ENODEV
from hypervisor.public.io.virtio_net import (
    VIRTIO_ID_NET,
    VIRTIO_NET_CFG_MAC,
    VIRTIO_NET_CFG_STATUS,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_ETH_ALEN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR,
    VIRTIO_NET_MAX_FRAME,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
    VIRTIO_NET_VQ_CTRL,
    VIRTIO_NET_VQ_RX,
    VIRTIO_NET_VQ_TX,
)
from hypervisor.public.native import NativeCpu

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

KNOWN_FEATURES = (1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_CTRL_VQ
                  | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
BUF_SIZE = 2048            # a receive buffer or transmit slot: header + a whole frame
RX_BUFS = 16               # receive buffers posted (8 pages)
TX_SLOTS = 16              # transmit slots (8 pages)
PAGES = RX_BUFS * BUF_SIZE // 4096

VNET = Layout("virtio_net", [
    ("detached", "u64"),      # netif_device_detach: no transmit may start
    ("link_up", "u64"),
    ("announce_acks", "u64"),  # announcements made and acked
    ("rx_frames", "u64"),
    ("tx_frames", "u64"),
    ("tx_dropped", "u64"),    # refused while detached, or with no free slot
    ("rx_errors", "u64"),     # used buffers shorter than the header
    ("tx_busy", "u64"),       # bitmask of transmit slots in flight
    ("ctrl", "u64"),          # pfn of the control command page
    ("mac", "u64"),           # the device's MAC, big-endian
    ("napi", "u64"),          # NAPI_*: the poll's state
    ("rx_posted", "u64"),     # bitmask of the receive buffers the device holds
    ("polls", "u64"),         # polls run
    ("polls_flushed", "u64"),  # polls the freeze's napi_disable ran to their end
])
NAPI_IDLE, NAPI_SCHED, NAPI_DISABLED = range(3)  # napi_struct's SCHED and DISABLE bits
RX_PFNS_OFF = 256         # in the private half: u64 pfns of the receive pages
TX_PFNS_OFF = 384         # ... of the transmit pages
RX_TOKEN_OFF = 512        # u8 per descriptor: the receive buffer it holds
TX_TOKEN_OFF = 768        # u8 per descriptor: the transmit slot it holds
assert PAGES * 8 <= TX_PFNS_OFF - RX_PFNS_OFF


def _state(cpu: NativeCpu) -> int:
    return driver_data(cpu, virtio_net_driver)


def _dev(cpu: NativeCpu, dev_va: int | None = None) -> Ref:
    return dev_at(cpu, _state(cpu) if dev_va is None else dev_va)


def _vn(cpu: NativeCpu, dev: Ref) -> Ref:
    return VNET.at(cpu, dev.priv)


def _buf(cpu: NativeCpu, dev: Ref, table: int, i: int) -> tuple[int, int]:
    """Buffer ``i`` of a table: (pfn, offset in the page)."""
    pfn = cpu.read_u64(dev.priv + table + 8 * (i // 2))
    return pfn, (i % 2) * BUF_SIZE


# --- probe -------------------------------------------------------------------------------

def virtnet_probe(cpu: NativeCpu, dev: Ref) -> int:
    if _state(cpu):
        printk(cpu, f"virtio-mmio at {dev.base:#x}: only one network device is supported; "
                    "ignored")
        return -EBUSY
    dev.priv = dev.va + PRIV_OFFSET
    set_driver_data(cpu, virtio_net_driver, dev.va)
    vn = _vn(cpu, dev)
    for table in (RX_PFNS_OFF, TX_PFNS_OFF):
        for i in range(PAGES):
            cpu.write_u64(dev.priv + table + 8 * i, alloc_pages(cpu))
    vn.ctrl = alloc_pages(cpu)
    mac = bytes(vm.config_read(cpu, dev, VIRTIO_NET_CFG_MAC + i, 1)
                for i in range(VIRTIO_NET_ETH_ALEN)) if has_feature(dev, VIRTIO_NET_F_MAC) \
        else bytes.fromhex("00163e000001")
    vn.mac = int.from_bytes(mac, "big")
    init_vqs(cpu, dev)
    virtio_device_ready(cpu, dev)
    cmdline = read_start_info(cpu).cmd_line.split(b"\0")[0].decode(errors="replace")
    ip = inet_init(cpu, dev.va, virtnet_start_xmit, mac, cmdline)
    vn.link_up = 1 if _status(cpu, dev) & VIRTIO_NET_S_LINK_UP else 0
    printk(cpu, f"virtio_net: device at {dev.base:#x}, event channel {dev.port}, MAC "
                f"{mac.hex(':')}, address {'.'.join(str(b) for b in ip.to_bytes(4, 'big'))}, "
                f"link {'up' if vn.link_up else 'down'}")
    return 0


def init_vqs(cpu: NativeCpu, dev: Ref) -> None:
    """The queues (receive, transmit, control with CTRL_VQ) and every
    receive buffer posted (try_fill_recv), before DRIVER_OK."""
    callbacks = [skb_recv_done, skb_xmit_done]
    if has_feature(dev, VIRTIO_NET_F_CTRL_VQ):
        callbacks.append(None)
    vm.find_vqs(cpu, dev, callbacks)
    vn = _vn(cpu, dev)
    vn.tx_busy = vn.rx_posted = 0
    try_fill_recv(cpu, dev)


def _add_recvbuf(cpu: NativeCpu, dev: Ref, i: int) -> bool:
    pfn, off = _buf(cpu, dev, RX_PFNS_OFF, i)
    vq = vq_at(cpu, dev, VIRTIO_NET_VQ_RX)
    head = virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, pfn, off), BUF_SIZE,
                               writable=True)
    if head < 0:
        return False
    cpu.write(dev.priv + RX_TOKEN_OFF + head, bytes([i]))
    vn = _vn(cpu, dev)
    vn.rx_posted = vn.rx_posted | 1 << i
    return True


def try_fill_recv(cpu: NativeCpu, dev: Ref) -> int:
    """Post every receive buffer the device does not hold, and kick; stops
    at the first the queue refuses (full, or deleted). Returns how many."""
    posted, held = 0, _vn(cpu, dev).rx_posted
    for i in range(RX_BUFS):
        if not held >> i & 1:
            if not _add_recvbuf(cpu, dev, i):
                break
            posted += 1
    if posted:
        vm.notify(cpu, dev, vq_at(cpu, dev, VIRTIO_NET_VQ_RX))
    return posted


def rx_posted(cpu: NativeCpu, dev: Ref) -> int:
    return bin(_vn(cpu, dev).rx_posted).count("1")


# --- receive: the poll (NAPI) -------------------------------------------------------------

def napi_schedule(cpu: NativeCpu, dev: Ref) -> None:
    """Schedule the poll on this cpu, unless it is scheduled or disabled
    (napi_schedule_prep)."""
    vn = _vn(cpu, dev)
    if vn.napi != NAPI_IDLE:
        return
    vn.napi = NAPI_SCHED
    queue_work(cpu, virtnet_poll, freezable=False)
    # raise_softirq: the poll runs at the end of this cpu's next upcall, which a
    # kick to itself brings at once (after the upcall's yield: other cpus run)
    xen_send_IPI_one(cpu, cpu.vcpu_id)


@export
def skb_recv_done(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    """The receive queue's callback (in the irq thread): the poll does the
    work (virtqueue_napi_schedule)."""
    napi_schedule(cpu, dev)


def virtnet_receive(cpu: NativeCpu, dev: Ref) -> int:
    """Every used receive buffer's frame to the stack; the buffer is the
    driver's again. Returns the frames received."""
    vn, vq = _vn(cpu, dev), vq_at(cpu, dev, VIRTIO_NET_VQ_RX)
    received = 0
    while (got := virtio_ring.get_buf(cpu, vq)) is not None:
        head, length = got
        i = cpu.read(dev.priv + RX_TOKEN_OFF + head, 1)[0]
        if i >= RX_BUFS:
            vn.rx_errors = vn.rx_errors + 1
            continue
        vn.rx_posted = vn.rx_posted & ~(1 << i)
        pfn, off = _buf(cpu, dev, RX_PFNS_OFF, i)
        if VIRTIO_NET_HDR.size < length <= BUF_SIZE:
            frame = cpu.read(va(pfn) + off + VIRTIO_NET_HDR.size, length - VIRTIO_NET_HDR.size)
            vn.rx_frames = vn.rx_frames + 1
            received += 1
            netif_receive(cpu, frame)
        else:
            vn.rx_errors = vn.rx_errors + 1
    return received


def _poll(cpu: NativeCpu, dev: Ref) -> None:
    """virtnet_poll: receive, refill (try_fill_recv), the transmit slots
    the device used back (virtnet_poll_cleantx), then napi_complete; if the
    device used more meanwhile, scheduled again (virtqueue_enable_cb's
    race)."""
    vn = _vn(cpu, dev)
    vn.polls = vn.polls + 1
    virtnet_receive(cpu, dev)
    try_fill_recv(cpu, dev)
    free_old_xmit(cpu, dev)
    vn.napi = NAPI_IDLE
    if any(virtio_ring.more_used(cpu, vq_at(cpu, dev, q))
           for q in (VIRTIO_NET_VQ_RX, VIRTIO_NET_VQ_TX)):
        napi_schedule(cpu, dev)


@export
def virtnet_poll(cpu: NativeCpu, t_now: int) -> None:
    """The poll's work item (system_wq: it runs frozen or not); it does
    nothing unless scheduled (a poll the freeze ran or disabled)."""
    if not _state(cpu):
        return
    dev = _dev(cpu)
    if _vn(cpu, dev).napi == NAPI_SCHED:
        _poll(cpu, dev)


def virtnet_napi_disable(cpu: NativeCpu, dev: Ref) -> None:
    """napi_disable: a poll scheduled is run to its end (Linux waits for
    it; a native call cannot wait, so it runs here, the queues still
    live), and none is scheduled from now on."""
    vn = _vn(cpu, dev)
    if vn.napi == NAPI_SCHED:
        _poll(cpu, dev)
        vn.polls_flushed = vn.polls_flushed + 1
        printk(cpu, "virtio_net: freeze: the poll scheduled before it ran to its end")
    vn.napi = NAPI_DISABLED


def virtnet_napi_enable(cpu: NativeCpu, dev: Ref) -> None:
    """napi_enable, and a poll if the device used buffers meanwhile (it
    raises no second interrupt for them)."""
    vn = _vn(cpu, dev)
    if vn.napi != NAPI_DISABLED:
        return
    vn.napi = NAPI_IDLE
    if virtio_ring.more_used(cpu, vq_at(cpu, dev, VIRTIO_NET_VQ_RX)):
        napi_schedule(cpu, dev)


# --- transmit ----------------------------------------------------------------------------

def free_old_xmit(cpu: NativeCpu, dev: Ref) -> None:
    """The transmit slots the device used are free again."""
    vn, vq = _vn(cpu, dev), vq_at(cpu, dev, VIRTIO_NET_VQ_TX)
    while (got := virtio_ring.get_buf(cpu, vq)) is not None:
        slot = cpu.read(dev.priv + TX_TOKEN_OFF + got[0], 1)[0]
        vn.tx_busy = vn.tx_busy & ~(1 << slot)


@export
def skb_xmit_done(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    """The transmit queue's callback: the poll takes the slots back."""
    napi_schedule(cpu, dev)


@export
def virtnet_start_xmit(cpu: NativeCpu, dev_va: int, frame: bytes) -> int:
    """Send one Ethernet frame: 0, or -errno if it was dropped."""
    dev = _dev(cpu, dev_va)
    vn = _vn(cpu, dev)
    if len(frame) > VIRTIO_NET_MAX_FRAME:
        return -EINVAL
    if vn.detached and not dev.nodetach:
        vn.tx_dropped = vn.tx_dropped + 1
        return -ENODEV
    vq = vq_at(cpu, dev, VIRTIO_NET_VQ_TX)
    if vq.present:
        free_old_xmit(cpu, dev)
    busy = vn.tx_busy
    slot = next((s for s in range(TX_SLOTS) if not busy >> s & 1), None)
    if slot is None:
        vn.tx_dropped = vn.tx_dropped + 1
        return -ENOBUFS
    pfn, off = _buf(cpu, dev, TX_PFNS_OFF, slot)
    data = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame
    cpu.write(va(pfn) + off, data)
    head = virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, pfn, off), len(data),
                               writable=False)
    if head < 0:  # full, or (virtio.nodetach) deleted by a freeze
        vn.tx_dropped = vn.tx_dropped + 1
        return -ENOBUFS
    cpu.write(dev.priv + TX_TOKEN_OFF + head, bytes([slot]))
    vn.tx_busy = busy | 1 << slot
    vn.tx_frames = vn.tx_frames + 1
    vm.notify(cpu, dev, vq)
    free_old_xmit(cpu, dev)
    return 0


# --- config changes ----------------------------------------------------------------------

def _status(cpu: NativeCpu, dev: Ref) -> int:
    if not has_feature(dev, VIRTIO_NET_F_STATUS):
        return VIRTIO_NET_S_LINK_UP
    return vm.config_read(cpu, dev, VIRTIO_NET_CFG_STATUS, 2)


def _update_link(cpu: NativeCpu, dev: Ref) -> int:
    status = _status(cpu, dev)
    vn = _vn(cpu, dev)
    up = 1 if status & VIRTIO_NET_S_LINK_UP else 0
    if up != vn.link_up:
        vn.link_up = up
        printk(cpu, f"virtio_net: link {'up' if up else 'down'}")
    return status


def virtnet_config_changed(cpu: NativeCpu, dev: Ref) -> None:
    """virtnet_config_changed_work: the link, and an announcement asked for."""
    status = _update_link(cpu, dev)
    if status & VIRTIO_NET_S_ANNOUNCE:
        arp_announce(cpu)
        virtnet_ack_link_announce(cpu, dev)


def virtnet_ack_link_announce(cpu: NativeCpu, dev: Ref) -> None:
    """VIRTIO_NET_CTRL_ANNOUNCE_ACK on the control queue: the device clears
    ANNOUNCE (virtnet_send_command: the command, then the ack byte)."""
    if not has_feature(dev, VIRTIO_NET_F_CTRL_VQ):
        return
    vn, vq = _vn(cpu, dev), vq_at(cpu, dev, VIRTIO_NET_VQ_CTRL)
    page = va(vn.ctrl)
    cpu.write(page, VIRTIO_NET_CTRL_HDR.pack(VIRTIO_NET_CTRL_ANNOUNCE,
                                             VIRTIO_NET_CTRL_ANNOUNCE_ACK) + b"\xff")
    bus = virtio_ring.bus_addr(cpu, vn.ctrl)
    head = virtio_ring.add_sgs(cpu, vq, [(bus, VIRTIO_NET_CTRL_HDR.size)],
                               [(bus + VIRTIO_NET_CTRL_HDR.size, 1)])
    if head < 0:
        printk(cpu, "virtio_net: no room for the announce ack")
        return
    vm.notify(cpu, dev, vq)
    got = virtio_ring.get_buf(cpu, vq)  # the device serves a command when notified
    ack = cpu.read(page + VIRTIO_NET_CTRL_HDR.size, 1)[0]
    if got is None or got[0] != head or ack != VIRTIO_NET_OK:
        printk(cpu, f"virtio_net: the device did not ack the announcement (ack {ack:#x})")
        return
    vn.announce_acks = vn.announce_acks + 1
    printk(cpu, "virtio_net: announced (VIRTIO_NET_S_ANNOUNCE acked)")


# --- PM ------------------------------------------------------------------------------------

def virtnet_freeze(cpu: NativeCpu, dev: Ref) -> int:
    """virtnet_freeze: detach and disable the poll (unless virtio.nodetach),
    reset, delete the queues (the buffers the device held are the
    driver's again: free_unused_bufs)."""
    vn = _vn(cpu, dev)
    if not dev.nodetach:
        vn.detached = 1
        virtnet_napi_disable(cpu, dev)
    virtio_reset_device(cpu, dev)
    vm.del_vqs(cpu, dev)
    vn.rx_posted = vn.tx_busy = 0
    printk(cpu, "virtio_net: frozen: " + (
        "device detached, poll disabled, " if vn.detached else
        "device NOT detached, poll NOT disabled (option virtio.nodetach), ")
        + "reset, queues deleted")
    return 0


def _restore_common(cpu: NativeCpu, dev: Ref, how: str) -> int:
    """virtnet_restore_up: the queues again, the receive buffers posted,
    DRIVER_OK, the poll enabled, the device attached."""
    init_vqs(cpu, dev)
    virtio_device_ready(cpu, dev)
    vn = _vn(cpu, dev)
    virtnet_napi_enable(cpu, dev)
    vn.detached = 0
    _update_link(cpu, dev)
    printk(cpu, f"virtio_net: {how}: {rx_posted(cpu, dev)} of {RX_BUFS} receive buffers "
                f"posted, {bin(vn.tx_busy).count('1')} transmit slots in flight, link "
                f"{'up' if vn.link_up else 'down'}")
    return 0


def virtnet_restore(cpu: NativeCpu, dev: Ref) -> int:
    return _restore_common(cpu, dev, "restored")


def virtnet_thaw(cpu: NativeCpu, dev: Ref) -> int:
    """The same domain goes on: as the restore (Linux has one handler)."""
    return _restore_common(cpu, dev, "thawed")


virtio_net_driver = register_virtio_driver(export(virtio_driver(
    "virtio_net", VIRTIO_ID_NET, KNOWN_FEATURES, probe=virtnet_probe, freeze=virtnet_freeze,
    restore=virtnet_restore, thaw=virtnet_thaw,
    config_changed=virtnet_config_changed),
    "guestos.drivers.virtio_net.virtio_net_driver"))
