"""The control interface: all the toolstack may ask of the hypervisor, as libxc
sees Xen (tools/libs/ctrl/): domctls (XEN_DOMCTL_createdomain, max_mem,
getpageframeinfo3, getvcpucontext, setvcpucontext, pausedomain, resumedomain,
iomem_permission, ...), sysctls (physinfo), privileged hypercalls on a foreign
domain (memory_op populate_physmap, mmu_update MMU_MACHPHYS_UPDATE, mmuext_op
pin), event channels for backends, and foreign mappings of a domain's frames
(xc_map_foreign_bulk).

The toolstack (hypervisor/toolstack/) imports nothing else of the hypervisor
but hypervisor/public/, and this module imports nothing of the toolstack. The
toolstack holds two handles: the machine (``Hypervisor``, libxc's
xc_interface) and a domain (``Domain``, where libxc passes a domid). Of a
domain it reads only the descriptive fields xc_domain_getinfo would give:
name, domid, max_pages, tot_pages, is_running, shutdown_reason, crash_report
and console_out (what the domain wrote to its console); of the machine, its
seed. It keeps its own
state itself (hypervisor/toolstack/context.py, as libxl keeps its
libxl_ctx): the xenstore, each domain's xenstore connection, console backend
and console sink, its image, and where its p2m list is; the hypervisor's
objects hold none of it. It learns of the machine's events through the global
VIRQs it binds here: VIRQ_DOM_EXC when a domain is destroyed (it releases its
xenstore connection itself), VIRQ_CON_RING for console output; and it passes
the p2m lists it recorded to ``audit``. Every change to a domain goes through
the calls below; live migration's rounds read what a domain wrote with
shadow_op (log-dirty).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from unicorn import UC_HOOK_CODE, UcError
from unicorn.x86_const import UC_X86_REG_CR2

from hypervisor import debugger
from hypervisor.core import Hypervisor
from hypervisor.cpu.context import get_context, set_context
from hypervisor.cpu.vcpu import RAX
from hypervisor.devices import kinds
from hypervisor.devices.balloon import POSTCOPY_POLICIES, Balloon, BalloonError, BalloonHost
from hypervisor.devices.balloon import persist as balloon_persist
from hypervisor.devices.blk import QUEUE_SIZE as BLK_QUEUE_SIZE
from hypervisor.devices.blk import Block
from hypervisor.devices.blk import check_queue_size as blk_check_queue_size
from hypervisor.devices.blk import persist as blk_persist
from hypervisor.devices.console import Console
from hypervisor.devices.console import persist as console_persist
from hypervisor.devices.net import backend as net_backend
from hypervisor.devices.net import persist as net_persist
from hypervisor.devices.virtio.inject import Injector, Throw
from hypervisor.devices.virtio.mmio import VirtioDevice, VirtioMmio
from hypervisor.devices.virtio.queue import DomainMemory
from hypervisor.domain import SHUTDOWN_NAMES, Domain
from hypervisor.hypercalls.version import XEN_MAJOR, XEN_MINOR
from hypervisor.mm.audit import audit as _audit
from hypervisor.mm.frames import OutOfMemory, PageType
from hypervisor.mm.pagetable import LEVEL_TYPE
from hypervisor.mm.walker import GuestFault
from hypervisor.native import KernelError, NativeKernel
from hypervisor.public.arch_x86 import VGCF_online, vcpu_guest_context
from hypervisor.public.domctl import (
    PFINFO_LPINTAB,
    PFINFO_LTAB_SHIFT,
    PFINFO_NOTAB,
    PFINFO_XTAB,
    XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY,
    XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL,
    XEN_DOMCTL_SHADOW_OP_CLEAN,
    XEN_DOMCTL_SHADOW_OP_ENABLE,
    XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
    XEN_DOMCTL_SHADOW_OP_OFF,
    XEN_DOMCTL_SHADOW_OP_PEEK,
    xen_domctl_shadow_op,
)
from hypervisor.public.errno import EBUSY, EEXIST, EINVAL, EPERM
from hypervisor.public.vcpu import RUNSTATE_running
from hypervisor.public.xen import PAGE_SHIFT, PAGE_SIZE, VIRQ_CON_RING, VIRQ_DOM_EXC, shared_info
from hypervisor.scheduler import CLOCKS, next_wake
from hypervisor.xentrace import TraceBuffer, TraceRecord

ENTRIES_PER_TABLE = PAGE_SIZE // 8


class DomctlError(Exception):
    """A control operation refused, with Xen's errno."""

    def __init__(self, errno: int, why: str) -> None:
        super().__init__(why)
        self.errno = errno


# --- domains ------------------------------------------------------------------------

def createdomain(hv: Hypervisor, name: str, max_vcpus: int, max_pages: int) -> Domain:
    """XEN_DOMCTL_createdomain (max_vcpus is part of its configuration since
    Xen 4.12) and XEN_DOMCTL_max_mem in one: an empty domain, VCPUs down."""
    return hv.create_domain(name, max_pages, max_vcpus)


def destroydomain(hv: Hypervisor, dom: Domain) -> None:
    """XEN_DOMCTL_destroydomain: every frame back to the heap, devices gone."""
    hv.destroy_domain(dom)


def max_mem(dom: Domain, max_pages: int) -> None:
    """XEN_DOMCTL_max_mem: the most frames the domain's reservation may hold."""
    dom.max_pages = max_pages


def max_vcpus(dom: Domain) -> int:
    """The number of VCPUs the domain was created with (its max_vcpus)."""
    return len(dom.vcpus)


def pausedomain(dom: Domain) -> None:
    """XEN_DOMCTL_pausedomain: the scheduler runs none of its VCPUs."""
    dom.paused = True


def unpausedomain(dom: Domain) -> None:
    dom.paused = False


