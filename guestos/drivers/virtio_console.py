"""The virtio console driver, its generic ports (Linux's
drivers/char/virtio_console.c, MULTIPORT only, for a Xen PV guest whose
console stays the Xen PV console).

The device announces its ports on the control queues: DEVICE_READY from the
driver, DEVICE_ADD for each port, then for each PORT_READY the port's name
and whether the host side is open (PORT_OPEN). Each port becomes a device
file, ``vport0p<id>`` (Linux's name), and, if the port's name fits a node
name, a second node of that name (udev's /dev/virtio-ports/NAME link). A
user program opens one (only one open at a time, as Linux's port_fops_open),
reads the host's input and writes output to the host:

* **read** (port_fops_read): what the device put in the port's receive
  buffers; with none, end of file (0) if the host side is closed, else the
  task waits until input comes or the host side closes;
* **write** (port_fops_write): at most a page, into the port's transmit
  queue; it waits while the host side is closed (will_write_block);
* **open** and **release** tell the device (PORT_OPEN 1 and 0), which gives
  the port input only while the guest has it open.

A control message from the device is handled by the control work
(``control_work_handler``, on system_wq), which the control receiveq's
callback queues, or at once by probe and restore after they sent messages
the device answers in its notify (``handle_control``).

All state is in guest memory: the device's ``priv`` page holds the driver's
PORTDEV and one PORT per port; the buffers are pages the driver allocates.

PM (virtcons_freeze, virtcons_restore):

* freeze: the users stop (``detached``: a read or a write waits until the
  restore), the device is reset (virtio_reset_device), the control work
  cancelled (cancel_work_sync: after the reset, whose flush leaves no
  callback to queue it again), every port's host side taken as closed
  ("we'll ask the host later"), unread input discarded, and the queues
  deleted. The option ``virtio.nodetach=1`` skips the detach: the work, not
  cancelled, may run after the delete and give a buffer back to the deleted
  control receiveq (the ring prints a FAILURE line; docs/virtio-console.md);
* restore and thaw: the queues again, DRIVER_OK, the control receiveq and
  each port's receiveq filled, PORT_READY for each known port (the device
  answers with PORT_OPEN 1 if its host side is open: a client connected)
  and PORT_OPEN 1 for each port the guest has open; DEVICE_READY is not
  sent again (the driver keeps its ports and their names). The answers are
  handled before the users run again, then every port's waiters are woken:
  a read that waited goes on waiting if the host side is open and returns
  end of file if not (the two outcomes of the 2011 review's test).
"""

from __future__ import annotations

from guestos.fs import device_create, file_operations, wake_up_node
from guestos.kdata import driver_data, set_driver_data
from guestos.layout import Layout, Ref
from guestos.mm import PAGE_SIZE, alloc_pages, va
from guestos.printk import printk
from guestos.symbols import export
from guestos.usercopy import copy_from_user, copy_to_user
from guestos.workqueue import cancel_work, queue_work
from hypervisor.public.errno import EBUSY, EFAULT, EINVAL, EIO, ENODEV
from hypervisor.public.io.virtio_console import (
    VIRTIO_CONSOLE_BAD_ID,
    VIRTIO_CONSOLE_CFG_MAX_NR_PORTS,
    VIRTIO_CONSOLE_CONSOLE_PORT,
    VIRTIO_CONSOLE_CONTROL,
    VIRTIO_CONSOLE_CTRL_RXQ,
    VIRTIO_CONSOLE_CTRL_TXQ,
    VIRTIO_CONSOLE_DEVICE_ADD,
    VIRTIO_CONSOLE_DEVICE_READY,
    VIRTIO_CONSOLE_DEVICE_REMOVE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_PORT_NAME,
    VIRTIO_CONSOLE_PORT_OPEN,
    VIRTIO_CONSOLE_PORT_READY,
    VIRTIO_CONSOLE_RESIZE_EVENT,
    VIRTIO_ID_CONSOLE,
    nr_queues,
    port_rxq,
    port_txq,
    queue_port,
)
from hypervisor.public.native import NativeCpu

