"""The virtio-mmio transport, the driver's side (Linux's
drivers/virtio/virtio_mmio.c with the parts of drivers/virtio/virtio.c that
it leans on: the status handshake, feature negotiation, PM).

Devices are found on the command line in Linux's form
``virtio_mmio.device=<size>@<base>:<irq>``; here the irq is the event
channel port the device interrupts through. The register page is I/O memory:
the kernel maps it over a spare page of its linear map (ioremap) with an
update_va_mapping that the hypervisor lets through only because the
toolstack gave the domain that range. A save must find no such mapping in
any pagetable (the tools canonicalise every entry to a pfn, and device
memory has none), so the suspend path unmaps it and maps it again after,
as it does shared_info.

The device's state as the driver knows it is a VIRTIO_DEV struct at the
start of the driver's state page (guest memory, like all kernel state).
"""

from __future__ import annotations

import re

from guestos.evtchn import IrqHandler, bind_evtchn_to_irqhandler, mask_evtchn, rebind_evtchn_irq
from guestos.layout import Layout, Ref
from guestos.mm import PTE_RW, alloc_pages, pfn_to_mfn, va
from guestos.printk import printk
from hypervisor.public.io.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_VERSION_2,
)
from hypervisor.public.native import NativeCpu
from hypervisor.public.xen import Hypercall

from . import virtio_ring
from .virtio_ring import MAX_QUEUE_SIZE

VIRTIO_DEV = Layout("virtio_dev", [
    ("base", "u64"),          # machine address of the register page
    ("regs", "u64"),          # where the kernel maps it (0: not mapped)
    ("regs_pfn", "u64"),      # the linear-map page whose slot the mapping takes
    ("port", "u64"),          # the event channel of its interrupt
    ("irq", "u64"),           #   and the irq it is bound to
    ("device_id", "u64"),
    ("features", "u64"),      # negotiated
    ("irq_enabled", "u64"),   # 0: the handler leaves the device alone (frozen, reset)
    ("config_enabled", "u64"),  # virtio_config_core_enable/disable
    ("config_pending", "u64"),  # a config change came while disabled
    ("interrupts", "u64"),
    ("spurious", "u64"),      # events that found the device reset or frozen
])
VQ_OFFSET = 256
VQ_STRIDE = 128
assert VIRTIO_DEV.size <= VQ_OFFSET and virtio_ring.VQ.size <= VQ_STRIDE

_DEVICE_RE = re.compile(r"^(\w+)@(\w+):(\d+)(?::(\d+))?$")


class VirtioError(Exception):
    """The device cannot be driven; the message says why (not fatal to the kernel)."""


def memparse(text: str) -> int:
    """Linux's memparse: a number with an optional K, M or G."""
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1].lower(), 1)
    return int(text[:-1] if mult > 1 else text, 0) * mult


def parse_devices(cmdline: str) -> list[tuple[int, int, int]]:
    """(size, base, port) of each virtio_mmio.device= word; bad ones are skipped."""
    out = []
    for word in cmdline.split():
        if word.startswith("virtio_mmio.device="):
            m = _DEVICE_RE.match(word.split("=", 1)[1])
            if m:
                try:
                    out.append((memparse(m.group(1)), int(m.group(2), 0), int(m.group(3))))
                except ValueError:
                    pass
    return out


def dev_at(cpu: NativeCpu, state_va: int) -> Ref:
    return VIRTIO_DEV.at(cpu, state_va)


def vq_at(cpu: NativeCpu, state_va: int, index: int) -> Ref:
    return virtio_ring.VQ.at(cpu, state_va + VQ_OFFSET + index * VQ_STRIDE)


# --- the register page ------------------------------------------------------------------

