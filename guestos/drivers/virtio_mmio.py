"""The virtio-mmio transport, the driver's side (Linux's
drivers/virtio/virtio_mmio.c): it finds the devices, maps their registers,
gives the core (virtio.py) its virtio_config_ops, sets queues up, takes the
interrupt and carries PM to the core.

Devices are found on the command line in Linux's form
``virtio_mmio.device=<size>@<base>:<irq>``; here the irq is the event
channel port the device interrupts through. The register page is I/O memory:
the kernel maps it over a spare page of its linear map (ioremap) with an
update_va_mapping that the hypervisor lets through only because the
toolstack gave the domain that range. A save must find no such mapping in
any pagetable (the tools canonicalise every entry to a pfn, and device
memory has none), so the suspend path unmaps it and maps it again after,
as it does shared_info (the syscore ops below).

The interrupt is bound to cpu0, or to the first cpu of ``irqaffinity=``
(Linux's option of that name), and handled in two halves: the hard half
reads and acknowledges InterruptStatus and notes the queues then present;
the irq thread, after the upcall's yield, hands a config change to the core
and each noted queue to vring_interrupt. Between the two, other vcpus run,
as other CPUs run while a Linux handler is half way: the window in which
the 2011 review saw a reset race the handler (virtio.py's flush closes it).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from guestos.evtchn import NO_IRQ, bind_evtchn_to_irqhandler, rebind_evtchn_irq, run_irq_thread
from guestos.init import device_initcall
from guestos.kdata import driver_data, kernel, set_driver_data
from guestos.layout import Ref
from guestos.mm import PTE_RW, alloc_pages, pfn_to_mfn, va
from guestos.pm import dev_pm_ops, device_register, register_syscore_ops, syscore_ops
from guestos.printk import printk
from guestos.symbols import export, symbol_number
from hypervisor.public.errno import ENODEV
from hypervisor.public.io.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
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
from .virtio import (
    MAX_VQS,
    VirtioError,
    dev_at,
    driver_of,
    register_virtio_device,
    virtio_config_changed,
    virtio_config_ops,
    virtio_device_freeze,
    virtio_device_restore,
    virtio_device_thaw,
    vq_at,
    vring_interrupt,
)
from .virtio_ring import MAX_QUEUE_SIZE

MAX_DEVICES = 8
_DEVICE_RE = re.compile(r"^(\w+)@(\w+):(\d+)(?::(\d+))?$")


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


# --- the core's operations ------------------------------------------------------------

def vm_get_status(cpu: NativeCpu, dev: Ref) -> int:
    return readl(cpu, dev, VIRTIO_MMIO_STATUS) & 0xFF


def vm_set_status(cpu: NativeCpu, dev: Ref, status: int) -> None:
    writel(cpu, dev, VIRTIO_MMIO_STATUS, status)


def vm_reset(cpu: NativeCpu, dev: Ref) -> None:
    """Status 0. The device stops using every queue and clears its
    interrupt status; from here on it touches no ring."""
    writel(cpu, dev, VIRTIO_MMIO_STATUS, 0)


def vm_get_features(cpu: NativeCpu, dev: Ref) -> int:
    offered = 0
    for sel in (1, 0):
        writel(cpu, dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)
        offered |= readl(cpu, dev, VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel)
    return offered


def vm_finalize_features(cpu: NativeCpu, dev: Ref) -> None:
    """Write dev.features (VERSION_1 added: a version 2 device needs it)."""
    if not vm_get_features(cpu, dev) >> VIRTIO_F_VERSION_1 & 1:
        raise VirtioError("New virtio-mmio devices (version 2) must provide "
                          "VIRTIO_F_VERSION_1 feature!")
    dev.features = dev.features | 1 << VIRTIO_F_VERSION_1
    for sel in (1, 0):
        writel(cpu, dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
        writel(cpu, dev, VIRTIO_MMIO_DRIVER_FEATURES, dev.features >> (32 * sel) & 0xFFFFFFFF)


def vm_synchronize_cbs(cpu: NativeCpu, dev: Ref) -> None:
    """Linux's synchronize_irq: no half of the handler is left. A thread the
    hard half woke on some cpu, not yet run, is run here and now (the queues
    are broken, so it calls no vring callback); a hard half is one native
    call, never caught half way."""
    if dev.irq != NO_IRQ and run_irq_thread(cpu, dev.irq):
        dev.flushed = dev.flushed + 1
        printk(cpu, f"virtio-mmio at {dev.base:#x}: reset: finished the interrupt that cpu"
                    f"{dev.irq_cpu} had half handled")


virtio_mmio_config_ops = export(virtio_config_ops(
    vm_get_status, vm_set_status, vm_reset, vm_get_features, vm_finalize_features,
    vm_synchronize_cbs), "guestos.drivers.virtio_mmio.virtio_mmio_config_ops")


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


# --- queues -----------------------------------------------------------------------------

VqCallback = Callable[[NativeCpu, Ref, Ref], None]


def setup_vq(cpu: NativeCpu, dev: Ref, index: int, callback: VqCallback | None) -> Ref:
    """vm_setup_vq: select, check it is free and exists, give it its rings."""
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_SEL, index)
    if readl(cpu, dev, VIRTIO_MMIO_QUEUE_READY):
        raise VirtioError(f"virtio-mmio: queue {index} is already set up")
    num = min(readl(cpu, dev, VIRTIO_MMIO_QUEUE_NUM_MAX), MAX_QUEUE_SIZE)
    if num == 0:
        raise VirtioError(f"virtio-mmio: queue {index} is not available")
    num = 1 << (num.bit_length() - 1)  # a power of two
    vq = vq_at(cpu, dev, index)
    virtio_ring.vring_new(cpu, vq, index, num, 0 if callback is None else symbol_number(callback))
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_NUM, num)
    for (lo, hi), addr in zip(((VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH),
                               (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
                               (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH)),
                              virtio_ring.area_addrs(cpu, vq), strict=True):
        writel(cpu, dev, lo, addr & 0xFFFFFFFF)
        writel(cpu, dev, hi, addr >> 32)
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_READY, 1)
    return vq


def find_vqs(cpu: NativeCpu, dev: Ref, callbacks: list[VqCallback | None]) -> list[Ref]:
    """vm_find_vqs: queues 0..n-1, each with its callback (exported, or None)."""
    if len(callbacks) > MAX_VQS:
        raise VirtioError(f"virtio-mmio: {len(callbacks)} queues, at most {MAX_VQS}")
    vqs = []
    for i, cb in enumerate(callbacks):
        vqs.append(setup_vq(cpu, dev, i, cb))
        dev.nvqs = i + 1
    return vqs


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


def del_vqs(cpu: NativeCpu, dev: Ref) -> None:
    """vm_del_vqs: every queue, once the device is reset."""
    for i in range(dev.nvqs):
        del_vq(cpu, dev, vq_at(cpu, dev, i))
    dev.nvqs = 0


def notify(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    writel(cpu, dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq.index)


# --- the interrupt ----------------------------------------------------------------------

@export
def vm_interrupt(cpu: NativeCpu, irq: int, dev_va: int) -> bool:
    """The hard half: read InterruptStatus and acknowledge it before
    handling, so that a new event is not lost; note the queues present for
    the thread. An event that finds nothing (the device reset, or its
    registers unmapped inside a save) is only counted."""
    dev = dev_at(cpu, dev_va)
    status = readl(cpu, dev, VIRTIO_MMIO_INTERRUPT_STATUS) if dev.regs else 0
    if not status:
        dev.spurious = dev.spurious + 1
        return False
    writel(cpu, dev, VIRTIO_MMIO_INTERRUPT_ACK, status)
    dev.interrupts = dev.interrupts + 1
    dev.isr = dev.isr | status
    if status & VIRTIO_MMIO_INT_VRING:
        dev.vq_signalled = dev.vq_signalled | sum(
            1 << i for i in range(dev.nvqs) if vq_at(cpu, dev, i).present)
    return True


@export
def vm_interrupt_thread(cpu: NativeCpu, irq: int, dev_va: int) -> None:
    """The thread: a config change to the core, each noted queue to
    vring_interrupt (which refuses broken ones)."""
    dev = dev_at(cpu, dev_va)
    status, signalled = dev.isr, dev.vq_signalled
    dev.isr = dev.vq_signalled = 0
    if status & VIRTIO_MMIO_INT_CONFIG:
        virtio_config_changed(cpu, dev)
    for i in range(MAX_VQS):
        if signalled >> i & 1:
            vring_interrupt(cpu, dev, vq_at(cpu, dev, i))


def irq_affinity(cpu: NativeCpu, cmdline: str) -> int:
    """The first cpu of ``irqaffinity=LIST`` that this domain has, else 0."""
    for word in cmdline.split():
        if word.startswith("irqaffinity="):
            for item in word.split("=", 1)[1].split(","):
                first = item.split("-")[0]
                if first.isdigit() and int(first) < kernel(cpu).nr_cpus:
                    return int(first)
    return 0


def request_irq(cpu: NativeCpu, dev: Ref, cmdline: str) -> None:
    dev.irq_cpu = irq_affinity(cpu, cmdline)
    dev.irq = bind_evtchn_to_irqhandler(cpu, dev.port, vm_interrupt, dev_id=dev.va,
                                        on_cpu=dev.irq_cpu, thread=vm_interrupt_thread)


# --- the devices, probed at boot ---------------------------------------------------------

def virtio_mmio_devices(cpu: NativeCpu) -> list[Ref]:
    """Every bound device, in PM registration order: a list through
    ``dev.next`` from the one the transport's driver data names."""
    out, addr = [], driver_data(cpu, virtio_mmio_pm_ops)
    while addr and len(out) < MAX_DEVICES:
        out.append(dev_at(cpu, addr))
        addr = out[-1].next
    return out


