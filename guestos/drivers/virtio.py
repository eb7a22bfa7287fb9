"""The virtio core (Linux's drivers/virtio/virtio.c): drivers, the status
handshake, feature negotiation, config changes and the PM order, the same
for every device and every driver.

A driver is a ``virtio_driver`` (exported, and registered with
``register_virtio_driver`` when its module is imported): the device id it
drives, the features it knows and its handlers, probe, remove, freeze,
restore (thaw, if it differs from restore), config_changed, each called
with the device as a Ref. A transport (virtio_mmio.py) finds devices and
calls ``register_virtio_device``; the core binds the driver by device id
and calls its probe inside the handshake. The device's state, the core's
part and the transport's, is a VIRTIO_DEV struct at the start of a page
(guest memory, like all kernel state); the driver's own data is at
``dev.priv``: the last half of the device's page (``PRIV_OFFSET``), or a
page the driver allocates. The code the core calls is named in that struct
by symbol number (guestos/symbols.py): the driver, and the transport's
``virtio_config_ops``.

PM (virtio_device_freeze / virtio_device_restore): config changes are
deferred from the freeze to the end of the restore; the driver's freeze
stops its users, resets the device with ``virtio_reset_device`` and only
then deletes its queues; a restore (or a thaw) resets the device, goes
through ACKNOWLEDGE, DRIVER, the features negotiated before and
FEATURES_OK, calls the driver's restore, which makes its queues again, sets
DRIVER_OK if the driver did not, and delivers the config change that came
while frozen.

The reset flushes the interrupt handlers (Linux's virtio_reset_device under
CONFIG_VIRTIO_HARDEN_NOTIFICATION): every queue is marked broken, so that a
handler that runs later calls no callback, and a handler half way through on
another cpu (the transport's irq thread, woken but not run) is finished
first; then status 0 is written. No vring callback runs after the reset.
The option ``virtio.nosync=1`` drops the break and the flush (the review of
2011: "should reset flush all interrupt handlers?"), so that a callback can
run on a queue the freeze deleted; the vring code says so with a FAILURE
line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from guestos.layout import Layout, Ref
from guestos.printk import printk
from guestos.symbols import NO_SYMBOL, symbol, symbol_number
from hypervisor.public.errno import EIO, ENODEV
from hypervisor.public.io.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
)
from hypervisor.public.native import NativeCpu

from . import virtio_ring

VIRTIO_DEV = Layout("virtio_dev", [
    # the transport's (virtio_mmio.py)
    ("base", "u64"),          # machine address of the register page
    ("regs", "u64"),          # where the kernel maps it (0: not mapped)
    ("regs_pfn", "u64"),      # the linear-map page whose slot the mapping takes
    ("port", "u64"),          # the event channel of its interrupt
    ("irq", "u64"),           #   and the irq it is bound to
    ("irq_cpu", "u64"),       #   on this cpu
    ("isr", "u64"),           # interrupt status the hard half read, for the thread
    ("vq_signalled", "u64"),  # bitmask: queues the hard half saw present
    ("interrupts", "u64"),
    ("spurious", "u64"),      # events that found the device reset or frozen
    ("keepmap_bug", "u64"),   # leave the registers mapped at a save (a planted bug)
    # the core's (struct virtio_device)
    ("config_ops", "u64"),    # symbol number of the transport's virtio_config_ops
    ("driver", "u64"),        # symbol number of the bound virtio_driver (0: none)
    ("device_id", "u64"),
    ("features", "u64"),      # negotiated
    ("failed", "u64"),        # FAILED was set when frozen (added again at restore)
    ("config_core_enabled", "u64"),   # virtio_config_core_enable/disable
    ("config_driver_disabled", "u64"),  # virtio_config_driver_disable/enable
    ("config_change_pending", "u64"),   # a change came while disabled
    ("config_changes", "u64"),         # delivered to the driver
    ("config_deferred", "u64"),        # held back while disabled
    ("priv", "u64"),          # the driver's own data (a VA; 0: none)
    ("next", "u64"),          # the transport's next device (a VA; 0: the last)
    ("nvqs", "u64"),          # queue slots in use (find_vqs .. del_vqs)
    ("nosync", "u64"),        # option virtio.nosync=1: no break, no flush
    ("flushed", "u64"),       # irq threads the reset's flush finished
    ("broken_irqs", "u64"),   # vring interrupts refused on broken queues
    ("late_callbacks", "u64"),  # callbacks run on a queue already deleted (nosync)
    ("nodetach", "u64"),      # option virtio.nodetach=1: the driver's freeze does not
                              #   stop its users before the reset (a planted bug)
])
VQ_OFFSET = 256
VQ_STRIDE = 128
PRIV_OFFSET = 2048            # the driver's, if its data fits in 2 KiB
MAX_VQS = (PRIV_OFFSET - VQ_OFFSET) // VQ_STRIDE
assert VIRTIO_DEV.size <= VQ_OFFSET and virtio_ring.VQ.size <= VQ_STRIDE

DevHandler = Callable[[NativeCpu, Ref], int]  # (cpu, dev) -> 0 or -errno
ConfigHandler = Callable[[NativeCpu, Ref], None]


class VirtioError(Exception):
    """The device cannot be driven; the message says why (not fatal to the kernel)."""


@dataclass
class virtio_config_ops:
    """A transport's operations (include/linux/virtio_config.h); export it."""

    get_status: Callable[[NativeCpu, Ref], int]
    set_status: Callable[[NativeCpu, Ref, int], None]
    reset: Callable[[NativeCpu, Ref], None]
    get_features: Callable[[NativeCpu, Ref], int]
    finalize_features: Callable[[NativeCpu, Ref], None]   # raises VirtioError
    synchronize_cbs: Callable[[NativeCpu, Ref], None]