def is_paused(dom: Domain) -> bool:
    """xc_domain_getinfo's XEN_DOMINF_paused: the toolstack paused it."""
    return bool(dom.paused)


def setdomainname(dom: Domain, name: str) -> None:
    """A domain's new name. Xen keeps names in xenstore alone (libxl_domain_rename
    writes the home's ``name`` node); pvlab's domains carry theirs too, as
    xc_domain_getinfo's reader sees it, so libxl renames through here."""
    dom.name = name


def getdomaininfolist(hv: Hypervisor) -> list[Domain]:
    """XEN_SYSCTL_getdomaininfolist: every domain of the machine, by domid."""
    return [d for _, d in sorted(hv.domains.items())]


def resumedomain(hv: Hypervisor, dom: Domain) -> None:
    """XEN_DOMCTL_resumedomain: a domain shut down for suspend runs on."""
    dom.resume()


def bind_virq_dom_exc(hv: Hypervisor, handler: Callable[[int], None]) -> None:
    """EVTCHNOP_bind_virq(VIRQ_DOM_EXC), as xenstored binds it: ``handler(domid)``
    runs when a domain has been destroyed, for the toolstack to release what
    it kept for it (xenstored's @releaseDomain). One binding (EEXIST)."""
    if not hv.bind_global_virq(VIRQ_DOM_EXC, handler):
        raise DomctlError(EEXIST, "VIRQ_DOM_EXC is bound already")


def bind_virq_con_ring(hv: Hypervisor, handler: Callable[[Domain, bytes], None]) -> None:
    """EVTCHNOP_bind_virq(VIRQ_CON_RING): ``handler(dom, data)`` gets what a
    domain writes to its console, its console_io hypercalls and what the
    console daemon hands over from its ring (console_write), in order; Xen
    signals the virq and the toolstack reads the console ring
    (XEN_SYSCTL_readconsole), pvlab passes the data. One binding (EEXIST)."""
    if not hv.bind_global_virq(VIRQ_CON_RING, handler):
        raise DomctlError(EEXIST, "VIRQ_CON_RING is bound already")


def console_write(dom: Domain, data: bytes) -> None:
    """What the console daemon took from the domain's console ring: into the
    domain's console output (console_out, after what it wrote with console_io)
    and on to VIRQ_CON_RING's handler."""
    dom.console_write(data)


def shutdown_name(reason: int) -> str:
    return SHUTDOWN_NAMES.get(reason, str(reason))


# --- VCPUs --------------------------------------------------------------------------

def getvcpucontext(dom: Domain, vcpu_id: int) -> vcpu_guest_context:
    """XEN_DOMCTL_getvcpucontext: CR3 and the user L4 as machine addresses."""
    return get_context(dom.vcpus[vcpu_id])


def setvcpucontext(dom: Domain, vcpu_id: int, ctx: vcpu_guest_context) -> int:
    """XEN_DOMCTL_setvcpucontext (arch_set_info_guest): the kernel L4 takes a
    type reference and is validated; VGCF_online brings the VCPU up. 0 or
    -EINVAL when CR3 does not validate."""
    v = dom.vcpus[vcpu_id]
    rc = set_context(v, bytes(ctx))
    if rc:
        return rc
    v.online = bool(ctx.flags & VGCF_online)
    v.initialised = True
    return 0


def modify_returncode(dom: Domain, rc: int) -> None:
    """xc_resume.c's modify_returncode: the result vcpu0's suspend hypercall
    returns (1: cancelled, the guest goes on in the same domain). libxc does
    it with getvcpucontext and setvcpucontext; one register is all it changes."""
    dom.vcpus[0].gpr[RAX] = rc


def settscinfo(dom: Domain, clocks_ns: Mapping[int, int]) -> None:
    """XEN_DOMCTL_settscinfo: the guest's time goes on where the image left
    it. pvlab's deterministic clock is per VCPU: vcpu id -> ns."""
    for vcpu_id, ns in clocks_ns.items():
        dom.vcpus[vcpu_id].clock = int(ns)


def vcpu_clocks(dom: Domain) -> list[int]:
    """Each VCPU's virtual time (XEN_DOMCTL_gettscinfo, per VCPU)."""
    return [v.clock for v in dom.vcpus]


@dataclass(frozen=True)
class VcpuInfo:
    """XEN_DOMCTL_getvcpuinfo: whether it is up, blocked, and its time."""

    online: bool
    blocked: bool
    cpu_time: int  # its virtual clock, ns
    running_ns: int = 0  # time spent running (Xen's cpu_time: runstate running)


def getvcpuinfo(dom: Domain, vcpu_id: int) -> VcpuInfo:
    v = dom.vcpus[vcpu_id]
    running = v.runstate.get(dom.scheduler.now()).time[RUNSTATE_running]
    return VcpuInfo(bool(v.online), bool(v.blocked), int(v.clock), int(running))


def reached(dom: Domain, t_ns: int) -> bool:
    """Every online VCPU has run to ``t_ns`` or sleeps until a timer."""
    return all(v.clock >= t_ns or (v.blocked and next_wake(v))
               for v in dom.vcpus if v.online)


def system_time(hv: Hypervisor) -> int:
    """Xen's NOW(): the system time of whoever runs, else of the VCPU
    furthest behind (deterministic clock), or the host's (fast clock)."""
    return hv.scheduler.now()


def run(hv: Hypervisor, until_ns: int | None = None) -> None:
    """Let the machine's scheduler run every runnable VCPU (to ``until_ns``)."""
    hv.run(until_ns)


def run_while_busy(hv: Hypervisor, until_ns: int) -> None:
    """As run, but back as soon as every VCPU is blocked with no timer due
    yet, instead of sleeping until one is (fast clock): a host daemon sleeps
    then in its own poll, where a message can wake it too."""
    sched = hv.scheduler

    def idle() -> bool:
        nxt = sched.next_work()
        return nxt is None or nxt > sched.now()
    hv.run(until_ns, idle)