def ioremap(cpu: NativeCpu, dev: Ref) -> None:
    if not dev.regs_pfn:
        dev.regs_pfn = alloc_pages(cpu)
    rc = cpu.hypercall(Hypercall.update_va_mapping, va(dev.regs_pfn), dev.base | PTE_RW, 0)
    if rc:
        raise VirtioError(f"virtio-mmio: cannot map the registers at {dev.base:#x}: error {rc} "
                          "(has the domain access to that I/O memory?)")
    dev.regs = va(dev.regs_pfn)


def iounmap(cpu: NativeCpu, dev: Ref) -> None:
    """Give the page its own frame back (the mapping of device memory goes)."""
    if not dev.regs:
        return
    own = pfn_to_mfn(cpu, dev.regs_pfn)
    cpu.hypercall(Hypercall.update_va_mapping, va(dev.regs_pfn), (own << 12) | PTE_RW, 0)
    dev.regs = 0


def readl(cpu: NativeCpu, dev: Ref, off: int) -> int:
    return cpu.readl(dev.regs + off)


def writel(cpu: NativeCpu, dev: Ref, off: int, value: int) -> None:
    cpu.writel(dev.regs + off, value)


def config_read(cpu: NativeCpu, dev: Ref, off: int, size: int = 4) -> int:
    """A config field, read until the generation holds still: the device may
    change the config between two reads of a field wider than one access."""
    while True:
        before = readl(cpu, dev, VIRTIO_MMIO_CONFIG_GENERATION)
        value = cpu.readl(dev.regs + VIRTIO_MMIO_CONFIG + off, size)
        if readl(cpu, dev, VIRTIO_MMIO_CONFIG_GENERATION) == before:
            return value


def config_write(cpu: NativeCpu, dev: Ref, off: int, value: int, size: int = 4) -> None:
    cpu.writel(dev.regs + VIRTIO_MMIO_CONFIG + off, value, size)


# --- status and features ----------------------------------------------------------------

def get_status(cpu: NativeCpu, dev: Ref) -> int:
    return readl(cpu, dev, VIRTIO_MMIO_STATUS) & 0xFF


def add_status(cpu: NativeCpu, dev: Ref, bits: int) -> None:
    writel(cpu, dev, VIRTIO_MMIO_STATUS, get_status(cpu, dev) | bits)


def reset(cpu: NativeCpu, dev: Ref) -> None:
    """vm_reset: status 0. The device stops using every queue and clears its
    interrupt status; from here on it touches no ring."""
    writel(cpu, dev, VIRTIO_MMIO_STATUS, 0)


def probe_regs(cpu: NativeCpu, dev: Ref) -> int:
    """virtio_mmio_probe: magic and version; returns the device id (0: none)."""
    magic = readl(cpu, dev, VIRTIO_MMIO_MAGIC_VALUE)
    if magic != VIRTIO_MMIO_MAGIC:
        raise VirtioError(f"virtio-mmio at {dev.base:#x}: wrong magic value {magic:#x}")
    version = readl(cpu, dev, VIRTIO_MMIO_VERSION)
    if version != VIRTIO_MMIO_VERSION_2:
        raise VirtioError(f"virtio-mmio at {dev.base:#x}: Version {version} not supported!")
    dev.device_id = readl(cpu, dev, VIRTIO_MMIO_DEVICE_ID)
    return dev.device_id


