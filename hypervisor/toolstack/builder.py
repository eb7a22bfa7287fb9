"""The domain builder (libxenguest's xc_dom_* for an x86-64 PV guest).

Start of day, as Xen's builder leaves it (xen.h "startofday"), all in the
guest's pseudo-physical space from pfn 0 upward:

    kernel image | p2m list | start_info | xenstore ring | console ring |
    bootstrap pagetables | boot stack | free memory ...

The bootstrap pagetables map *all* of the guest's memory at VIRT_BASE
(pfn p at VIRT_BASE + p * 4096) with the pagetable frames themselves read-only,
and the L4 is pinned, so every frame is typed exactly as Xen types it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from hypervisor.core import Hypervisor
from hypervisor.devices.balloon import Balloon, BalloonHost
from hypervisor.devices.virtio.mmio import VirtioDevice, VirtioMmio
from hypervisor.devices.virtio.queue import DomainMemory
from hypervisor.domain import Domain
from hypervisor.evtchn import DOMID_TOOLSTACK
from hypervisor.mm.frames import PageType
from hypervisor.mm.memory import PAGE_SHIFT, PAGE_SIZE
from hypervisor.native import KernelError, NativeKernel
from hypervisor.public.arch_x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
)
from hypervisor.public.io.virtio import VIRTIO_MMIO_WINDOW
from hypervisor.public.native import PVLAB_IMAGE_MAGIC, pvlab_image_header
from hypervisor.public.xen import start_info
from hypervisor.toolstack.config import MAX_CMDLINE, DomainConfig
from hypervisor.toolstack.consoled import ConsoleBackend
from hypervisor.toolstack.elfimage import GuestImage, ImageError, load_image
from hypervisor.toolstack.xenstored import Store

START_INFO_MAGIC = b"xen-3.0-x86_64"
BOOT_STACK_PAGES = 4
HYPERCALL_STUBS = 128
HYPERCALL_IRET = 23


class BuildError(Exception):
    """The domain could not be built; nothing of it is left behind."""


@dataclass
class BootLayout:
    """Where the builder put the start-of-day structures (pfns)."""

    nr_pages: int
    image_pages: int
    p2m_pfn: int
    p2m_pages: int
    start_info_pfn: int
    store_pfn: int
    console_pfn: int
    pt_pfn: int
    pt_pages: int
    stack_pfn: int


def hypercall_page() -> bytes:
    """Xen's 64-bit PV hypercall page: 32-byte stubs, 0xCC-padded."""
    page = bytearray(b"\xcc" * PAGE_SIZE)
    for i in range(HYPERCALL_STUBS):
        if i == HYPERCALL_IRET:
            # push rcx; push r11; push rax; mov $23, %eax; syscall (never returns)
            stub = b"\x51\x41\x53\x50\xb8" + struct.pack("<I", i) + b"\x0f\x05"
        else:
            # push rcx; push r11; mov $i, %eax; syscall; pop r11; pop rcx; ret
            stub = b"\x51\x41\x53\xb8" + struct.pack("<I", i) + b"\x0f\x05\x41\x5b\x59\xc3"
        page[32 * i:32 * i + len(stub)] = stub
    return bytes(page)


def balloon_host(hv: Hypervisor, dom: Domain) -> BalloonHost:
    """What a balloon of ``dom`` is given: the frame table and the M2P, the
    frame release of XENMEM_decrease_reservation, the domain's TLB flush,
    the scheduler's timers."""
    machine = hv.machine
    return BalloonHost(dom.domid, machine.frames, machine.m2p,
                       lambda mfn: hv.reservation.remove_page(dom, mfn),
                       lambda: hv.flush_tlbs(dom), hv.scheduler, lambda: dom.is_running)