@dataclass
class virtio_driver:
    """A driver (include/linux/virtio.h); export it and register it."""

    name: str
    device_id: int
    features: int             # the feature bits it knows (feature_table)
    probe: DevHandler
    remove: Callable[[NativeCpu, Ref], None] | None = None
    freeze: DevHandler | None = None
    restore: DevHandler | None = None
    thaw: DevHandler | None = None        # None: the restore (Linux has no other)
    config_changed: ConfigHandler | None = None


_drivers: dict[int, virtio_driver] = {}  # device id -> driver: code, not state


def register_virtio_driver(drv: virtio_driver) -> virtio_driver:
    """At import, as module_virtio_driver does at module init."""
    symbol_number(drv)  # exported: a device names it in guest memory
    _drivers[drv.device_id] = drv
    return drv


def dev_at(cpu: NativeCpu, dev_va: int) -> Ref:
    return VIRTIO_DEV.at(cpu, dev_va)


def vq_at(cpu: NativeCpu, dev: Ref, index: int) -> Ref:
    return virtio_ring.VQ.at(cpu, dev.va + VQ_OFFSET + index * VQ_STRIDE)


def dev_vqs(cpu: NativeCpu, dev: Ref) -> list[Ref]:
    return [vq_at(cpu, dev, i) for i in range(dev.nvqs)]


def _ops(dev: Ref) -> virtio_config_ops:
    return symbol(dev.config_ops)  # type: ignore[return-value]


def driver_of(dev: Ref) -> virtio_driver | None:
    return None if dev.driver == NO_SYMBOL else symbol(dev.driver)  # type: ignore[return-value]


def has_feature(dev: Ref, bit: int) -> bool:
    return bool(dev.features >> bit & 1)


# --- status -------------------------------------------------------------------------------

def add_status(cpu: NativeCpu, dev: Ref, bits: int) -> None:
    ops = _ops(dev)
    ops.set_status(cpu, dev, ops.get_status(cpu, dev) | bits)


def virtio_break_device(cpu: NativeCpu, dev: Ref) -> None:
    """Every queue broken: vring_interrupt calls no callback for it."""
    for vq in dev_vqs(cpu, dev):
        vq.broken = 1


def virtio_synchronize_cbs(cpu: NativeCpu, dev: Ref) -> None:
    """No callback is in progress when this returns, and any later interrupt
    sees what was written before it (the transport's synchronize_cbs)."""
    _ops(dev).synchronize_cbs(cpu, dev)


