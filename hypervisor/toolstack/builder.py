"""The domain builder (libxenguest's xc_dom_* for an x86-64 PV guest).

Start of day, as Xen's builder leaves it (xen.h "startofday"), all in the
guest's pseudo-physical space from pfn 0 upward:

    kernel image | p2m list | start_info | xenstore ring | console ring |
    bootstrap pagetables | boot stack | free memory ...

The bootstrap pagetables map *all* of the guest's memory at VIRT_BASE
(pfn p at VIRT_BASE + p * 4096) with the pagetable frames themselves read-only,
and the L4 is pinned, so every frame is typed exactly as Xen types it.

The stages are libxc's (xc_dom_core.c, xc_dom_x86.c, xc_dom_boot.c), each a
function of that name working on a DomImage (struct xc_dom_image):
parse_image, meminit (allocate the memory), kernel_load, alloc_layout (the
start-of-day pfns), setup_p2m_list, setup_hypercall_page, setup_pgtables
(boot pagetables), shared_info_x86_64, start_info_x86_64, bootlate (pin the
L4), load the Python kernel, vcpu_x86_64 (vcpu setup).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor, KernelError
from hypervisor.public.arch_x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    L1_PAGETABLE_ENTRIES,
    X86_EFLAGS_IF,
    X86_EFLAGS_MBS,
    VGCF_in_kernel,
    VGCF_online,
    table_offset,
    vcpu_guest_context,
)
from hypervisor.public.elfnote import XenElfNote
from hypervisor.public.io.virtio import VIRTIO_MMIO_WINDOW
from hypervisor.public.native import PVLAB_IMAGE_MAGIC, pvlab_image_header
from hypervisor.public.xen import (
    PAGE_SHIFT,
    PAGE_SIZE,
    XEN_LEGACY_MAX_VCPUS,
    Hypercall,
    start_info,
)
from hypervisor.toolstack.config import MAX_CMDLINE, DomainConfig
from hypervisor.toolstack.consoled import ConsoleBackend
from hypervisor.toolstack.context import context_of, domain_of
from hypervisor.toolstack.elfimage import GuestImage, ImageError, load_image
from hypervisor.toolstack.savefile import DEVICE_CONFIG_KEYS

START_INFO_MAGIC = b"xen-3.0-x86_64"
BOOT_STACK_PAGES = 4
HYPERCALL_STUB_SIZE = 32  # the hypercall page: hypercall i's stub at 32 * i
SLACK_PAGES = 64          # beside the guest's memory: shared_info, device pages
DOMID_TOOLSTACK = 0       # the other end of the console and store channels
HYPERVISOR_OVERHEAD_MIB = 8
L1_RW = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY


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


@dataclass
class DomImage:
    """What the builder knows of the domain it builds (libxc's xc_dom_image)."""

    hv: Hypervisor
    dom: Domain
    cfg: DomainConfig
    image: GuestImage
    python_kernel: bool
    p2m: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    lay: BootLayout | None = None

    def va(self, pfn: int) -> int:
        return self.image.virt_base + (pfn << PAGE_SHIFT)

    def mfn(self, pfn: int) -> int:
        return int(self.p2m[pfn])


def machine_mib_for(memory_mib: int) -> int:
    """Machine memory for one guest alone: its RAM, the M2P, the hypervisor's frames."""
    return memory_mib + HYPERVISOR_OVERHEAD_MIB + memory_mib // 64


def hypercall_page() -> bytes:
    """Xen's 64-bit PV hypercall page: 32-byte stubs, 0xCC-padded."""
    page = bytearray(b"\xcc" * PAGE_SIZE)
    for i in range(PAGE_SIZE // HYPERCALL_STUB_SIZE):
        if i == Hypercall.iret:
            # push rcx; push r11; push rax; mov $23, %eax; syscall (never returns)
            stub = b"\x51\x41\x53\x50\xb8" + struct.pack("<I", i) + b"\x0f\x05"
        else:
            # push rcx; push r11; mov $i, %eax; syscall; pop r11; pop rcx; ret
            stub = b"\x51\x41\x53\xb8" + struct.pack("<I", i) + b"\x0f\x05\x41\x5b\x59\xc3"
        at = HYPERCALL_STUB_SIZE * i
        page[at:at + len(stub)] = stub
    return bytes(page)


def add_device(hv: Hypervisor, dom: Domain, state: dict, base: int | None = None,
               port: int | None = None) -> tuple[Any, str]:
    """Give ``dom`` a virtio-mmio device of the kind ``state["kind"]`` names,
    made as ``state`` (its configuration, or the entry an image carries)
    describes: a register page on the bus that the domain may map (its I/O
    memory permission), an event channel for its interrupt. Returns the
    device and the kernel command line word that tells the guest where it
    is, in Linux's virtio_mmio.device=<size>@<base>:<irq> form (the irq
    being the event channel's port). A restore passes the saved base and
    port (the guest knows them from its command line)."""
    port = domctl.evtchn_alloc_unbound(dom, DOMID_TOOLSTACK, port)
    if port < 0:
        raise BuildError(f"{dom.name}: no event channel for the {state.get('kind')} ({port})")
    domctl.evtchn_bind_backend(dom, port, lambda: None)  # the guest notifies through QueueNotify
    base = domctl.next_mmio_base(hv) if base is None else base
    device = domctl.add_virtio(hv, dom, state, base, port)
    _record_place(hv, dom, base)
    return device, f"virtio_mmio.device={VIRTIO_MMIO_WINDOW:#x}@{base:#x}:{port}"


def _record_place(hv: Hypervisor, dom: Domain, base: int) -> None:
    """Where the new device is, kept as libxl keeps a domain's configuration:
    a live save names it in the config it writes while the device runs."""
    place = domctl.device_place(dom, base)
    context_of(hv).domain(dom).devices.append({k: place[k] for k in DEVICE_CONFIG_KEYS})


def build_domain(hv: Hypervisor, cfg: DomainConfig) -> Domain:
    """Create and build a domain from its configuration; the domain is left
    ready to run (vcpu0 at the image's entry), or nothing is left at all."""
    image = load_image(cfg.image)
    python_kernel = parse_image(image, cfg)
    nr_pages = cfg.memory * (1 << 20) // PAGE_SIZE
    free = domctl.physinfo(hv).free_pages
    if nr_pages + SLACK_PAGES > free:
        raise BuildError(f"{cfg.name}: {cfg.memory} MiB wanted but the machine has only "
                         f"{free * PAGE_SIZE >> 20} MiB free")
    max_pages = max(cfg.maxmem, cfg.memory) * (1 << 20) // PAGE_SIZE
    dom = domctl.createdomain(hv, cfg.name, cfg.vcpus, max_pages)
    try:
        xc_dom_build(DomImage(hv, dom, cfg, image, python_kernel), nr_pages)
    except Exception:
        domctl.destroydomain(hv, dom)
        raise
    return dom


def xc_dom_build(xd: DomImage, nr_pages: int) -> None:
    """The stages, in the order their frames are allocated: keep it (the
    shuffled allocator makes the mfns depend on it)."""
    meminit(xd, nr_pages)
    kernel_load(xd)
    alloc_layout(xd)
    setup_p2m_list(xd)
    setup_hypercall_page(xd)
    setup_pgtables(xd)
    shared_info_x86_64(xd)
    start_info_x86_64(xd)
    bootlate(xd)
    domain_of(xd.hv, xd.dom).image = xd.image  # its symbols, for the tracer
    if xd.python_kernel:
        text, size = xd.image.native_text
        module = xd.cfg.kernel or xd.image.kernel_module
        try:
            domctl.load_kernel(xd.dom, module, text, size)
        except KernelError as e:
            raise BuildError(f"{xd.cfg.name}: {e}") from None
        why = domctl.kernel_cmdline_error(xd.dom, xd.cfg.cmdline)
        if why:
            raise BuildError(f"{xd.cfg.name}: {why}")
    vcpu_x86_64(xd)


# --- the image and the memory -----------------------------------------------------------

def parse_image(image: GuestImage, cfg: DomainConfig) -> bool:
    """xc_dom_parse_image: the image's segments lie at or above VIRT_BASE; one
    with a Python kernel starts with pvlab's header (a plain PV kernel, x86
    code at its ENTRY as XTF's tests are, has neither header nor notes).
    Returns whether the kernel is Python."""
    base = image.virt_base
    if any(s.vaddr < base for s in image.segments):
        raise ImageError(f"{image.path}: a segment lies below VIRT_BASE {base:#x}")
    kstart = min(s.vaddr for s in image.segments)
    if not kstart <= image.entry <= image.end:  # libelf's elf_xen_addr_calc_check
        raise ImageError(f"{image.path}: ELF start or entries are out of bounds (entry "
                         f"{image.entry:#x}, image {kstart:#x}-{image.end:#x})")
    python_kernel = bool(cfg.kernel) or image.has_python_kernel
    if python_kernel:
        first = next((s.data for s in image.segments if s.vaddr == base), b"")
        size = ctypes.sizeof(pvlab_image_header)
        raw = bytes(first[:size]).ljust(size, b"\0")
        if pvlab_image_header.from_buffer_copy(raw).magic != PVLAB_IMAGE_MAGIC:
            raise ImageError(f"{image.path}: no pvlab image header at VIRT_BASE")
    return python_kernel


def meminit(xd: DomImage, nr_pages: int) -> None:
    """arch_setup_meminit: pfn -> mfn for all of the guest's memory, from the
    shuffled heap; the M2P learns the map."""
    mfns = domctl.populate_physmap(xd.hv, xd.dom, nr_pages)
    xd.p2m = mfns.astype(np.uint64)
    domctl.mmu_machphys_update(xd.hv, xd.dom, mfns, np.arange(nr_pages))


def _write_phys(xd: DomImage, offset: int, data: bytes) -> None:
    """Copy ``data`` to guest-physical ``offset``, a frame at a time."""
    pos = 0
    while pos < len(data):
        pfn, off = divmod(offset + pos, PAGE_SIZE)
        n = min(PAGE_SIZE - off, len(data) - pos)
        page = domctl.map_foreign_range(xd.hv, xd.dom, xd.mfn(pfn))
        page[off:off + n] = np.frombuffer(data, dtype=np.uint8, count=n, offset=pos)
        pos += n


def kernel_load(xd: DomImage) -> None:
    """xc_dom_load_elf_kernel: each segment at its place above VIRT_BASE."""
    for seg in xd.image.segments:
        _write_phys(xd, seg.vaddr - xd.image.virt_base, bytes(seg.data))


def _pt_frames_needed(nr_pages: int) -> tuple[int, int, int]:
    l1 = -(-nr_pages // L1_PAGETABLE_ENTRIES)
    l2 = -(-l1 // L1_PAGETABLE_ENTRIES)
    l3 = 1
    return l1, l2, l3


def alloc_layout(xd: DomImage) -> None:
    """The start-of-day pfns after the image: p2m list, start_info, store and
    console rings, bootstrap pagetables (L4, L3, L2s, L1s), boot stack."""
    nr_pages = xd.p2m.size
    image_pages = -(-(xd.image.end - xd.image.virt_base) // PAGE_SIZE)
    p2m_pages = -(-nr_pages // L1_PAGETABLE_ENTRIES)  # a u64 per pfn, 512 a frame
    pt_pages = sum(_pt_frames_needed(nr_pages)) + 1
    si = image_pages + p2m_pages
    xd.lay = BootLayout(nr_pages=nr_pages, image_pages=image_pages,
                        p2m_pfn=image_pages, p2m_pages=p2m_pages, start_info_pfn=si,
                        store_pfn=si + 1, console_pfn=si + 2, pt_pfn=si + 3,
                        pt_pages=pt_pages, stack_pfn=si + 3 + pt_pages)
    if xd.lay.stack_pfn + BOOT_STACK_PAGES > nr_pages:
        raise BuildError(f"{xd.cfg.name}: {xd.cfg.memory} MiB is too small for the image")


def setup_p2m_list(xd: DomImage) -> None:
    """The p2m list the guest reads (start_info.mfn_list), in its own frames."""
    lay = xd.lay
    assert lay is not None
    frames = xd.p2m[lay.p2m_pfn:lay.p2m_pfn + lay.p2m_pages].astype(np.int64)
    flat = np.zeros(lay.p2m_pages * L1_PAGETABLE_ENTRIES, dtype=np.uint64)
    flat[:xd.p2m.size] = xd.p2m
    domctl.map_foreign_bulk(xd.hv, xd.dom, frames)[:] = flat.reshape(-1, L1_PAGETABLE_ENTRIES)
    # where the p2m list is, for the frame audit
    tdom = domain_of(xd.hv, xd.dom)
    tdom.p2m_frames = frames.tolist()
    tdom.p2m_size = int(xd.p2m.size)


def setup_hypercall_page(xd: DomImage) -> None:
    """The hypercall page, where the image's XEN_ELFNOTE_HYPERCALL_PAGE says;
    none without the note (xc_dom_build_image)."""
    if XenElfNote.HYPERCALL_PAGE not in xd.image.xen_notes:
        return
    pfn = (xd.image.hypercall_page - xd.image.virt_base) >> PAGE_SHIFT
    _write_phys(xd, pfn << PAGE_SHIFT, hypercall_page())


def setup_pgtables(xd: DomImage) -> None:
    """setup_pgtables_x86_64: all guest memory mapped at VIRT_BASE, the
    pagetable frames themselves read-only, the native text no-execute
    (entering it must fault: see Vcpu.bind_native)."""
    lay = xd.lay
    assert lay is not None
    base = xd.image.virt_base
    l1s, l2s, _ = _pt_frames_needed(lay.nr_pages)
    l4_pfn = lay.pt_pfn
    l3_pfn, l2_pfn, l1_pfn = l4_pfn + 1, l4_pfn + 2, l4_pfn + 2 + l2s
    l1e = (xd.p2m << np.uint64(PAGE_SHIFT)) | np.uint64(L1_RW)
    l1e[lay.pt_pfn:lay.pt_pfn + lay.pt_pages] &= ~np.uint64(_PAGE_RW | _PAGE_DIRTY)
    if xd.python_kernel:
        text, size = xd.image.native_text
        first = (text - base) >> PAGE_SHIFT
        l1e[first:first + (size >> PAGE_SHIFT)] |= np.uint64(_PAGE_NX)
    l1 = domctl.map_foreign_bulk(xd.hv, xd.dom, xd.p2m[l1_pfn:l1_pfn + l1s].astype(np.int64))
    for i in range(l1s):
        entries = l1e[i * L1_PAGETABLE_ENTRIES:(i + 1) * L1_PAGETABLE_ENTRIES]
        l1[i][:len(entries)] = entries
    n = L1_PAGETABLE_ENTRIES
    l2_first, l3_first = table_offset(base, 2), table_offset(base, 3)
    assert l3_first + l2s <= n, "guest memory does not fit below the top of the address space"
    for i in range(l1s):
        g = l2_first + i  # global L2 slot counted from the L3 slot of VIRT_BASE
        _set_entry(xd, l2_pfn + g // n, g % n, l1_pfn + i)
    for i in range(l2s):
        _set_entry(xd, l3_pfn, l3_first + i, l2_pfn + i)
    _set_entry(xd, l4_pfn, table_offset(base, 4), l3_pfn)


def _set_entry(xd: DomImage, table_pfn: int, slot: int, target_pfn: int) -> None:
    table = domctl.map_foreign_bulk(xd.hv, xd.dom, [xd.mfn(table_pfn)])[0]
    table[slot] = (xd.mfn(target_pfn) << PAGE_SHIFT) | L1_RW


# --- start of day -----------------------------------------------------------------------

def shared_info_x86_64(xd: DomImage) -> None:
    """shared_info: a hypervisor page the guest maps itself; every VCPU's
    upcalls masked until the guest registers its callback."""
    domctl.alloc_shared_info(xd.hv, xd.dom)
    shinfo = domctl.map_shared_info(xd.hv, xd.dom)
    for v in range(XEN_LEGACY_MAX_VCPUS):
        shinfo.vcpu_info[v].evtchn_upcall_mask = 1


def start_info_x86_64(xd: DomImage) -> None:
    """start_info, and the toolstack's ends of the console and store rings
    (interdomain event channels to the toolstack's side; XS_INTRODUCE)."""
    hv, dom, lay = xd.hv, xd.dom, xd.lay
    assert lay is not None
    console_port = domctl.evtchn_alloc_unbound(dom, DOMID_TOOLSTACK)
    store_port = domctl.evtchn_alloc_unbound(dom, DOMID_TOOLSTACK)
    si = domctl.map_struct(hv, dom, xd.mfn(lay.start_info_pfn), start_info)
    si.magic = START_INFO_MAGIC
    si.nr_pages = lay.nr_pages
    si.shared_info = domctl.shared_info_frame(dom) << PAGE_SHIFT
    si.flags = 0
    si.store_mfn = xd.mfn(lay.store_pfn)
    si.store_evtchn = store_port
    si.console.domU.mfn = xd.mfn(lay.console_pfn)
    si.console.domU.evtchn = console_port
    si.pt_base = xd.va(lay.pt_pfn)
    ctx = context_of(hv)
    tdom = ctx.domain(dom)
    tdom.console = ConsoleBackend(hv, dom, si.console.domU.mfn, console_port)
    tdom.xenstore = ctx.xenstore().introduce_domain(hv, dom, si.store_mfn, store_port)
    si.nr_pt_frames = lay.pt_pages
    si.mfn_list = xd.va(lay.p2m_pfn)
    si.cmd_line = _cmdline(xd).encode()
    si.first_p2m_pfn = lay.p2m_pfn
    si.nr_p2m_frames = lay.p2m_pages


def _cmdline(xd: DomImage) -> str:
    """The configuration's command line, with a virtio_mmio.device= word for
    each device it asks for (each made here, in order)."""
    cfg = xd.cfg
    words = [cfg.cmdline] if cfg.cmdline else []
    for state in cfg.device_states():
        try:
            words.append(add_device(xd.hv, xd.dom, state)[1])
        except (ValueError, OSError) as e:
            raise BuildError(f"{cfg.name}: the {state['kind']} device: {e}") from None
    cmdline = " ".join(words)
    if len(cmdline) > MAX_CMDLINE:
        raise BuildError(f"{cfg.name}: the command line with the devices' words is "
                         f"longer than {MAX_CMDLINE} characters")
    return cmdline


def bootlate(xd: DomImage) -> None:
    """arch_setup_bootlate: pin the bootstrap L4 (MMUEXT_PIN_L4_TABLE), which
    types and validates every table under it."""
    assert xd.lay is not None
    rc = domctl.mmuext_pin_table(xd.hv, xd.dom, xd.mfn(xd.lay.pt_pfn), 4)
    if rc:
        raise BuildError(f"{xd.cfg.name}: the bootstrap pagetables do not validate ({rc})")


def vcpu_x86_64(xd: DomImage) -> None:
    """vcpu0 at the entry point, in kernel mode, interrupts on: rsi =
    start_info, rsp = top of the boot stack, CR3 the bootstrap L4
    (setvcpucontext, as xc_dom_boot_image does)."""
    lay = xd.lay
    assert lay is not None
    ctx = vcpu_guest_context()
    ctx.flags = VGCF_in_kernel | VGCF_online
    ctx.user_regs.rip = xd.image.entry
    ctx.user_regs.rsp = xd.va(lay.stack_pfn + BOOT_STACK_PAGES)
    ctx.user_regs.rsi = xd.va(lay.start_info_pfn)
    ctx.user_regs.rflags = X86_EFLAGS_IF | X86_EFLAGS_MBS
    ctx.ctrlreg[3] = xd.mfn(lay.pt_pfn) << PAGE_SHIFT
    if domctl.setvcpucontext(xd.dom, 0, ctx):
        raise BuildError(f"{xd.cfg.name}: vcpu0's context is refused: cannot take the CR3 "
                         "reference")