def virtio_mmio_device(cpu: NativeCpu, n: int) -> Ref:
    """The n-th device bound (the PM core's instance number)."""
    return virtio_mmio_devices(cpu)[n]


def _add_device(cpu: NativeCpu, dev: Ref) -> int:
    devs = virtio_mmio_devices(cpu)
    if devs:
        devs[-1].next = dev.va
    else:
        set_driver_data(cpu, virtio_mmio_pm_ops, dev.va)
        register_syscore_ops(cpu, virtio_mmio_syscore_ops)
    return len(devs)


@device_initcall
def virtio_mmio_init(cpu: NativeCpu, cmdline: str) -> None:
    """At boot: each virtio_mmio.device= on the command line, mapped,
    checked, its irq bound, and handed to the core, which binds its driver."""
    for _size, base, port in parse_devices(cmdline):
        if len(virtio_mmio_devices(cpu)) >= MAX_DEVICES:
            printk(cpu, f"virtio-mmio at {base:#x}: more than {MAX_DEVICES} devices; ignored")
            continue
        dev = dev_at(cpu, va(alloc_pages(cpu)))
        dev.base, dev.port, dev.irq = base, port, NO_IRQ
        dev.config_ops = symbol_number(virtio_mmio_config_ops)
        try:
            ioremap(cpu, dev)
            if probe_regs(cpu, dev) == 0:
                continue  # a placeholder: ignore it silently
        except VirtioError as e:
            printk(cpu, str(e))
            continue
        request_irq(cpu, dev, cmdline)
        rc = register_virtio_device(cpu, dev, cmdline)
        if rc == -ENODEV:
            printk(cpu, f"virtio-mmio at {base:#x}: device id {dev.device_id}: no driver")
        if rc == 0:
            device_register(cpu, virtio_mmio_pm_ops, _add_device(cpu, dev))