from . import virtio_mmio as vm
from . import virtio_ring
from .virtio import (
    MAX_VQS,
    dev_at,
    has_feature,
    register_virtio_driver,
    virtio_device_ready,
    virtio_driver,
    virtio_reset_device,
    vq_at,
)

KNOWN_FEATURES = 1 << VIRTIO_CONSOLE_F_MULTIPORT
MAX_PORTS = MAX_VQS // 2 - 1   # the queues a device page has room for: ports 0..5
RX_BUFS = 4                    # receive buffers per port, a page each
CTRL_BUFS = 16                 # control receive buffers, in one page
CTRL_BUF_SIZE = PAGE_SIZE // CTRL_BUFS
NONE = 0xFF                    # no buffer
NAME_LEN = 32                  # bytes of a port's name kept

PORTDEV = Layout("ports_device", [
    ("max_nr_ports", "u64"),   # the device's
    ("nr_ports", "u64"),       # the ports this driver has queues for (<= MAX_PORTS)
    ("ctrl_rx", "u64"),        # pfn of the control receive buffers
    ("ctrl_tx", "u64"),        # pfn of the page a control message is sent from
    ("detached", "u64"),       # frozen: the users wait (virtcons_freeze's detach)
    ("ctrl_msgs", "u64"),      # control messages handled
    ("bad_ctrl", "u64"),       # ... dropped: short, or for a port not added
    ("not_acked", "u64"),      # control messages the device did not use
    ("discarded", "u64"),      # input bytes thrown away at a freeze
    ("taken", "u64"),          # control messages taken by the callback, for the work
    ("cancelled", "u64"),      # ... dropped unhandled by the freeze's cancel
    *((f"cmap{i}", "u8") for i in range(CTRL_BUFS)),  # descriptor -> control buffer
    *((f"tbuf{i}", "u8") for i in range(CTRL_BUFS)),  # the taken: their buffers, in order
    *((f"tlen{i}", "u16") for i in range(CTRL_BUFS)),  # ... and lengths
])
PORT = Layout("port", [
    ("present", "u64"),        # DEVICE_ADD seen
    ("node", "u64"),           # node index + 1 of vport0pN (0: none)
    ("alias", "u64"),          # node index + 1 of the port's name (0: none)
    ("host_connected", "u64"),
    ("guest_connected", "u64"),  # a file has it open
    ("console", "u64"),        # CONSOLE_PORT: a console port (its output goes nowhere yet)
    ("rx", "u64"),             # pfn of the first of RX_BUFS receive buffers
    ("tx", "u64"),             # pfn of the transmit buffer
    ("cur_buf", "u64"),        # the receive buffer being read (NONE: none)
    ("cur_len", "u64"),
    ("cur_off", "u64"),
    ("rx_bytes", "u64"),
    ("tx_bytes", "u64"),
    *((f"rxmap{i}", "u8") for i in range(16)),   # descriptor -> receive buffer
])
PORTS_OFFSET = 512
PORT_STRIDE = 256
NAME_OFFSET = 192              # in a PORT: the name, NUL-padded
assert PORTDEV.size <= PORTS_OFFSET and PORT.size <= NAME_OFFSET
assert NAME_OFFSET + NAME_LEN <= PORT_STRIDE
assert PORTS_OFFSET + MAX_PORTS * PORT_STRIDE <= PAGE_SIZE


def _devva(cpu: NativeCpu) -> int:
    return driver_data(cpu, virtio_console_driver)


def _dev(cpu: NativeCpu) -> Ref:
    return dev_at(cpu, _devva(cpu))


def _pd(cpu: NativeCpu, dev: Ref) -> Ref:
    return PORTDEV.at(cpu, dev.priv)


def _port(cpu: NativeCpu, dev: Ref, pid: int) -> Ref:
    return PORT.at(cpu, dev.priv + PORTS_OFFSET + pid * PORT_STRIDE)


def port_name(cpu: NativeCpu, port: Ref) -> str:
    return cpu.read(port.va + NAME_OFFSET, NAME_LEN).split(b"\0")[0].decode(errors="replace")