def virtio_reset_device(cpu: NativeCpu, dev: Ref) -> None:
    """Break the queues, flush the handlers, then status 0: from here on the
    device touches no ring and no vring callback runs. Option virtio.nosync
    writes status 0 alone."""
    if not dev.nosync:
        virtio_break_device(cpu, dev)
        virtio_synchronize_cbs(cpu, dev)
    _ops(dev).reset(cpu, dev)


def virtio_device_ready(cpu: NativeCpu, dev: Ref) -> None:
    """DRIVER_OK, the queues unbroken first (__virtio_unbreak_device): the
    device may use them from now on. A queue the device broke (BAD_RING)
    stays broken."""
    for vq in dev_vqs(cpu, dev):
        vq.broken = vq.bad
    add_status(cpu, dev, VIRTIO_CONFIG_S_DRIVER_OK)


def _features_ok(cpu: NativeCpu, dev: Ref) -> None:
    """Write the negotiated features, FEATURES_OK, and read it back."""
    ops = _ops(dev)
    ops.finalize_features(cpu, dev)
    add_status(cpu, dev, VIRTIO_CONFIG_S_FEATURES_OK)
    if not ops.get_status(cpu, dev) & VIRTIO_CONFIG_S_FEATURES_OK:
        raise VirtioError(f"virtio: device refuses features: {dev.features:#x}")


# --- config changes -----------------------------------------------------------------------

def virtio_config_changed(cpu: NativeCpu, dev: Ref) -> None:
    """From the transport's interrupt (__virtio_config_changed): to the
    driver, or held until config changes are enabled again."""
    if not dev.config_core_enabled or dev.config_driver_disabled:
        dev.config_change_pending = 1
        dev.config_deferred = dev.config_deferred + 1
        return
    drv = driver_of(dev)
    if drv is not None and drv.config_changed is not None:
        dev.config_changes = dev.config_changes + 1
        drv.config_changed(cpu, dev)
    dev.config_change_pending = 0


def virtio_config_core_disable(cpu: NativeCpu, dev: Ref) -> None:
    dev.config_core_enabled = 0


def virtio_config_core_enable(cpu: NativeCpu, dev: Ref) -> None:
    """Enabled again; a change that came meanwhile is delivered now."""
    dev.config_core_enabled = 1
    if dev.config_change_pending:
        drv = driver_of(dev)
        printk(cpu, f"{drv.name if drv else 'virtio'}: a config change held back while "
                    "config changes were disabled, delivered now")
        virtio_config_changed(cpu, dev)


def virtio_config_driver_disable(cpu: NativeCpu, dev: Ref) -> None:
    dev.config_driver_disabled = 1


def virtio_config_driver_enable(cpu: NativeCpu, dev: Ref) -> None:
    dev.config_driver_disabled = 0
    if dev.config_change_pending:
        virtio_config_changed(cpu, dev)


# --- binding ------------------------------------------------------------------------------