def add_balloon(hv: Hypervisor, dom: Domain, stats_interval_ns: int,
                deflate_on_oom: bool = False) -> str:
    """Give ``dom`` a virtio balloon; returns its command line word."""
    return add_virtio_device(hv, dom, Balloon(balloon_host(hv, dom), stats_interval_ns,
                                              deflate_on_oom))


def add_virtio_device(hv: Hypervisor, dom: Domain, device: VirtioDevice,
                      base: int | None = None, port: int | None = None) -> str:
    """Put ``device`` behind a virtio-mmio transport of ``dom``: a register
    page on the bus that the domain may map (its I/O memory permission), an
    event channel for its interrupt. Returns the kernel command line word
    that tells the guest where it is, in Linux's
    virtio_mmio.device=<size>@<base>:<irq> form (the irq being the event
    channel's port). A restore passes the saved base and port: the guest
    knows them from its command line."""
    port = dom.evtchn.alloc_unbound(DOMID_TOOLSTACK) if port is None else \
        dom.evtchn.alloc_unbound_at(port, DOMID_TOOLSTACK)
    if port < 0:
        raise BuildError(f"{dom.name}: no event channel for the {device.name} ({port})")
    dom.evtchn.bind_backend(port, lambda: None)  # the guest notifies through QueueNotify

    def send_event() -> None:
        # a domain that is not running, or has no shared_info yet, takes no event
        if dom.is_running and dom.shared_info is not None:
            dom.evtchn.set_pending(port)

    base = hv.bus.next_base() if base is None else base
    mem = DomainMemory(hv.machine.memory, hv.machine.frames, dom.domid)
    transport = VirtioMmio(device, mem, base, port, send_event)
    hv.iomem_permit(dom, base >> PAGE_SHIFT, 1)
    hv.add_device(dom, base, transport)
    return f"virtio_mmio.device={VIRTIO_MMIO_WINDOW:#x}@{base:#x}:{port}"