def _nodes(port: Ref) -> list[int]:
    return [n - 1 for n in (port.node, port.alias) if n]


def _wake(cpu: NativeCpu, port: Ref) -> None:
    for n in _nodes(port):
        wake_up_node(cpu, n)


# --- probe and the queues ------------------------------------------------------------------

def virtcons_probe(cpu: NativeCpu, dev: Ref) -> int:
    if _devva(cpu):
        printk(cpu, f"virtio-mmio at {dev.base:#x}: only one virtio console is supported")
        return -EBUSY
    if not has_feature(dev, VIRTIO_CONSOLE_F_MULTIPORT):
        printk(cpu, "virtio_console: the device offers no MULTIPORT; not driven")
        return -ENODEV
    max_nr = vm.config_read(cpu, dev, VIRTIO_CONSOLE_CFG_MAX_NR_PORTS)
    if max_nr == 0 or max_nr > 0x8000:
        printk(cpu, f"virtio_console: Invalidate max_nr_ports {max_nr}")
        return -EINVAL
    dev.priv = va(alloc_pages(cpu))
    set_driver_data(cpu, virtio_console_driver, dev.va)
    pd = _pd(cpu, dev)
    pd.max_nr_ports, pd.nr_ports = max_nr, min(max_nr, MAX_PORTS)
    pd.ctrl_rx, pd.ctrl_tx = alloc_pages(cpu), alloc_pages(cpu)
    if max_nr > MAX_PORTS:
        printk(cpu, f"virtio_console: {max_nr} ports; ports from {MAX_PORTS} on are not used")
    init_vqs(cpu, dev)
    virtio_device_ready(cpu, dev)
    fill_control(cpu, dev)
    send_control_msg(cpu, dev, VIRTIO_CONSOLE_BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)
    handle_control(cpu, dev)
    printk(cpu, f"virtio_console: device at {dev.base:#x}, event channel {dev.port}, "
                f"{max_nr} ports")
    return 0


def init_vqs(cpu: NativeCpu, dev: Ref) -> None:
    """Every queue of the ports this driver has room for, in the spec's order."""
    callbacks: list = []
    for i in range(nr_queues(_pd(cpu, dev).nr_ports)):
        if i == VIRTIO_CONSOLE_CTRL_RXQ:
            callbacks.append(control_intr)
        elif i == VIRTIO_CONSOLE_CTRL_TXQ:
            callbacks.append(None)  # control messages are reclaimed where they are sent
        elif i % 2:
            callbacks.append(out_intr)  # a throttled port's buffer used late
        else:
            callbacks.append(in_intr)
    vm.find_vqs(cpu, dev, callbacks)


def fill_control(cpu: NativeCpu, dev: Ref) -> None:
    pd = _pd(cpu, dev)
    vq = vq_at(cpu, dev, VIRTIO_CONSOLE_CTRL_RXQ)
    for i in range(CTRL_BUFS):
        head = virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, pd.ctrl_rx,
                                                                 i * CTRL_BUF_SIZE),
                                   CTRL_BUF_SIZE, writable=True)
        if head < 0:
            break
        setattr(pd, f"cmap{head}", i)
    vm.notify(cpu, dev, vq)


def fill_port(cpu: NativeCpu, dev: Ref, pid: int) -> None:
    """The port's receive buffers, every one given to the device."""
    port = _port(cpu, dev, pid)
    if not port.rx:
        port.rx = alloc_pages(cpu, RX_BUFS)
        port.tx = alloc_pages(cpu)
    port.cur_buf = NONE
    vq = vq_at(cpu, dev, port_rxq(pid))
    for i in range(RX_BUFS):
        _add_inbuf(cpu, port, vq, i)
    vm.notify(cpu, dev, vq)


def _add_inbuf(cpu: NativeCpu, port: Ref, vq: Ref, i: int) -> None:
    head = virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, port.rx + i), PAGE_SIZE,
                               writable=True)
    if head >= 0:
        setattr(port, f"rxmap{head}", i)