def register_virtio_device(cpu: NativeCpu, dev: Ref, cmdline: str) -> int:
    """A transport found ``dev`` (its config_ops and device_id set): reset,
    ACKNOWLEDGE, and bind the driver of its id (virtio_dev_probe). Returns 0,
    -ENODEV (no driver) or the probe's error (the device left FAILED)."""
    words = cmdline.split()
    dev.nosync = 1 if "virtio.nosync=1" in words else 0
    dev.nodetach = 1 if "virtio.nodetach=1" in words else 0
    _ops(dev).reset(cpu, dev)
    add_status(cpu, dev, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    drv = _drivers.get(dev.device_id)
    if drv is None:
        return -ENODEV
    dev.driver = symbol_number(drv)
    add_status(cpu, dev, VIRTIO_CONFIG_S_DRIVER)
    try:
        dev.features = _ops(dev).get_features(cpu, dev) & drv.features
        _features_ok(cpu, dev)
        rc = drv.probe(cpu, dev)
    except VirtioError as e:
        printk(cpu, f"{drv.name}: probe failed: {e}")
        rc = -EIO
    if rc:
        add_status(cpu, dev, VIRTIO_CONFIG_S_FAILED)
        dev.driver = NO_SYMBOL
        return rc
    if not _ops(dev).get_status(cpu, dev) & VIRTIO_CONFIG_S_DRIVER_OK:
        virtio_device_ready(cpu, dev)
    virtio_config_core_enable(cpu, dev)
    return 0


# --- PM -----------------------------------------------------------------------------------

def virtio_device_freeze(cpu: NativeCpu, dev: Ref) -> int:
    """Config changes deferred, FAILED remembered, the driver's freeze (which
    resets the device before it deletes its queues). A freeze that fails
    enables config changes again."""
    drv = driver_of(dev)
    virtio_config_core_disable(cpu, dev)
    dev.failed = 1 if _ops(dev).get_status(cpu, dev) & VIRTIO_CONFIG_S_FAILED else 0
    if drv is not None and drv.freeze is not None:
        rc = drv.freeze(cpu, dev)
        if rc:
            virtio_config_core_enable(cpu, dev)
            return rc
    return 0


def _restore_priv(cpu: NativeCpu, dev: Ref, thaw: bool) -> int:
    """virtio_device_restore_priv: reset, ACKNOWLEDGE (FAILED again if it was),
    DRIVER, the features of before, FEATURES_OK, the driver's restore,
    DRIVER_OK, config changes enabled (a pending one delivered)."""
    drv = driver_of(dev)
    if not dev.regs:
        name = drv.name if drv else "virtio"
        printk(cpu, f"{name}: the device's registers are not mapped; it stays off")
        return -ENODEV
    virtio_reset_device(cpu, dev)
    add_status(cpu, dev, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    if dev.failed:
        add_status(cpu, dev, VIRTIO_CONFIG_S_FAILED)
    if drv is None:
        return 0
    add_status(cpu, dev, VIRTIO_CONFIG_S_DRIVER)
    handler = (drv.thaw or drv.restore) if thaw else drv.restore
    try:
        _features_ok(cpu, dev)
        rc = handler(cpu, dev) if handler is not None else 0
    except VirtioError as e:
        printk(cpu, f"{drv.name}: cannot set the device up again: {e}")
        rc = -EIO
    if rc:
        add_status(cpu, dev, VIRTIO_CONFIG_S_FAILED)
        return rc
    if not _ops(dev).get_status(cpu, dev) & VIRTIO_CONFIG_S_DRIVER_OK:
        virtio_device_ready(cpu, dev)
    virtio_config_core_enable(cpu, dev)
    return 0


def virtio_device_restore(cpu: NativeCpu, dev: Ref) -> int:
    """A new domain: the driver's restore."""
    return _restore_priv(cpu, dev, thaw=False)


def virtio_device_thaw(cpu: NativeCpu, dev: Ref) -> int:
    """The same domain goes on (a checkpoint, a failed suspend): the driver's
    thaw if it has one, else its restore; the device is set up the same way."""
    return _restore_priv(cpu, dev, thaw=True)


# --- queues -------------------------------------------------------------------------------

def vring_interrupt(cpu: NativeCpu, dev: Ref, vq: Ref) -> bool:
    """A queue's interrupt: its callback if the device used something
    (Linux's vring_interrupt). A broken queue (reset, not yet ready) takes
    none, and says so (Linux warns "vring IRQ raised before DRIVER_OK"); a
    deleted one that is not broken is the race the flush prevents."""
    if vq.broken:
        dev.broken_irqs = dev.broken_irqs + 1
        printk(cpu, f"virtio: an interrupt of queue {vq.index} refused on cpu{cpu.vcpu_id}: "
                    "the queue is broken (reset, or not yet DRIVER_OK)")
        return False
    if not vq.present:
        dev.late_callbacks = dev.late_callbacks + 1
        printk(cpu, f"virtio: FAILURE: an interrupt of queue {vq.index} handled after the "
                    "reset deleted the queue (option virtio.nosync: the handlers were not "
                    "flushed)")
    elif not virtio_ring.more_used(cpu, vq):
        return False
    if vq.callback != NO_SYMBOL:
        callback: Callable[[NativeCpu, Ref, Ref], None] = symbol(vq.callback)  # type: ignore
        callback(cpu, dev, vq)
    return True