def negotiate(cpu: NativeCpu, dev: Ref, known: int) -> int:
    """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK read back (Linux's
    virtio_dev_probe / virtio_device_restore_priv). Returns the features, or
    raises VirtioError with the device left FAILED."""
    reset(cpu, dev)
    add_status(cpu, dev, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    add_status(cpu, dev, VIRTIO_CONFIG_S_DRIVER)
    offered = 0
    for sel in (1, 0):
        writel(cpu, dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)
        offered |= readl(cpu, dev, VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel)
    if not offered >> VIRTIO_F_VERSION_1 & 1:
        add_status(cpu, dev, VIRTIO_CONFIG_S_FAILED)
        raise VirtioError("New virtio-mmio devices (version 2) must provide "
                          "VIRTIO_F_VERSION_1 feature!")
    features = offered & (known | 1 << VIRTIO_F_VERSION_1)
    for sel in (1, 0):
        writel(cpu, dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
        writel(cpu, dev, VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)
    add_status(cpu, dev, VIRTIO_CONFIG_S_FEATURES_OK)
    if not get_status(cpu, dev) & VIRTIO_CONFIG_S_FEATURES_OK:
        add_status(cpu, dev, VIRTIO_CONFIG_S_FAILED)
        raise VirtioError("virtio: device refuses features")
    dev.features = features
    return features


def device_ready(cpu: NativeCpu, dev: Ref) -> None:
    add_status(cpu, dev, VIRTIO_CONFIG_S_DRIVER_OK)


def has_feature(dev: Ref, bit: int) -> bool:
    return bool(dev.features >> bit & 1)


# --- queues -----------------------------------------------------------------------------

def setup_vq(cpu: NativeCpu, dev: Ref, vq: Ref, index: int) -> None:
    """vm_setup_vq: select, check it is free and exists, give it its rings."""
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_SEL, index)
    if readl(cpu, dev, VIRTIO_MMIO_QUEUE_READY):
        raise VirtioError(f"virtio-mmio: queue {index} is already set up")
    num = min(readl(cpu, dev, VIRTIO_MMIO_QUEUE_NUM_MAX), MAX_QUEUE_SIZE)
    if num == 0:
        raise VirtioError(f"virtio-mmio: queue {index} is not available")
    num = 1 << (num.bit_length() - 1)  # a power of two
    virtio_ring.vring_new(cpu, vq, index, num)
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_NUM, num)
    for (lo, hi), addr in zip(((VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH),
                               (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
                               (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH)),
                              virtio_ring.area_addrs(cpu, vq), strict=True):
        writel(cpu, dev, lo, addr & 0xFFFFFFFF)
        writel(cpu, dev, hi, addr >> 32)
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_READY, 1)


def del_vq(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    """vm_del_vq: stop the queue, then free its rings (after a reset the
    device no longer touches them)."""
    if not vq.present:
        return
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_SEL, vq.index)
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_READY, 0)
    if readl(cpu, dev, VIRTIO_MMIO_QUEUE_READY):
        printk(cpu, f"virtio-mmio: queue {vq.index} still ready after it was stopped")
    virtio_ring.vring_del(cpu, vq)


def notify(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq.index)


# --- the interrupt ----------------------------------------------------------------------

def request_irq(cpu: NativeCpu, dev: Ref, handler: IrqHandler) -> None:
    """At probe: the device's port runs ``handler`` on cpu0, with the
    driver's state page as dev_id."""
    dev.irq = bind_evtchn_to_irqhandler(cpu, dev.port, handler, dev_id=dev.va)
    dev.irq_enabled = 1


def enable_irq(cpu: NativeCpu, dev: Ref) -> None:
    """Again after a freeze; in a new domain the irq gets its port back."""
    dev.irq_enabled = 1
    rebind_evtchn_irq(cpu, dev.port, dev.irq)


def disable_irq(cpu: NativeCpu, dev: Ref) -> None:
    """Mask the port and let the handler ignore the device. No handler can be
    half way through: a handler is one native call, which runs to its end
    before any other VCPU runs (what synchronize_irq waits for in Linux)."""
    mask_evtchn(cpu, dev.port)
    dev.irq_enabled = 0


def ack_interrupt(cpu: NativeCpu, dev: Ref) -> int:
    """vm_interrupt's first half: read InterruptStatus and acknowledge it
    before handling, so that a new event is not lost."""
    status = readl(cpu, dev, VIRTIO_MMIO_INTERRUPT_STATUS)
    if status:
        writel(cpu, dev, VIRTIO_MMIO_INTERRUPT_ACK, status)
    return status