# --- control messages ------------------------------------------------------------------------

def send_control_msg(cpu: NativeCpu, dev: Ref, pid: int, event: int, value: int) -> None:
    """One message on the control transmitq (__send_control_msg). The device
    serves it in the notify; Linux spins until it is used."""
    pd = _pd(cpu, dev)
    vq = vq_at(cpu, dev, VIRTIO_CONSOLE_CTRL_TXQ)
    cpu.write(va(pd.ctrl_tx), VIRTIO_CONSOLE_CONTROL.pack(pid, event, value))
    head = virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, pd.ctrl_tx),
                               VIRTIO_CONSOLE_CONTROL.size, writable=False)
    if head < 0:
        return
    vm.notify(cpu, dev, vq)
    while (got := virtio_ring.get_buf(cpu, vq)) is not None:
        if got[0] == head:
            return
    pd.not_acked = pd.not_acked + 1


@export
def control_intr(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    """The control receiveq's callback (control_intr): the messages the
    device sent are taken off the queue and the control work queued on
    system_wq, whose worker the freezer does not stop. Linux's work takes
    them itself and may sleep between taking a buffer and giving it back;
    pvlab's work runs whole, so the callback takes them and the buffers stay
    out of the queue while the work waits for its kworker."""
    _take_control(cpu, dev)
    queue_work(cpu, control_work_handler, freezable=False)


@export
def control_work_handler(cpu: NativeCpu, t_now: int) -> None:
    """The control work (control_work_handler): each message taken handled,
    its buffer given back. The freeze cancels it (virtcons_freeze's
    cancel_work_sync); under option virtio.nodetach it is not, and may run
    after the freeze deleted the queues."""
    if _devva(cpu):
        handle_control(cpu, _dev(cpu))


def _take_control(cpu: NativeCpu, dev: Ref) -> int:
    """Every used control buffer noted for the work, in order; how many."""
    pd = _pd(cpu, dev)
    vq = vq_at(cpu, dev, VIRTIO_CONSOLE_CTRL_RXQ)
    n = 0
    while pd.taken < CTRL_BUFS and (got := virtio_ring.get_buf(cpu, vq)) is not None:
        head, length = got
        setattr(pd, f"tbuf{pd.taken}", getattr(pd, f"cmap{head}"))
        setattr(pd, f"tlen{pd.taken}", min(length, CTRL_BUF_SIZE))
        pd.taken, n = pd.taken + 1, n + 1
    return n


def handle_control(cpu: NativeCpu, dev: Ref) -> None:
    """Every control message taken or used since, handled, its buffer given
    back first (so that the answers to a PORT_READY sent here, which the
    device gives in its notify, have room). Called by the work, and at once
    by probe and restore."""
    pd = _pd(cpu, dev)
    vq = vq_at(cpu, dev, VIRTIO_CONSOLE_CTRL_RXQ)
    while _take_control(cpu, dev) or pd.taken:
        taken = [(getattr(pd, f"tbuf{k}"), getattr(pd, f"tlen{k}")) for k in range(pd.taken)]
        pd.taken = 0
        for i, length in taken:
            data = cpu.read(va(pd.ctrl_rx) + i * CTRL_BUF_SIZE, length)
            h = virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, pd.ctrl_rx,
                                                                  i * CTRL_BUF_SIZE),
                                    CTRL_BUF_SIZE, writable=True)
            if h >= 0:
                setattr(pd, f"cmap{h}", i)
                vm.notify(cpu, dev, vq)
            handle_control_message(cpu, dev, data)