def next_work(hv: Hypervisor) -> int | None:
    """When the machine next has something to run: now (system time) if a
    VCPU can run, else its earliest timer; None if only an event from outside
    (the toolstack's) can wake it. A host daemon sleeps until then."""
    return hv.scheduler.next_work()


def reseed_schedule(hv: Hypervisor, sched_seed: int) -> None:
    """From now on the schedule's choices come from ``sched_seed``'s stream
    (the explorer's runs forked from one start)."""
    hv.scheduler.reseed(sched_seed)


def clock_name(hv: Hypervisor) -> str:
    """The machine's clock: "deterministic" or "fast" (scheduler.py)."""
    return hv.scheduler.clock


def no_progress(hv: Hypervisor) -> str:
    """Why the last run stopped with nothing able to change, or "" (the
    scheduler's rule: pvlab's run loop, not a Xen domctl)."""
    return hv.scheduler.stalled


def idle_until(hv: Hypervisor, t_ns: int) -> None:
    """Let the time of every stopped VCPU pass to ``t_ns``, when the toolstack
    has a request to make there and nothing in the guest can run before it."""
    hv.scheduler.idle_until(t_ns)


def load_kernel(dom: Domain, module: str, text: int, size: int) -> None:
    """Bind the Python guest kernel the image names to the domain's VCPUs: its
    native entries at ``text`` (``size`` bytes). Raises KernelError."""
    dom.kernel_module = module
    dom.native = NativeKernel(dom, module, text, size)
    for v in dom.vcpus:
        dom.native.bind(v)


def kernel_cmdline_error(dom: Domain, cmdline: str) -> str:
    """Ask the bound Python kernel whether it can obey ``cmdline``: "" or
    why not (no kernel bound: "")."""
    return dom.native.cmdline_error(cmdline) if dom.native is not None else ""


def kernel_binding(dom: Domain) -> dict[str, Any] | None:
    """What load_kernel was given, for an image to name it again."""
    native = dom.native
    if native is None:
        return None
    return {"module": native.name, "text": native.text, "size": native.size}


# --- memory -------------------------------------------------------------------------

@dataclass(frozen=True)
class PhysInfo:
    total_pages: int
    free_pages: int


def physinfo(hv: Hypervisor) -> PhysInfo:
    """XEN_SYSCTL_physinfo."""
    ft = hv.machine.frames
    return PhysInfo(ft.nr_frames, ft.nr_free)


def xen_version(hv: Hypervisor) -> tuple[int, int]:
    """XENVER_version: (major, minor) of the ABI the hypervisor speaks."""
    return XEN_MAJOR, XEN_MINOR


def populate_physmap(hv: Hypervisor, dom: Domain, nr_frames: int,
                     zero: bool = True) -> np.ndarray:
    """XENMEM_populate_physmap on a foreign domain: ``nr_frames`` new frames
    from the shuffled heap, as mfns (int64). ``zero=False`` when every frame
    is about to be written whole. Raises OutOfMemory."""
    return hv.machine.frames.alloc_array(dom.domid, nr_frames, zero=zero)


def mmu_machphys_update(hv: Hypervisor, dom: Domain, mfns: np.ndarray,
                        pfns: np.ndarray) -> None:
    """mmu_update MMU_MACHPHYS_UPDATE for a batch: the M2P learns mfn -> pfn
    for frames the domain owns."""
    mfns = np.asarray(mfns, dtype=np.int64)
    _check_owned(hv, dom, mfns)
    hv.machine.m2p[mfns] = np.asarray(pfns, dtype=np.uint64)
    if dom.domid in hv.machine.paging.logs:  # log-dirty on: each pfn is marked
        for pfn in np.asarray(pfns, dtype=np.uint64).tolist():
            hv.machine.paging.mark_pfn_dirty(dom.domid, pfn)


def mem_paging_setup(hv: Hypervisor, fetch: Callable[[np.ndarray], None] | None,
                     background: int = 0, poll: Callable[[], None] | None = None) -> None:
    """The pager of absent frames (Xen's xenpaging on its vm_event ring):
    ``fetch(mfns)`` writes the contents of absent frames (with ``write_absent``)
    when anything touches them, and ``background`` of them are filled
    between slices whether touched or not; ``poll()``, if given, runs between
    slices first (a post-copy pager loads the pages that came meanwhile with
    ``mem_paging_load``). None: no pager."""
    absent = hv.machine.memory.absent
    absent.register(fetch)
    absent.background = background
    absent.poll = poll if fetch is not None else None


def mem_paging_evict(hv: Hypervisor, dom: Domain, mfns: np.ndarray) -> None:
    """Mark the domain's frames ``mfns`` absent (xc_mem_paging_populate_evicted:
    frames populated straight into the paged-out state): the pager fills each
    before anything reads or writes it."""
    mfns = np.asarray(mfns, dtype=np.int64)
    _check_owned(hv, dom, mfns)
    hv.machine.memory.absent.mark_absent(mfns)
    hv.machine.walker.flush()
    dom.flush_tlbs()


def write_absent(hv: Hypervisor, mfns: np.ndarray, pages: np.ndarray) -> None:
    """The pager's copy into absent frames (UFFDIO_COPY, the paging op
    ``prep``): rows of 512 u64, written without waking the pager again."""
    hv.machine.memory.u64.reshape(-1, ENTRIES_PER_TABLE)[mfns] = pages