# --- PM: the core's order, and the register mapping at a save ----------------------------

def virtio_mmio_freeze(cpu: NativeCpu, n: int) -> int:
    return virtio_device_freeze(cpu, virtio_mmio_device(cpu, n))


def virtio_mmio_thaw(cpu: NativeCpu, n: int) -> int:
    return virtio_device_thaw(cpu, virtio_mmio_device(cpu, n))


def virtio_mmio_restore(cpu: NativeCpu, n: int) -> int:
    """A new domain: the irq gets its port back first (xen_irq_resume forgot
    every port)."""
    dev = virtio_mmio_device(cpu, n)
    rebind_evtchn_irq(cpu, dev.port, dev.irq)
    return virtio_device_restore(cpu, dev)


virtio_mmio_pm_ops = export(dev_pm_ops(
    "virtio_mmio", freeze=virtio_mmio_freeze, thaw=virtio_mmio_thaw,
    restore=virtio_mmio_restore), "guestos.drivers.virtio_mmio.virtio_mmio_pm_ops")


def virtio_mmio_iounmap(cpu: NativeCpu) -> None:
    """Inside xen_suspend: device memory has no pfn, so no pagetable may map
    it when the tools canonicalise them. A device whose driver planted
    ``balloonbug=keepmap`` forgets to (the save must refuse the image)."""
    for dev in virtio_mmio_devices(cpu):
        if dev.keepmap_bug:
            drv = driver_of(dev)
            printk(cpu, f"{drv.name if drv else 'virtio'}: balloonbug=keepmap: the registers "
                        f"at {dev.base:#x} stay mapped")
            continue
        iounmap(cpu, dev)


def virtio_mmio_ioremap(cpu: NativeCpu) -> None:
    for dev in virtio_mmio_devices(cpu):
        try:
            ioremap(cpu, dev)
        except VirtioError as e:
            printk(cpu, str(e))


virtio_mmio_syscore_ops = export(syscore_ops(virtio_mmio_iounmap, virtio_mmio_ioremap),
                                 "guestos.drivers.virtio_mmio.virtio_mmio_syscore_ops")
