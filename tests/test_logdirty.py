"""Log-dirty mode (hypervisor/mm/logdirty.py), through XEN_DOMCTL_shadow_op as
libxc's xc_shadow_control makes it (xen/arch/x86/mm/paging.c: paging_domctl,
paging_log_dirty_op, paging_mark_dirty).

Every write to a guest frame is seen, whoever makes it: x86 stores in guest
kernel and user mode (pvlab runs all guest code at CPL3, as Xen's x86-64 PV
does, so these are the two), the Python kernel's stores, the hypervisor's
copy_to_guest and its writes to pagetables (entries, type changes, pins).
Frames nobody wrote stay clean, CLEAN empties the log and PEEK does not, OFF
stops it, and the guest cannot tell: its pagetable entries read back as it
wrote them and its console is the same."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor import domctl
from hypervisor.mm.frames import PageType
from hypervisor.public.arch_x86 import _PAGE_DIRTY
from hypervisor.public.domctl import (
    XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY,
    XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL,
    XEN_DOMCTL_SHADOW_OP_CLEAN,
    XEN_DOMCTL_SHADOW_OP_ENABLE,
    XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
    XEN_DOMCTL_SHADOW_OP_OFF,
    XEN_DOMCTL_SHADOW_OP_PEEK,
    xen_domctl_shadow_op,
)
from hypervisor.public.errno import EINVAL
from hypervisor.public.native import VIRT_BASE
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import booting, make_config
from tests.kernels import dirtywrites

MEMORY = 16
PAGES = MEMORY * 256
# pfns the dirtywrites kernel leaves alone unless told to write them: the
# top of its RAM below its code page (its image and bootstrap data are low)
CANDIDATES = range(PAGES - 65, PAGES - 1)


def shadow(hv, dom, op: int, mode: int = 0) -> tuple[int, np.ndarray, int, int]:
    """xc_shadow_control: (rc, the dirty pfns, dirty_count, fault_count)."""
    sop = xen_domctl_shadow_op(op=op, mode=mode, pages=PAGES)
    bitmap = np.zeros(PAGES // 8, dtype=np.uint8)
    rc = domctl.shadow_op(hv, dom, sop, bitmap)
    pfns = np.flatnonzero(np.unpackbits(bitmap, bitorder="little"))
    return rc, pfns, int(sop.stats.dirty_count), int(sop.stats.fault_count)


def enable(hv, dom) -> None:
    assert shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)[0] == 0


def dirty(hv, dom, op: int = XEN_DOMCTL_SHADOW_OP_CLEAN) -> set[int]:
    rc, pfns, _, _ = shadow(hv, dom, op)
    assert rc == 0
    return set(pfns.tolist())


def boot_writer(boot, x86=(), python=(), hypercall=(), repopulate=(), logdirty=True):
    """A dirtywrites domain told what to write, in log-dirty mode from
    before its first instruction; run to its power-off."""
    dirtywrites.X86[:] = x86
    dirtywrites.PYTHON[:] = python
    dirtywrites.HYPERCALL[:] = hypercall
    dirtywrites.REPOPULATE[:] = repopulate
    cfg = replace(make_config(memory=MEMORY), kernel="tests.kernels.dirtywrites")
    hv, dom = boot(cfg)
    if logdirty:
        enable(hv, dom)
    r = run_domain(hv, dom)
    assert r.reason == "poweroff", dom.crash_report
    assert audit(hv) == []
    return hv, dom


# --- what marks ---------------------------------------------------------------------------

def test_kernel_mode_x86_store_marks_its_pfn(booted):
    hv, dom = boot_writer(booted, x86=[PAGES - 10, PAGES - 40])
    d = dirty(hv, dom)
    assert {PAGES - 10, PAGES - 40} <= d
    assert not d & (set(CANDIDATES) - {PAGES - 10, PAGES - 40})


def test_kernel_mode_x86_store_is_seen_through_its_l1_dirty_bit(booted):
    """Nothing but the MMU saw these stores: fault_count counts the entries
    found written (the write faults Xen's shadow mode would take)."""
    hv, dom = boot_writer(booted, x86=[PAGES - 10, PAGES - 20, PAGES - 30])
    _, _, _, faults = shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_CLEAN)
    assert faults >= 3