def mem_paging_loaded(hv: Hypervisor, mfns: np.ndarray) -> None:
    """A pager wrote these frames whole with ``write_absent`` without being
    asked (a page that arrived on its own, pushed by the source): they are
    present from now on. Such a pager names them from its own table of what
    it evicted, which nothing here corrects: a frame freed and reused since
    is written all the same. This is the balloon race harness's placement
    (by table, as Otto's RFC places pages), not pvlab's post-copy pager,
    which uses ``mem_paging_load`` (absent frames only)."""
    hv.machine.memory.absent.discard(np.asarray(mfns, dtype=np.int64))


def mem_paging_absent(hv: Hypervisor, mfns: np.ndarray) -> np.ndarray:
    """Which of these frames are absent (bool per mfn); touches none."""
    return hv.machine.memory.absent.absent[np.asarray(mfns, dtype=np.int64)].copy()


def mem_paging_load(hv: Hypervisor, mfns: np.ndarray, pages: np.ndarray) -> None:
    """Pages the pager has before anything asked for them (xc_mem_paging_load):
    written into absent frames, which are then present. Only absent ones
    are written: a frame present again (overwritten whole) keeps its contents."""
    absent = hv.machine.memory.absent
    mfns = np.asarray(mfns, dtype=np.int64)
    still = absent.absent[mfns]
    hv.machine.memory.u64.reshape(-1, ENTRIES_PER_TABLE)[mfns[still]] = pages[still]
    absent.discard(mfns[still])


def mem_paging_stats(hv: Hypervisor) -> tuple[int, int, int]:
    """(frames still absent, frames the pager filled, its calls)."""
    absent = hv.machine.memory.absent
    return absent.count, absent.fetched, absent.fetch_calls


def map_m2p(hv: Hypervisor) -> np.ndarray:
    """xc_map_m2p: the machine-to-phys table, read-only."""
    view = hv.machine.m2p.view()
    view.flags.writeable = False
    return view


def alloc_shared_info(hv: Hypervisor, dom: Domain) -> int:
    """The domain's shared_info page (Xen allocates it in arch_domain_create):
    a hypervisor frame the domain may map. Returns its mfn."""
    mfn = hv.machine.frames.alloc(dom.domid)
    hv.machine.frames.xenheap[mfn] = True
    dom.set_shared_info(mfn)
    return mfn


def map_shared_info(hv: Hypervisor, dom: Domain) -> Any:
    """xc_map_foreign_range of shared_info_frame, as the shared_info struct."""
    return shared_info.from_buffer(hv.machine.memory.buf, dom.shared_info_mfn << PAGE_SHIFT)


def tlb_flush(hv: Hypervisor, dom: Domain) -> None:
    """MMUEXT_TLB_FLUSH_ALL for a foreign domain: its VCPUs drop what they
    cached of mappings the toolstack has rewritten underneath them."""
    dom.flush_tlbs()


def shared_info_frame(dom: Domain) -> int:
    """getdomaininfo's shared_info_frame."""
    return dom.shared_info_mfn


def mmuext_pin_table(hv: Hypervisor, dom: Domain, mfn: int, level: int) -> int:
    """mmuext_op MMUEXT_PIN_L<level>_TABLE on a foreign domain: the frame takes
    that type (validated now) and keeps it until unpinned. 0 or -errno."""
    rc = hv.machine.types.get_page_and_type(mfn, LEVEL_TYPE[level], dom.domid)
    if rc:
        return rc
    hv.machine.frames.pinned[mfn] = True
    hv.machine.paging.mark_dirty(mfn)
    return 0


def validate_l1_tables(hv: Hypervisor, dom: Domain, l1_mfns: np.ndarray,
                       table_mfns: np.ndarray) -> bool:
    """Validate a restored domain's L1s in one pass before its tables are
    pinned (PageTypes.validate_l1s: Xen's rules, over all of them at once);
    ``table_mfns``: every frame the pins will type. False: nothing was done,
    the pins validate each table themselves."""
    busy = np.zeros(hv.machine.frames.nr_frames, dtype=bool)
    busy[table_mfns] = True
    return hv.machine.types.validate_l1s(l1_mfns, busy, dom.domid)


def release_unreferenced_l1s(hv: Hypervisor, l1_mfns: np.ndarray) -> None:
    """After the pins: the L1s validate_l1_tables validated that no table
    referenced are devalidated again."""
    hv.machine.types.release_unreferenced(l1_mfns)


def getpageframeinfo3(hv: Hypervisor, dom: Domain, mfns: np.ndarray) -> np.ndarray:
    """XEN_DOMCTL_getpageframeinfo3: a PFINFO type (u32) per frame. A frame
    not the domain's is XTAB; a pagetable pinned or in use (validated) is
    L1..L4, LPINTAB if pinned; one that is neither is plain data, NOTAB."""
    ft = hv.machine.frames
    mfns = np.asarray(mfns, dtype=np.int64)
    out = np.full(mfns.size, PFINFO_XTAB, dtype=np.uint32)
    ok = (mfns >= 0) & (mfns < ft.nr_frames)
    ok[ok] = ft.owner[mfns[ok]] == dom.domid
    m = mfns[ok]
    t = ft.type[m].astype(np.uint32)  # PageType.l1..l4 are 1..4, as PFINFO's levels
    pinned = ft.pinned[m]
    table = (t >= PageType.l1) & (t <= PageType.l4) & (pinned | ft.validated[m])
    types = np.where(table, t << PFINFO_LTAB_SHIFT, PFINFO_NOTAB).astype(np.uint32)
    types[table & pinned] |= np.uint32(PFINFO_LPINTAB)
    out[ok] = types
    return out


# --- log-dirty ----------------------------------------------------------------------