def _pt_frames_needed(nr_pages: int) -> tuple[int, int, int]:
    l1 = -(-nr_pages // 512)
    l2 = -(-l1 // 512)
    l3 = 1
    return l1, l2, l3


def build_domain(hv: Hypervisor, cfg: DomainConfig) -> Domain:
    """Create and build a domain from its configuration; the domain is left
    ready to run (vcpu0 at the image's entry), or nothing is left at all."""
    image = load_image(cfg.image)
    nr_pages = cfg.memory * (1 << 20) // PAGE_SIZE
    if nr_pages + 64 > hv.machine.frames.nr_free:
        raise BuildError(f"{cfg.name}: {cfg.memory} MiB wanted but the machine has only "
                         f"{hv.machine.frames.nr_free * PAGE_SIZE >> 20} MiB free")
    max_pages = max(cfg.maxmem, cfg.memory) * (1 << 20) // PAGE_SIZE
    dom = hv.create_domain(cfg.name, max_pages, cfg.vcpus)
    try:
        _build(hv, dom, image, cfg, nr_pages)
    except Exception:
        hv.destroy_domain(dom)
        raise
    return dom


def _build(hv: Hypervisor, dom: Domain, image: GuestImage, cfg: DomainConfig,
           nr_pages: int) -> None:
    machine = hv.machine
    mem = machine.memory
    base = image.virt_base
    if any(s.vaddr < base for s in image.segments):
        raise ImageError(f"{image.path}: a segment lies below VIRT_BASE {base:#x}")

    # pfn -> mfn for all of the guest's memory, from the shuffled allocator
    p2m = np.array(machine.frames.alloc_many(dom.domid, nr_pages), dtype=np.uint64)
    machine.m2p[p2m.astype(np.int64)] = np.arange(nr_pages, dtype=np.uint64)

    def va(pfn: int) -> int:
        return base + (pfn << PAGE_SHIFT)

    def maddr(pfn: int) -> int:
        return int(p2m[pfn]) << PAGE_SHIFT

    # the kernel image
    image_pages = -(-(image.end - base) // PAGE_SIZE)
    for seg in image.segments:
        off = seg.vaddr - base
        for pos in range(0, len(seg.data), PAGE_SIZE):
            chunk = seg.data[pos:pos + PAGE_SIZE]
            pfn = (off + pos) >> PAGE_SHIFT
            mem.write(maddr(pfn) + ((off + pos) & 0xFFF), chunk)
    # an image with a Python kernel carries pvlab's header and notes; a plain PV
    # kernel (x86 code at its ENTRY, as XTF's tests are) has neither
    python_kernel = bool(cfg.kernel) or image.has_python_kernel
    if python_kernel:
        hdr = pvlab_image_header.from_buffer_copy(mem.read(maddr(0), 72))
        if hdr.magic != PVLAB_IMAGE_MAGIC:
            raise ImageError(f"{image.path}: no pvlab image header at VIRT_BASE")

    # start-of-day layout
    p2m_pages = -(-nr_pages * 8 // PAGE_SIZE)
    l1s, l2s, l3s = _pt_frames_needed(nr_pages)
    pt_pages = l1s + l2s + l3s + 1
    lay = BootLayout(nr_pages=nr_pages, image_pages=image_pages,
                     p2m_pfn=image_pages, p2m_pages=p2m_pages,
                     start_info_pfn=image_pages + p2m_pages,
                     store_pfn=image_pages + p2m_pages + 1,
                     console_pfn=image_pages + p2m_pages + 2,
                     pt_pfn=image_pages + p2m_pages + 3, pt_pages=pt_pages,
                     stack_pfn=image_pages + p2m_pages + 3 + pt_pages)
    if lay.stack_pfn + BOOT_STACK_PAGES > nr_pages:
        raise BuildError(f"{cfg.name}: {cfg.memory} MiB is too small for the image")
    dom.layout = lay
    dom.p2m_frames = [int(p2m[lay.p2m_pfn + i]) for i in range(p2m_pages)]
    dom.p2m_size = nr_pages

    # the p2m list the guest reads (start_info.mfn_list)
    p2m_bytes = p2m.tobytes()
    for i in range(p2m_pages):
        mem.write(maddr(lay.p2m_pfn + i), p2m_bytes[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])

    # the hypercall page, where the image's note says
    hpfn = (image.hypercall_page - base) >> PAGE_SHIFT
    mem.write(maddr(hpfn), hypercall_page())

    # bootstrap pagetables: L4, L3, L2s, L1s (in that pfn order)
    l4_pfn = lay.pt_pfn
    l3_pfn = l4_pfn + 1
    l2_pfn = l3_pfn + 1
    l1_pfn = l2_pfn + l2s
    pt_set = range(lay.pt_pfn, lay.pt_pfn + pt_pages)
    rw = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
    pfns = np.arange(nr_pages, dtype=np.uint64)
    l1e = (p2m << np.uint64(PAGE_SHIFT)) | np.uint64(rw)
    l1e[lay.pt_pfn:lay.pt_pfn + pt_pages] &= ~np.uint64(_PAGE_RW | _PAGE_DIRTY)
    # the native text is never executed: entering it must fault (see Vcpu.bind_native)
    if python_kernel:
        text, size = image.native_text
        first = (text - base) >> PAGE_SHIFT
        l1e[first:first + (size >> PAGE_SHIFT)] |= np.uint64(_PAGE_NX)
    for i in range(l1s):
        entries = l1e[i * 512:(i + 1) * 512]
        mem.frame(int(p2m[l1_pfn + i]))[:len(entries)] = entries
    del pfns
    l2_first = (base >> 21) & 511
    l3_first = (base >> 30) & 511
    for i in range(l1s):
        g = l2_first + i  # global L2 slot counted from the L3 slot of VIRT_BASE
        l2 = l2_pfn + g // 512
        mem.frame(int(p2m[l2]))[g % 512] = maddr(l1_pfn + i) | rw
    for i in range(l2s):
        mem.frame(int(p2m[l3_pfn]))[l3_first + i] = maddr(l2_pfn + i) | rw
    mem.frame(int(p2m[l4_pfn]))[(base >> 39) & 511] = maddr(l3_pfn) | rw
    assert l3_first + l2s <= 512, "guest memory does not fit below the top of the address space"
    del pt_set

    # shared_info: a hypervisor-provided page the guest maps itself
    shinfo_mfn = machine.frames.alloc(dom.domid)
    machine.frames.xenheap[shinfo_mfn] = True
    dom.set_shared_info(shinfo_mfn)
    for v in range(32):
        dom.shared_info.vcpu_info[v].evtchn_upcall_mask = 1

    # console and xenstore event channels (interdomain, to the toolstack side)
    console_port = dom.evtchn.alloc_unbound(0)
    store_port = dom.evtchn.alloc_unbound(0)

    si = start_info()
    si.magic = START_INFO_MAGIC
    si.nr_pages = nr_pages
    si.shared_info = shinfo_mfn << PAGE_SHIFT
    si.flags = 0
    si.store_mfn = int(p2m[lay.store_pfn])
    si.store_evtchn = store_port
    si.console.domU.mfn = int(p2m[lay.console_pfn])
    si.console.domU.evtchn = console_port
    si.pt_base = va(lay.pt_pfn)
    # the toolstack's ends: the console daemon and the store (XS_INTRODUCE)
    dom.console_backend = ConsoleBackend(dom, si.console.domU.mfn, console_port)
    if hv.xenstore is None:
        hv.xenstore = Store()
    dom.xenstore = hv.xenstore.introduce(dom, si.store_mfn, store_port)
    si.nr_pt_frames = pt_pages
    si.mfn_list = va(lay.p2m_pfn)
    cmdline = cfg.cmdline
    if cfg.balloon is not None:
        word = add_balloon(hv, dom, cfg.balloon.stats_interval_ns, cfg.balloon.deflate_on_oom)
        cmdline = f"{cmdline} {word}".strip()
        if len(cmdline) > MAX_CMDLINE:
            raise BuildError(f"{cfg.name}: the command line with the balloon's device is "
                             f"longer than {MAX_CMDLINE} characters")
    si.cmd_line = cmdline.encode()
    si.first_p2m_pfn = lay.p2m_pfn
    si.nr_p2m_frames = p2m_pages
    mem.write(maddr(lay.start_info_pfn), bytes(si))

    # type and pin the bootstrap tables, as Xen's builder does (PIN_L4_TABLE)
    l4_mfn = int(p2m[l4_pfn])
    rc = machine.types.get_page_and_type(l4_mfn, PageType.l4, dom.domid)
    if rc:
        raise BuildError(f"{cfg.name}: the bootstrap pagetables do not validate ({rc})")
    machine.frames.pinned[l4_mfn] = True

    # the guest kernel, if it is Python
    dom.image = image
    if python_kernel:
        dom.kernel_module = cfg.kernel or image.kernel_module
        try:
            dom.native = NativeKernel(dom, dom.kernel_module, text, size)
        except KernelError as e:
            raise BuildError(f"{cfg.name}: {e}") from None
        for v in dom.vcpus:
            dom.native.bind(v)

    # vcpu0 at the entry point: rsi = start_info, rsp = top of the boot stack
    v0 = dom.vcpus[0]
    if machine.types.get_page_and_type(l4_mfn, PageType.l4, dom.domid):
        raise BuildError("cannot take the CR3 reference")
    v0.guest_table = l4_mfn
    v0.in_kernel = True
    v0.load_cr3(l4_mfn)
    v0.write_regs(rip=image.entry, rsp=va(lay.stack_pfn + BOOT_STACK_PAGES),
                  rsi=va(lay.start_info_pfn), rflags=0x202)
    v0.online = True
    v0.initialised = True