def test_user_mode_x86_stores_mark_every_page_they_change(booted):
    """The dirtier user program rewrites 16 pages again and again: every
    pfn whose contents changed between two CLEANs is in the second one."""
    hv, dom = booted(make_config(cmdline="run=dirtier:16:20000:100000"))
    run_domain(hv, dom, until_ns=20_000_000)
    enable(hv, dom)
    p2m = np.array(_p2m(hv, dom))
    frames = domctl.map_foreign_bulk(hv, dom, p2m[p2m > 0])
    pfns = np.flatnonzero(p2m > 0)
    dirty(hv, dom)
    before = np.asarray(frames).copy()
    run_domain(hv, dom, until_ns=25_000_000)
    changed = set(pfns[(np.asarray(frames) != before).any(axis=1)].tolist())
    d = dirty(hv, dom)
    assert len(changed) >= 16
    assert changed <= d


def _p2m(hv, dom) -> list[int]:
    """The domain's pfn -> mfn, from the M2P (its frames hold every pfn once)."""
    m2p = domctl.map_m2p(hv)
    mfns = domctl.dump_frames(hv, dom).mfns
    pfns = m2p[mfns]
    p2m = np.zeros(PAGES, dtype=np.int64)
    ok = pfns < PAGES
    p2m[pfns[ok].astype(np.int64)] = mfns[ok]
    return p2m.tolist()


def test_python_kernel_store_marks_its_pfn(booted):
    hv, dom = boot_writer(booted, python=[PAGES - 12])
    d = dirty(hv, dom)
    assert PAGES - 12 in d
    assert not d & (set(CANDIDATES) - {PAGES - 12})


def test_copy_to_guest_marks_its_pfn(booted):
    hv, dom = boot_writer(booted, hypercall=[PAGES - 14])
    d = dirty(hv, dom)
    assert PAGES - 14 in d
    assert not d & (set(CANDIDATES) - {PAGES - 14})


def test_a_repopulated_pfn_is_dirty(booted):
    """A pfn ballooned out and populated again has a new frame that must be
    sent again, though no one wrote it (Xen's PV ballooning gap, closed)."""
    hv, dom = boot_writer(booted, repopulate=[PAGES - 16])
    d = dirty(hv, dom)
    assert PAGES - 16 in d
    assert not d & (set(CANDIDATES) - {PAGES - 16})


def test_pin_type_change_and_entry_write_mark_the_table(booted):
    """A frame becoming an L1 (type count 0 -> 1), its pin and unpin, a write
    to one of its entries, and its type dropping: each marks it, as Xen's
    validate_page, do_mmuext_op, sh_validate_guest_entry and devalidate_page
    do."""
    hv, dom = boot_writer(booted)
    p2m = _p2m(hv, dom)
    pfn = PAGES - 20
    mfn = p2m[pfn]
    # a pagetable must not be mapped writable: the kernel's mapping goes read-only
    maddr = hv.walker.l1e_maddr(dom.vcpus[0].guest_table, VIRT_BASE + (pfn << 12))
    assert hv.mmu.mod_entry(dom, maddr >> 12, (maddr & 0xFFF) >> 3, (mfn << 12) | 0x25) == 0
    dom.flush_tlbs()
    dirty(hv, dom)
    assert domctl.mmuext_pin_table(hv, dom, mfn, 1) == 0
    assert dirty(hv, dom) == {pfn}
    data_mfn = p2m[PAGES - 21]
    assert hv.mmu.mod_entry(dom, mfn, 3, (data_mfn << 12) | 0x27) == 0
    assert dirty(hv, dom) == {pfn}
    assert hv.mmu._unpin(dom, mfn) == 0  # the last type reference goes too
    assert dirty(hv, dom) == {pfn}
    assert hv.machine.frames.type[mfn] == PageType.l1 and not hv.machine.frames.validated[mfn]


def test_device_and_backend_writes_mark(booted):
    """A device's DMA (virtio's DomainMemory.write) and a backend's
    modified_memory mark what they wrote."""
    hv, dom = boot_writer(booted)
    p2m = _p2m(hv, dom)
    dirty(hv, dom)
    hv.machine.paging.mark_range(p2m[PAGES - 30] << 12, 8)
    domctl.modified_memory(hv, dom, PAGES - 31, 1)
    assert dirty(hv, dom) == {PAGES - 30, PAGES - 31}


# --- the domctl's semantics ---------------------------------------------------------------

def test_clean_returns_and_resets_the_counts_peek_keeps_them(booted):
    hv, dom = boot_writer(booted, x86=[PAGES - 3, PAGES - 5], python=[PAGES - 7])
    rc, peek1, dcount, faults = shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_PEEK)
    assert rc == 0 and dcount == len(peek1) and faults >= 2
    assert {PAGES - 3, PAGES - 5, PAGES - 7} <= set(peek1.tolist())
    rc, peek2, dcount2, faults2 = shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_PEEK)
    assert (peek2 == peek1).all() and (dcount2, faults2) == (dcount, faults)
    rc, clean, dcount3, faults3 = shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_CLEAN,
                                         XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL)
    assert (clean == peek1).all() and (dcount3, faults3) == (dcount, faults)
    rc, after, dcount4, faults4 = shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_PEEK)
    assert rc == 0 and after.size == 0 and (dcount4, faults4) == (0, 0)