def shadow_op(hv: Hypervisor, dom: Domain, op: xen_domctl_shadow_op,
              bitmap: np.ndarray | None = None) -> int:
    """XEN_DOMCTL_shadow_op for log-dirty (paging_domctl, hypervisor/mm/logdirty.py):
    OFF, ENABLE_LOGDIRTY (or ENABLE with XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY),
    CLEAN and PEEK. For CLEAN and PEEK, ``op.pages`` bits go into ``bitmap``
    (uint8, a bit per pfn, None for the counts only); ``op.pages`` and
    ``op.stats`` are written back, as the domctl's OUT fields. 0 or -errno:
    -EINVAL for ENABLE on a domain in log-dirty mode already, a CLEAN or
    PEEK mode other than 0 or LOGDIRTY_FINAL, a bitmap smaller than
    ``pages``, a domain with no VCPUs, and any other op (Xen's shadow
    modes, which pvlab does not have)."""
    paging = hv.machine.paging
    if not dom.vcpus or dom.domid not in hv.domains:
        return -EINVAL
    if op.op == XEN_DOMCTL_SHADOW_OP_OFF:
        return paging.disable(dom.domid)
    if op.op == XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY or (
            op.op == XEN_DOMCTL_SHADOW_OP_ENABLE
            and op.mode == XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY):
        rc = paging.enable(dom.domid)
        dom.flush_tlbs()
        return rc
    if op.op not in (XEN_DOMCTL_SHADOW_OP_CLEAN, XEN_DOMCTL_SHADOW_OP_PEEK):
        return -EINVAL
    if op.mode & ~XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL:
        return -EINVAL
    if bitmap is not None and bitmap.size * 8 < op.pages:
        return -EINVAL
    pages, stats = paging.log_dirty_op(dom.domid, op.op == XEN_DOMCTL_SHADOW_OP_CLEAN,
                                       int(op.pages), bitmap)
    dom.flush_tlbs()  # the next store through a cleaned entry sets its D bit again
    op.pages = pages
    op.stats.fault_count = stats.fault_count
    op.stats.dirty_count = stats.dirty_count
    return 0


def modified_memory(hv: Hypervisor, dom: Domain, first_pfn: int, nr: int) -> None:
    """XEN_DMOP_modified_memory (xendevicemodel_modified_memory): a backend
    wrote these pfns of the domain through its mapping (the console and
    xenstore rings), for log-dirty to see."""
    for pfn in range(first_pfn, first_pfn + nr):
        hv.machine.paging.mark_pfn_dirty(dom.domid, pfn)


# --- foreign mappings ---------------------------------------------------------------