def handle_control_message(cpu: NativeCpu, dev: Ref, data: bytes) -> None:
    pd = _pd(cpu, dev)
    if len(data) < VIRTIO_CONSOLE_CONTROL.size:
        pd.bad_ctrl = pd.bad_ctrl + 1
        return
    pid, event, value = VIRTIO_CONSOLE_CONTROL.unpack_from(data)
    pd.ctrl_msgs = pd.ctrl_msgs + 1
    if pid >= pd.nr_ports:
        if event == VIRTIO_CONSOLE_DEVICE_ADD:
            printk(cpu, f"virtio_console: port {pid}: beyond the {pd.nr_ports} this driver "
                        "has queues for; refused")
            send_control_msg(cpu, dev, pid, VIRTIO_CONSOLE_PORT_READY, 0)
        else:
            pd.bad_ctrl = pd.bad_ctrl + 1
        return
    port = _port(cpu, dev, pid)
    if event == VIRTIO_CONSOLE_DEVICE_ADD:
        if port.present:  # Linux: a second PORT_ADD is answered again
            send_control_msg(cpu, dev, pid, VIRTIO_CONSOLE_PORT_READY, 1)
            return
        add_port(cpu, dev, pid)
        return
    if not port.present:
        pd.bad_ctrl = pd.bad_ctrl + 1
        return
    if event == VIRTIO_CONSOLE_PORT_NAME:
        _name_port(cpu, port, pid, data[VIRTIO_CONSOLE_CONTROL.size:])
    elif event == VIRTIO_CONSOLE_PORT_OPEN:
        port.host_connected = 1 if value else 0
        _wake(cpu, port)
    elif event == VIRTIO_CONSOLE_CONSOLE_PORT:
        if value and not port.console:
            port.console = 1  # init_port_console: opened on the guest's side
            port.guest_connected = 1
            send_control_msg(cpu, dev, pid, VIRTIO_CONSOLE_PORT_OPEN, 1)
    elif event == VIRTIO_CONSOLE_DEVICE_REMOVE:
        port.present = port.host_connected = 0
        _wake(cpu, port)
    elif event != VIRTIO_CONSOLE_RESIZE_EVENT:
        pd.bad_ctrl = pd.bad_ctrl + 1


def add_port(cpu: NativeCpu, dev: Ref, pid: int) -> None:
    """A new port (add_port): its buffers, its node, PORT_READY."""
    port = _port(cpu, dev, pid)
    port.present = 1
    port.host_connected = port.guest_connected = 0
    fill_port(cpu, dev, pid)
    if not port.node:
        n = device_create(cpu, f"vport0p{pid}", console_fops, pid)
        if n < 0:
            printk(cpu, f"virtio_console: no node for port {pid} ({n})")
            send_control_msg(cpu, dev, pid, VIRTIO_CONSOLE_PORT_READY, 0)
            return
        port.node = n + 1
    send_control_msg(cpu, dev, pid, VIRTIO_CONSOLE_PORT_READY, 1)


def _name_port(cpu: NativeCpu, port: Ref, pid: int, raw: bytes) -> None:
    """PORT_NAME: kept once (after a restore it comes again), and a node of
    that name made if it fits one."""
    if cpu.read(port.va + NAME_OFFSET, 1) != b"\0":
        return
    name = raw.split(b"\0")[0][:NAME_LEN - 1]
    cpu.write(port.va + NAME_OFFSET, name.ljust(NAME_LEN, b"\0"))
    text = name.decode(errors="replace")
    n = device_create(cpu, text, console_fops, pid) if name else -EINVAL
    if n >= 0:
        port.alias = n + 1
    printk(cpu, f"virtio_console: port {pid} is vport0p{pid}, named {text!r}"
                + ("" if n >= 0 else " (no node of that name)"))


# --- data ----------------------------------------------------------------------------------