def test_enable_twice_bad_modes_and_off(booted):
    hv, dom = boot_writer(booted, logdirty=False)
    enable(hv, dom)
    assert shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)[0] == -EINVAL
    assert shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_CLEAN, mode=2)[0] == -EINVAL
    assert shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_OFF)[0] == 0
    assert shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_ENABLE,
                  mode=XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY)[0] == 0
    assert shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_OFF)[0] == 0


def test_off_stops_marking(booted):
    hv, dom = booted(replace(make_config(memory=MEMORY), kernel="tests.kernels.dirtywrites"))
    enable(hv, dom)
    assert shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_OFF)[0] == 0
    dirtywrites.X86[:] = [PAGES - 10]
    dirtywrites.PYTHON[:] = [PAGES - 11]
    dirtywrites.HYPERCALL[:] = []
    dirtywrites.REPOPULATE[:] = []
    assert run_domain(hv, dom).reason == "poweroff"
    rc, pfns, dcount, faults = shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_PEEK)
    assert rc == 0 and pfns.size == 0 and (dcount, faults) == (0, 0)
    assert hv.walker.on_write is None and not hv.machine.paging.hidden


def test_frames_not_written_stay_clean(booted):
    """No false 'all dirty': after ENABLE, a CLEAN holds only what was
    written since; a second CLEAN with nothing run between is empty."""
    hv, dom = boot_writer(booted, x86=[PAGES - 2])
    d = dirty(hv, dom)
    assert len(d) < 40, sorted(d)
    assert dirty(hv, dom) == set()


# --- the guest cannot tell ----------------------------------------------------------------

def test_pagetable_entries_read_back_as_written(booted):
    """The D bits log-dirty takes are the guest's still: the kernel's reads
    (the walker) and the toolstack's copies see every L1 entry as before;
    memory holds them without until OFF writes them back."""
    hv, dom = boot_writer(booted, logdirty=False)
    ft = hv.machine.frames
    l1s = np.flatnonzero((ft.owner == dom.domid) & (ft.type == PageType.l1) & ft.validated)
    rows = hv.machine.memory.u64.reshape(-1, 512)
    before = rows[l1s].copy()
    enable(hv, dom)
    m2p = domctl.map_m2p(hv)
    cr3 = dom.vcpus[0].guest_table
    seen = np.array([[hv.walker.read_u64(cr3, VIRT_BASE + (int(m2p[m]) << 12) + 8 * s)
                      for s in range(512)] for m in l1s.tolist()], dtype=np.uint64)
    assert (seen == before).all()
    # and the toolstack's copies through its foreign mappings (what a save sends)
    assert (np.asarray(domctl.map_foreign_bulk(hv, dom, l1s)) == before).all()
    assert (rows[l1s] != before).any()  # the bits are off in memory
    assert ((before & np.uint64(_PAGE_DIRTY)) != 0).any()
    assert shadow(hv, dom, XEN_DOMCTL_SHADOW_OP_OFF)[0] == 0
    assert (rows[l1s] == before).all()


def test_console_is_the_same_with_log_dirty_on():
    """A run cleaned every 2 ms of virtual time prints what a run without
    log-dirty prints (deterministic clock)."""
    cmdline = "run=hashchain:20:16,dirtier:16:2000:300,counter:5:300000"
    outs = []
    for logdirty in (False, True):
        with booting() as boot:
            hv, dom = boot(make_config(cmdline=cmdline, memory=MEMORY))
            if logdirty:
                enable(hv, dom)
            t = 0
            while dom.is_running:
                t += 2_000_000
                run_domain(hv, dom, until_ns=t)
                if logdirty:
                    dirty(hv, dom)
            outs.append(bytes(dom.console_out))
    assert b"dirtier done" in outs[0]
    assert outs[0] == outs[1]


# --- the property --------------------------------------------------------------------------

@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x86=st.sets(st.sampled_from(CANDIDATES), max_size=8),
       python=st.sets(st.sampled_from(CANDIDATES), max_size=8))
def test_every_written_pfn_is_dirty_and_no_other(x86, python):
    with booting() as boot:
        hv, dom = boot_writer(boot, x86=sorted(x86), python=sorted(python))
        d = dirty(hv, dom)
    written = x86 | python
    assert written <= d
    assert not d & (set(CANDIDATES) - written)