class ForeignMap:
    """xc_map_foreign_bulk's result: a domain's frames as rows of 512 u64.
    ``fmap[i]`` is a view of one frame (writes reach the guest); a slice or
    mask reads a copy; assigning to it writes the frames. A copy shows the
    guest's pagetables as it wrote them, with the D bits log-dirty took."""

    def __init__(self, frames: np.ndarray, mfns: np.ndarray,
                 as_written: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        self._frames = frames
        self.mfns = mfns
        self._as_written = as_written

    def __len__(self) -> int:
        return int(self.mfns.size)

    def __getitem__(self, key: Any) -> np.ndarray:
        mfns = self.mfns[key]
        if np.ndim(mfns) == 0:
            return self._frames[mfns]
        return self._as_written(mfns, self._frames[mfns])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._frames[self.mfns[key]] = value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._as_written(self.mfns, self._frames[self.mfns])
        return out if dtype is None else out.astype(dtype)


def _check_owned(hv: Hypervisor, dom: Domain, mfns: np.ndarray) -> None:
    ft = hv.machine.frames
    inside = (mfns >= 0) & (mfns < ft.nr_frames)
    if not inside.all():
        bad = int(mfns[~inside][0])
        raise DomctlError(EINVAL, f"mfn {bad:#x} is no frame of the machine")
    foreign = ft.owner[mfns] != dom.domid
    if foreign.any():
        bad = int(mfns[foreign][0])
        raise DomctlError(EPERM, f"mfn {bad:#x} is not a frame of domain {dom.domid}")


def map_foreign_bulk(hv: Hypervisor, dom: Domain, mfns: Sequence[int] | np.ndarray,
                     ) -> ForeignMap:
    """xc_map_foreign_bulk: the domain's frames ``mfns`` (a PV domain names
    its frames by mfn); a frame it does not own is refused (EPERM)."""
    mfns = np.asarray(mfns, dtype=np.int64).reshape(-1)
    _check_owned(hv, dom, mfns)
    hv.machine.memory.populate_many(mfns)  # a mapping sees the frames' contents
    return ForeignMap(hv.machine.memory.u64.reshape(-1, ENTRIES_PER_TABLE), mfns,
                      hv.machine.paging.as_written)


def map_foreign_range(hv: Hypervisor, dom: Domain, mfn: int) -> np.ndarray:
    """xc_map_foreign_range of one frame: its 4096 bytes, a writable view."""
    _check_owned(hv, dom, np.array([mfn], dtype=np.int64))
    return hv.machine.memory.frame_bytes(mfn)


def map_struct(hv: Hypervisor, dom: Domain, mfn: int, struct: type[ctypes.Structure],
               ) -> Any:
    """A frame of the domain mapped as a ctypes struct (start_info, say)."""
    _check_owned(hv, dom, np.array([mfn], dtype=np.int64))
    hv.machine.memory.populate(mfn)
    return struct.from_buffer(hv.machine.memory.buf, mfn << PAGE_SHIFT)


# --- debugging ----------------------------------------------------------------------

def gdbsx_guestmemio(hv: Hypervisor, dom: Domain, vcpu_id: int, va: int,
                     size: int) -> bytes | None:
    """XEN_DOMCTL_gdbsx_guestmemio (read): ``size`` bytes at a guest virtual
    address through the VCPU's current tables; None if not mapped."""
    try:
        return hv.walker.read(dom.vcpus[vcpu_id].current_table, va, size)
    except GuestFault:
        return None


def gdbsx_guestmemio_write(hv: Hypervisor, dom: Domain, vcpu_id: int, va: int,
                           data: bytes) -> bool:
    """XEN_DOMCTL_gdbsx_guestmemio (write): store ``data`` at a guest virtual
    address where the guest itself may write; all of it or, where a page is
    not mapped writable, none. Every engine drops its translated code, which
    the store may have changed."""
    v = dom.vcpus[vcpu_id]
    try:
        for page in range(va & ~(PAGE_SIZE - 1), va + len(data), PAGE_SIZE):
            hv.walker.translate(v.current_table, max(page, va), write=True)
    except GuestFault:
        return False
    hv.walker.write(v.current_table, va, data)
    for other in dom.vcpus:
        other.uc.ctl_flush_tb()
    return True


def gdbsx_getregs(dom: Domain, vcpu_id: int) -> dict[str, int]:
    """A stopped VCPU's registers by gdb's names (hypervisor/public/gdb.py),
    as gdbsx reads them with XEN_DOMCTL_getvcpucontext."""
    return debugger.read_registers(dom.vcpus[vcpu_id])


def gdbsx_setreg(dom: Domain, vcpu_id: int, name: str, value: int) -> bool:
    """Write one register of a stopped VCPU by its gdb name; False for one
    the debugger may not write (a segment selector, the x87 state)."""
    return debugger.write_register(dom.vcpus[vcpu_id], name, value)


def debug_attach(hv: Hypervisor, dom: Domain, on_stop: Callable[[int, str], None],
                 interrupted: Callable[[], bool]) -> None:
    """Attach a debugger to the domain (hypervisor/debugger.py): on_stop(vcpu
    id, why) is called when a VCPU stops and returns when the guest is to run
    on; interrupted() is asked before every slice whether to stop. Only under
    the deterministic clock, whose counted slices it cuts into pieces."""
    if not hv.scheduler.deterministic:
        raise DomctlError(EINVAL, "a debugger needs the deterministic clock")
    debugger.Debugger(dom, on_stop, interrupted)


def _debugger(dom: Domain) -> debugger.Debugger:
    d = dom.vcpus[0].debug
    if not isinstance(d, debugger.Debugger):
        raise DomctlError(EINVAL, "no debugger is attached to the domain")
    return d


def debug_breakpoint(dom: Domain, va: int, insert: bool) -> None:
    """Insert or remove a breakpoint at a guest virtual address, on every
    VCPU: a code hook, nothing written to guest memory."""
    bps = _debugger(dom).breakpoints
    if insert:
        bps.add(va)
    else:
        bps.discard(va)


def debug_op_single_step(dom: Domain, vcpu_id: int) -> None:
    """XEN_DOMCTL_debug_op (SINGLE_STEP_ON), for the next resume: the VCPU
    runs one instruction and stops."""
    _debugger(dom).step(vcpu_id)


def debug_detach(dom: Domain) -> None:
    """The debugger goes: its hooks are removed and the guest runs on."""
    if isinstance(dom.vcpus[0].debug, debugger.Debugger):
        dom.vcpus[0].debug.detach()


def debug_trace(dom: Domain, vcpu_id: int, more: Callable[[], bool],
                on_insn: Callable[[int, int, bool], None],
                on_native: Callable[[int, Callable[..., Any]], None]) -> None:
    """Trace a VCPU (as a debugger single-steps through XEN_DOMCTL_debug_op):
    on_insn(addr, size, in_kernel) before each x86 instruction, on_native(addr,
    fn) at each entry of the Python kernel, while more() says so. A code hook
    on every instruction costs ~1000x: the slice stops when more() turns
    false, and the hook is removed after it, between slices (removing a code
    hook inside a run makes Unicorn raise a hidden #PF), with CR2 and the
    CPU's old_exception repaired."""
    v = dom.vcpus[vcpu_id]

    def hook(uc: Any, addr: int, size: int, _: Any) -> None:
        if not more():
            v.request_stop()
            uc.emu_stop()
            return
        on_insn(addr, size, v.in_kernel)

    handle = v.uc.hook_add(UC_HOOK_CODE, hook, None)

    def after_slice(vcpu: Any) -> None:
        if more():
            return
        cr2 = vcpu.uc.reg_read(UC_X86_REG_CR2)
        try:
            vcpu.uc.hook_del(handle)
        except UcError:
            pass
        vcpu.uc.reg_write(UC_X86_REG_CR2, cr2)
        vcpu.env.clear_old_exception()
        vcpu.after_slice = None
        vcpu.on_native = None

    v.after_slice = after_slice
    v.on_native = lambda vcpu, addr, fn: on_native(addr, fn) if more() else None


def tbuf_enable(dom: Domain) -> None:
    """XEN_SYSCTL_tbuf_op enable, for one domain: from now on its hypercalls,
    kernel entries, console lines and the kernel's markers are recorded with
    their virtual time (hypervisor/xentrace.py)."""
    if dom.tbuf is None:
        dom.tbuf = TraceBuffer()


def tbuf_read(dom: Domain) -> list[TraceRecord]:
    """What xentrace reads: the domain's trace records so far, in the order
    they were made (each VCPU's in time order); [] if tracing is off."""
    return list(dom.tbuf.records) if dom.tbuf is not None else []


# --- event channels -----------------------------------------------------------------

def evtchn_alloc_unbound(dom: Domain, remote_dom: int, port: int | None = None) -> int:
    """EVTCHNOP_alloc_unbound in the domain for ``remote_dom``; at ``port`` if
    given (a restore keeps the ports the guest knows). The port or -errno."""
    if port is None:
        return dom.evtchn.alloc_unbound(remote_dom)
    return dom.evtchn.alloc_unbound_at(port, remote_dom)


def evtchn_bind_backend(dom: Domain, port: int, notify: Callable[[], None]) -> None:
    """The backend's end of an interdomain channel (EVTCHNOP_bind_interdomain
    from the toolstack's side): ``notify`` runs when the guest sends on it."""
    dom.evtchn.bind_backend(port, notify)


def evtchn_notify(dom: Domain, port: int) -> None:
    """xenevtchn_notify from the backend: the guest's port goes pending."""
    dom.evtchn.set_pending(port)


# --- devices ------------------------------------------------------------------------

def iomem_permission(hv: Hypervisor, dom: Domain, first_mfn: int, nr_mfns: int) -> None:
    """XEN_DOMCTL_iomem_permission: the domain may map these frames of device
    memory (never RAM: ValueError)."""
    hv.iomem_permit(dom, first_mfn, nr_mfns)


def next_mmio_base(hv: Hypervisor) -> int:
    """The next free page of the device bus."""
    return hv.bus.next_base()


def balloon_host(hv: Hypervisor, dom: Domain) -> BalloonHost:
    """What a balloon of ``dom`` is given (the balloon race harness's too)."""
    return balloon_persist.balloon_host(hv, dom)


def add_virtio_device(hv: Hypervisor, dom: Domain, device: VirtioDevice, base: int,
                      port: int) -> VirtioMmio:
    """Put ``device`` behind a virtio-mmio transport at machine address
    ``base``, its interrupt on the domain's event channel ``port``, mappable
    by the domain."""
    def send_event() -> None:
        # a domain that is not running, or has no shared_info yet, takes no event
        if dom.is_running and dom.shared_info is not None:
            dom.evtchn.set_pending(port)

    mem = DomainMemory(hv.machine.memory, hv.machine.frames, dom.domid,
                       hv.machine.paging.mark_range)
    transport = VirtioMmio(device, mem, base, port, send_event)
    iomem_permission(hv, dom, base >> PAGE_SHIFT, 1)
    hv.add_device(dom, base, transport)
    return transport


def add_virtio(hv: Hypervisor, dom: Domain, state: dict[str, Any], base: int,
               port: int) -> VirtioDevice:
    """A device of the kind ``state["kind"]`` names, made as ``state``
    describes it (a new device's configuration, or an EMULATOR_CONTEXT
    entry), behind a transport at ``base`` with its interrupt on ``port``.
    ValueError: the kind is unknown or the state is wrong for it."""
    kind = kinds.kind_named(str(state.get("kind")))
    if kind is None:
        raise ValueError(f"no device kind {state.get('kind')!r} (known: "
                         f"{', '.join(kinds.kind_names())})")
    device = kind.make(hv, dom, kinds.with_defaults(state))
    add_virtio_device(hv, dom, device, base, port)
    return device


def new_balloon_state(stats_interval_ns: int, deflate_on_oom: bool, postcopy: str = "drop"
                      ) -> dict[str, Any]:
    """A new balloon's state, for add_virtio: its configuration, nothing inflated."""
    return balloon_persist.new_state(stats_interval_ns, deflate_on_oom, postcopy)


def new_blk_state(path: str, read_only: bool, serial: str = "",
                  queue_size: int = BLK_QUEUE_SIZE) -> dict[str, Any]:
    """A new disk's state, for add_virtio: the image at ``path`` (a raw file),
    its request queue of ``queue_size`` entries."""
    return blk_persist.new_state(path, read_only, serial, queue_size)


def check_blk_queue_size(size: int) -> str | None:
    """Why a disk's request queue cannot have ``size`` entries, or None."""
    return blk_check_queue_size(size)


def new_net_state(mac: str, backend: dict[str, Any]) -> dict[str, Any]:
    """A new network device's state, for add_virtio: its MAC and its backend
    ({"type": "user"}, or {"type": "socket", "listen" or "connect": ADDRESS})."""
    return net_persist.new_state(mac, backend)


def parse_net_address(text: str) -> tuple[int, Any]:
    """A socket backend's ``HOST:PORT`` or ``unix:PATH``: (family, address);
    ValueError if it is neither."""
    return net_backend.parse_address(text)


def add_virtio_balloon(hv: Hypervisor, dom: Domain, base: int, port: int,
                       stats_interval_ns: int, deflate_on_oom: bool,
                       postcopy: str = "drop") -> Balloon:
    """A new virtio-mmio balloon of ``dom``; ``postcopy`` is what its
    requests do while inhibited (drop or reconcile)."""
    state = new_balloon_state(stats_interval_ns, deflate_on_oom, postcopy)
    balloon = add_virtio(hv, dom, state, base, port)
    assert isinstance(balloon, Balloon)
    return balloon


def new_console_state(ports: list[tuple[str, str, str]]) -> dict[str, Any]:
    """A new virtio-console's state, for add_virtio: (name, connection, path)
    of each port (connection "socket" or "file")."""
    return console_persist.new_state(ports)


def check_console_ports(ports: list[dict[str, str]]) -> str | None:
    """Why these ports cannot make a console, or None."""
    return console_persist.check_ports(ports)


def console_ports(dom: Domain) -> list[dict[str, Any]]:
    """Each port of the domain's virtio-console: id, name, connection, path,
    and whether each side has it open (empty: no console)."""
    con = find_device(dom, Console)
    return [] if con is None else con.info()["ports"]


def private_disks(dom: Domain) -> None:
    """Each of the domain's disks goes on with a copy of its own (the
    explorer's runs: none writes another's disk, nor the image file)."""
    for dev in dom.devices:
        if isinstance(dev.device, Block):
            dev.device.private_copy()


def find_device(dom: Domain, kind: type) -> Any | None:
    """The domain's first device model of this kind, or None."""
    for dev in dom.devices:
        if isinstance(dev.device, kind):
            return dev.device
    return None


def device_kind_names() -> list[str]:
    """The kinds of device model this hypervisor has (devices/kinds.py)."""
    return kinds.kind_names()


def virtio_injectors(hv: Hypervisor, dom: Domain, every: int, phase: int = 0,
                     kind: str | None = None, unit: str = "access") -> list[Injector]:
    """An injector (devices/virtio/inject.py) on each of the domain's
    virtio devices, or those of ``kind`` ("balloon", ...), not armed yet: it
    throws the device's events at every ``every``-th step (register access,
    or slice) from ``phase`` once armed."""
    out = [Injector(t, every, phase, unit) for t in dom.devices
           if kind is None or kinds.kind_of(t.device).name == kind]
    if unit == "slice":
        hv.scheduler.between_slices.extend(inj.tick for inj in out)
    return out


def devices_state(dom: Domain) -> list[dict[str, Any]]:
    """What an image carries of each device (its EMULATOR_CONTEXT record): where
    it is and what the host keeps of it. The guest must have frozen (reset)
    them: a live device has rings in frames a restore moves (EBUSY)."""
    out = []
    for t in dom.devices:
        if t.status:
            raise DomctlError(EBUSY, f"the {t.device.name} device at {t.base:#x} is live "
                              f"(status {t.status:#x}): the guest did not reset it when it "
                              "froze its devices, and its rings cannot be carried over")
        out.append(kinds.save_entry(t))
    return out


def device_place(dom: Domain, base: int) -> dict[str, Any]:
    """Where the device at ``base`` is (bus, kind, base, port): what a
    configuration names of it, without its state (no save's flush)."""
    t = next(t for t in dom.devices if t.base == base)
    return {"bus": kinds.BUS, "kind": kinds.kind_of(t.device).name, "base": t.base,
            "port": t.port}


def check_device_state(state: object) -> str | None:
    """Why an EMULATOR_CONTEXT entry cannot be restored, or None: a device this
    hypervisor knows, with every key of its declared state and type."""
    return kinds.check_entry(state)


# --- checks -------------------------------------------------------------------------

def audit(hv: Hypervisor,
          p2m_lists: Mapping[int, tuple[Sequence[int], int]] | None = None) -> list[str]:
    """The frame-accounting invariants that fail (Xen's debug audit). The M2P
    is checked against the p2m lists the toolstack names: domid -> (the frames
    holding the list, its number of entries)."""
    return _audit(hv, p2m_lists)


@dataclass
class FrameDump:
    """The frame table's rows for a domain's frames (Xen's 'q' debug key)."""

    mfns: np.ndarray
    pfns: np.ndarray          # from the M2P; INVALID_MFN where none
    type: np.ndarray          # PageType values
    type_count: np.ndarray
    ref_count: np.ndarray
    pinned: np.ndarray
    validated: np.ndarray
    xenheap: np.ndarray       # a hypervisor page shared with the domain
    owner: np.ndarray         # a domid, DOMID_XEN, or -1 for a free frame


def dump_frames(hv: Hypervisor, dom: Domain | None = None) -> FrameDump:
    """The rows of ``dom``'s frames, or with no domain of every frame of the
    machine, in mfn order."""
    ft = hv.machine.frames
    mfns = ft.owned_by(dom.domid) if dom is not None else np.arange(ft.nr_frames)
    return FrameDump(mfns, hv.machine.m2p[mfns], ft.type[mfns], ft.type_count[mfns],
                     ft.ref_count[mfns], ft.pinned[mfns], ft.validated[mfns],
                     ft.xenheap[mfns], ft.owner[mfns])


__all__ = [
    "CLOCKS", "POSTCOPY_POLICIES", "Balloon", "BalloonError", "Domain", "DomctlError",
    "ForeignMap", "FrameDump",
    "Hypervisor",
    "Injector", "KernelError", "OutOfMemory", "PageType", "PhysInfo", "Throw", "VcpuInfo",
    "add_virtio", "add_virtio_balloon", "new_balloon_state", "new_blk_state",
    "new_console_state", "check_console_ports", "check_blk_queue_size", "BLK_QUEUE_SIZE",
    "console_ports",
    "new_net_state", "parse_net_address", "private_disks",
    "add_virtio_device", "alloc_shared_info", "audit", "balloon_host", "bind_virq_con_ring",
    "bind_virq_dom_exc", "check_device_state", "clock_name", "console_write", "createdomain",
    "debug_trace", "device_kind_names", "getdomaininfolist", "is_paused", "next_work",
    "run_while_busy",
    "destroydomain", "device_place", "devices_state", "dump_frames",
    "evtchn_alloc_unbound",
    "evtchn_bind_backend", "evtchn_notify", "find_device", "gdbsx_guestmemio",
    "gdbsx_guestmemio_write", "gdbsx_getregs", "gdbsx_setreg", "debug_attach", "debug_breakpoint",
    "debug_op_single_step", "debug_detach",
    "getpageframeinfo3", "getvcpucontext", "getvcpuinfo", "iomem_permission", "kernel_binding",
    "kernel_cmdline_error", "load_kernel", "map_foreign_bulk", "map_foreign_range", "map_m2p",
    "map_shared_info", "map_struct", "max_mem", "max_vcpus", "mmu_machphys_update",
    "modified_memory", "reseed_schedule", "shadow_op", "virtio_injectors",
    "mmuext_pin_table", "modify_returncode", "next_mmio_base", "pausedomain", "physinfo",
    "populate_physmap", "reached", "resumedomain", "run", "settscinfo",
    "setvcpucontext", "shared_info_frame", "shutdown_name", "tlb_flush", "unpausedomain",
    "vcpu_clocks", "xen_version", "tbuf_enable", "tbuf_read", "TraceRecord",
]