@export
def in_intr(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    """Input came on a port: its readers try again."""
    pid = queue_port(vq.index)
    if pid is not None:
        _wake(cpu, _port(cpu, dev, pid))


@export
def out_intr(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    """A port's output buffer used after its notify (the host throttled the
    port until its client read): its writers try again (Linux's out_intr)."""
    pid = queue_port(vq.index)
    if pid is not None:
        _wake(cpu, _port(cpu, dev, pid))


def _take_inbuf(cpu: NativeCpu, port: Ref, vq: Ref) -> bool:
    """A used receive buffer becomes the one being read; whether there is one."""
    if port.cur_buf != NONE:
        return True
    got = virtio_ring.get_buf(cpu, vq)
    if got is None:
        return False
    port.cur_buf, port.cur_len, port.cur_off = getattr(port, f"rxmap{got[0]}"), got[1], 0
    return True


def _give_inbuf(cpu: NativeCpu, dev: Ref, port: Ref, vq: Ref) -> None:
    """The buffer read to its end goes back to the device."""
    _add_inbuf(cpu, port, vq, port.cur_buf)
    port.cur_buf = NONE
    vm.notify(cpu, dev, vq)


def port_fops_read(cpu: NativeCpu, file: Ref, ubuf: int, size: int) -> int | None:
    dev = _dev(cpu)
    port = _port(cpu, dev, file.minor)
    if _pd(cpu, dev).detached:
        return None  # frozen: the restore wakes the reader
    vq = vq_at(cpu, dev, port_rxq(file.minor))
    if not vq.present or not _take_inbuf(cpu, port, vq):
        if not port.host_connected:
            return 0  # end of file: nobody at the host's end
        return None
    n = min(size, port.cur_len - port.cur_off)
    data = cpu.read(va(port.rx + port.cur_buf) + port.cur_off, n)
    if not copy_to_user(cpu, ubuf, data):
        return -EFAULT
    port.cur_off = port.cur_off + n
    port.rx_bytes = port.rx_bytes + n
    if port.cur_off >= port.cur_len:
        _give_inbuf(cpu, dev, port, vq)
    return n


def port_fops_write(cpu: NativeCpu, file: Ref, ubuf: int, size: int) -> int | None:
    dev = _dev(cpu)
    port = _port(cpu, dev, file.minor)
    if _pd(cpu, dev).detached:
        return None
    if not port.present:
        return -ENODEV
    if not port.host_connected:
        return None  # will_write_block: the host opens it, or the file is closed
    n = min(size, PAGE_SIZE)
    data = copy_from_user(cpu, ubuf, n)
    if data is None:
        return -EFAULT
    vq = vq_at(cpu, dev, port_txq(file.minor))
    while virtio_ring.get_buf(cpu, vq) is not None:  # reclaim_consumed_buffers
        pass
    if vq.num_free < vq.num:
        return None  # will_write_block: the host holds the last buffer (a throttled port)
    cpu.write(va(port.tx), data)
    head = virtio_ring.add_buf(cpu, vq, virtio_ring.bus_addr(cpu, port.tx), n, writable=False)
    if head < 0:
        return -EIO  # the queue is full
    vm.notify(cpu, dev, vq)
    while virtio_ring.get_buf(cpu, vq) is not None:  # used in the notify, unless throttled
        pass
    port.tx_bytes = port.tx_bytes + n
    return n


def port_fops_open(cpu: NativeCpu, file: Ref) -> int:
    if not _devva(cpu):
        return -ENODEV
    dev = _dev(cpu)
    port = _port(cpu, dev, file.minor)
    if not port.present:
        return -ENODEV
    if port.guest_connected:
        return -EBUSY  # one open at a time
    port.guest_connected = 1
    if not _pd(cpu, dev).detached:
        send_control_msg(cpu, dev, file.minor, VIRTIO_CONSOLE_PORT_OPEN, 1)
    return 0


def port_fops_release(cpu: NativeCpu, file: Ref) -> None:
    dev = _dev(cpu)
    port = _port(cpu, dev, file.minor)
    port.guest_connected = 0
    if not _pd(cpu, dev).detached and port.present:
        send_control_msg(cpu, dev, file.minor, VIRTIO_CONSOLE_PORT_OPEN, 0)
        _discard_input(cpu, dev, port, file.minor)


console_fops = export(file_operations(port_fops_open, port_fops_read, port_fops_write,
                                      port_fops_release, no_llseek=True),
                      "guestos.drivers.virtio_console.console_fops")


def _discard_input(cpu: NativeCpu, dev: Ref, port: Ref, pid: int) -> int:
    """Unread input thrown away (discard_port_data), the buffers given back
    to the device if its queue is there; how many bytes."""
    vq = vq_at(cpu, dev, port_rxq(pid))
    lost = 0
    while vq.present and _take_inbuf(cpu, port, vq):
        lost += port.cur_len - port.cur_off
        _give_inbuf(cpu, dev, port, vq)
    port.cur_buf = NONE
    return lost


# --- PM --------------------------------------------------------------------------------------

def _ports(cpu: NativeCpu, dev: Ref) -> list[tuple[int, Ref]]:
    pd = _pd(cpu, dev)
    return [(pid, p) for pid in range(pd.nr_ports) if (p := _port(cpu, dev, pid)).present]


def virtcons_freeze(cpu: NativeCpu, dev: Ref) -> int:
    """Stop the users, reset the device, cancel the control work, forget the
    host side and the unread input, delete the queues (virtcons_freeze)."""
    pd = _pd(cpu, dev)
    if not dev.nodetach:
        pd.detached = 1
    virtio_reset_device(cpu, dev)
    dropped = 0
    if not dev.nodetach:
        # after the reset, whose flush leaves no callback to queue it again;
        # the messages it had are the old device's: the restore asks afresh
        cancel_work(cpu, control_work_handler)
        dropped, pd.taken = pd.taken, 0
        pd.cancelled = pd.cancelled + dropped
    lost = 0
    for pid, port in _ports(cpu, dev):
        port.host_connected = 0  # asked again at the restore
        lost += _discard_input(cpu, dev, port, pid)
    pd.discarded = pd.discarded + lost
    vm.del_vqs(cpu, dev)
    printk(cpu, f"virtio_console: frozen: device reset, queues deleted, {lost} bytes of "
                "input discarded" + (f", control work cancelled ({dropped} message"
                                     f"{'' if dropped == 1 else 's'} dropped)"
                                     if not dev.nodetach else
                                     " (option virtio.nodetach: the control work and the "
                                     "users not stopped)"))
    return 0


def virtcons_restore(cpu: NativeCpu, dev: Ref) -> int:
    """The queues again, DRIVER_OK, the buffers, each port's state asked of
    the device; then the users go on, each waiter trying again."""
    init_vqs(cpu, dev)
    virtio_device_ready(cpu, dev)
    _pd(cpu, dev).taken = 0  # (option virtio.nodetach) taken from the old queues
    fill_control(cpu, dev)
    ports = _ports(cpu, dev)
    for pid, port in ports:
        fill_port(cpu, dev, pid)
        send_control_msg(cpu, dev, pid, VIRTIO_CONSOLE_PORT_READY, 1)
        if port.guest_connected:
            send_control_msg(cpu, dev, pid, VIRTIO_CONSOLE_PORT_OPEN, 1)
    handle_control(cpu, dev)
    _pd(cpu, dev).detached = 0
    for _, port in ports:
        _wake(cpu, port)
    printk(cpu, "virtio_console: restored: " + (", ".join(
        f"vport0p{pid} host {'open' if p.host_connected else 'closed'}"
        for pid, p in ports) or "no ports"))
    return 0


def console_state(cpu: NativeCpu) -> dict[str, object]:
    """The driver's counters and ports, for tests and the curious."""
    if not _devva(cpu):
        return {}
    dev = _dev(cpu)
    pd = _pd(cpu, dev)
    return {"ctrl_msgs": pd.ctrl_msgs, "bad_ctrl": pd.bad_ctrl, "not_acked": pd.not_acked,
            "discarded": pd.discarded, "detached": pd.detached, "taken": pd.taken,
            "cancelled": pd.cancelled,
            "ports": {pid: {"name": port_name(cpu, p), "host": p.host_connected,
                            "guest": p.guest_connected, "rx": p.rx_bytes, "tx": p.tx_bytes}
                      for pid, p in _ports(cpu, dev)}}


virtio_console_driver = register_virtio_driver(export(virtio_driver(
    "virtio_console", VIRTIO_ID_CONSOLE, KNOWN_FEATURES, probe=virtcons_probe,
    freeze=virtcons_freeze, restore=virtcons_restore),
    "guestos.drivers.virtio_console.virtio_console_driver"))

