"""Absent frames (hypervisor/mm/absent.py): a frame marked absent is fetched
by the registered handler the first time anything touches it, by any path,
and never again; the guest cannot tell. Each test evicts frames of a booted
guest (their contents kept aside, garbage left in their place) and touches
them one way."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from hypervisor import domctl
from hypervisor.cpu.vcpu import RSP
from hypervisor.mm.memory import PAGE_SHIFT
from hypervisor.public.vcpu import RUNSTATE_runnable
from hypervisor.toolstack.postcopy import PostcopyPaused
from hypervisor.toolstack.session import run_domain
from tests.conftest import booting, make_config

CMDLINE = "run=hashchain,hashchain:50:32,counter:8:400000,hello,spawner:2:3:5"
GARBAGE = 0xDEADBEEFDEADBEEF
LIMIT_NS = 2_000_000_000


def outcome(console: bytes) -> list[str]:
    return sorted(line for line in console.decode().splitlines()
                  if line.startswith(("hashchain digest", "counter ", "hello", "spawner")))


class Pager:
    """Evicts frames and fetches them back, recording every mfn fetched."""

    def __init__(self, hv) -> None:
        self.hv = hv
        self.kept: dict[int, np.ndarray] = {}
        self.fetched: list[int] = []
        self.calls = 0
        self.drop_in: str | None = None  # the function a fetch fails once under
        domctl.mem_paging_setup(hv, self.fetch)

    def evict(self, dom, mfns) -> None:
        self.dom = dom
        rows = self.hv.machine.memory.u64.reshape(-1, 512)
        for m in np.atleast_1d(mfns).tolist():
            self.kept[m] = rows[m].copy()
            rows[m] = GARBAGE
        domctl.mem_paging_evict(self.hv, dom, np.atleast_1d(mfns))

    def fetch(self, mfns: np.ndarray) -> None:
        if self.drop_in is not None and _called_from(self.drop_in):
            # a post-copy pager whose connection dropped: the domain paused, kept
            self.drop_in = None
            domctl.pausedomain(self.dom)
            raise PostcopyPaused("the connection dropped")
        self.calls += 1
        self.fetched += mfns.tolist()
        domctl.write_absent(self.hv, mfns, np.stack([self.kept[m] for m in mfns.tolist()]))


def _called_from(name: str) -> bool:
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != name:
        frame = frame.f_back
    return frame is not None


@pytest.fixture(scope="module")
def reference():
    with booting() as boot:
        hv, dom = boot(make_config(CMDLINE, vcpus=2))
        return outcome(run_domain(hv, dom, LIMIT_NS).console)


@pytest.fixture
def guest():
    """A guest 3 ms into its run, and a pager for it."""
    with booting() as boot:
        hv, dom = boot(make_config(CMDLINE, vcpus=2))
        run_domain(hv, dom, 3_000_000)
        yield hv, dom, Pager(hv)


def data_frame(hv, dom) -> int:
    """A frame of the domain's that is no pagetable."""
    ft = hv.machine.frames
    owned = ft.owned_by(dom.domid)
    tables = (ft.type[owned] >= 1) & (ft.type[owned] <= 4)
    return int(owned[~tables & ~ft.xenheap[owned]][10])


def stack_frame(hv, v) -> tuple[int, int]:
    """The VCPU's stack address and the frame it is in."""
    va = (v.gpr[RSP] - 8) & ~7  # the word below the stack pointer: mapped
    return va, hv.machine.walker.translate(v.current_table, va) >> PAGE_SHIFT


def test_memory_accessors_fetch_first(guest):
    """The hypervisor's own reads and writes (MachineMemory): the frame comes
    in before the access, once."""
    hv, dom, pager = guest
    mem = hv.machine.memory
    mfn = data_frame(hv, dom)
    pager.evict(dom, mfn)
    assert mem.read((mfn << PAGE_SHIFT) + 8, 16) == pager.kept[mfn][1:3].tobytes()
    mem.write_u64(mfn << PAGE_SHIFT, 7)
    assert mem.read_u64(mfn << PAGE_SHIFT) == 7
    assert (mem.frame(mfn)[1:] == pager.kept[mfn][1:]).all()
    assert pager.fetched == [mfn]


def test_copy_from_guest_fetches_the_leaf(guest):
    """A copy through the guest's pagetables (Vcpu.copy_from_guest, the
    walker the Python kernel reads through too) fetches the frame it lands in."""
    hv, dom, pager = guest
    v = dom.vcpus[0]
    va, mfn = stack_frame(hv, v)
    want = hv.machine.memory.read(mfn << PAGE_SHIFT | (va & 0xFFF), 8)
    pager.evict(dom, mfn)
    assert v.copy_from_guest(va, 8) == want
    assert v.copy_from_guest(va, 8) == want
    assert pager.fetched == [mfn]


def test_walker_fetches_an_absent_table(guest):
    """The software walk reads each level's table: an absent L1 is fetched
    before its entry is read."""
    hv, dom, pager = guest
    v = dom.vcpus[0]
    va, mfn = stack_frame(hv, v)
    l1 = hv.machine.walker.l1e_maddr(v.current_table, va) >> PAGE_SHIFT
    pager.evict(dom, l1)
    assert hv.machine.walker.translate(v.current_table, va) >> PAGE_SHIFT == mfn
    assert pager.fetched == [l1]


def test_foreign_map_fetches_in_one_batch(guest):
    """The toolstack's mapping (map_foreign_bulk) fetches every absent frame
    it maps in one call of the handler."""
    hv, dom, pager = guest
    owned = hv.machine.frames.owned_by(dom.domid)
    mfns = owned[[3, 40, 41]]
    pager.evict(dom, mfns[:2])
    rows = domctl.map_foreign_bulk(hv, dom, mfns)[:]
    assert (rows[0] == pager.kept[int(mfns[0])]).all()
    assert (pager.calls, sorted(pager.fetched)) == (1, sorted(mfns[:2].tolist()))


def test_a_new_allocation_is_no_longer_absent(guest):
    """A frame freed and allocated again is overwritten by its new owner:
    nothing is fetched for it."""
    hv, dom, pager = guest
    ft = hv.machine.frames
    mfn = ft.alloc(dom.domid)
    pager.evict(dom, mfn)
    ft.ref_count[mfn] = 0
    ft.free(mfn)
    assert hv.machine.memory.absent.count == 0 and not pager.fetched


def test_unhandled_absent_frame_is_loud(guest):
    """An absent frame and no handler: the access raises, it never reads garbage."""
    hv, dom, pager = guest
    mfn = data_frame(hv, dom)
    pager.evict(dom, mfn)
    domctl.mem_paging_setup(hv, None)
    with pytest.raises(RuntimeError, match="no handler"):
        hv.machine.memory.read(mfn << PAGE_SHIFT, 8)


def test_the_guest_cannot_tell(guest, reference):
    """Every frame of the running guest evicted, its pagetables too: the
    MMU's walk faults on unmapped chunks (filled, the instruction run again
    in the same slice), the Python kernel reads through the walker, and the
    run ends with the uninterrupted run's results; no frame is fetched twice."""
    hv, dom, pager = guest
    pager.evict(dom, hv.machine.frames.owned_by(dom.domid))
    result = run_domain(hv, dom, LIMIT_NS)
    assert outcome(result.console) == reference
    # this guest's working set shares chunks with its pagetables, so every
    # fill here comes from the walk (test_lazy_restore's guest, on frames a
    # restore scattered, takes the loads, stores and fetches)
    assert hv.machine.memory.absent.faults["walk"]
    assert len(pager.fetched) == len(set(pager.fetched))


def load_store_code(hv, dom, pager):
    """Code in an absent frame that loads from a second and stores to a
    third, each in a chunk of its own with no pagetable in it (so the walk
    finds every table mapped), VCPU 0 at its start. Returns its three frames."""
    v = dom.vcpus[0]
    ft, mem = hv.machine.frames, hv.machine.memory
    owned = ft.owned_by(dom.domid)
    tables = owned[(ft.type[owned] >= 1) & (ft.type[owned] <= 4)]
    spare = owned[~np.isin(owned >> 9, np.unique(tables >> 9))]
    code, load, store = (int(spare[spare >> 9 == c][0]) for c in np.unique(spare >> 9)[:3])
    # three new user mappings in the L1 that maps the stack, in slots it leaves empty
    va_stack, _ = stack_frame(hv, v)
    l1 = hv.machine.walker.l1e_maddr(v.current_table, va_stack) >> PAGE_SHIFT
    free = [s for s in range(512) if not int(mem.frame(l1)[s]) & 1][:3]
    base = va_stack & ~((1 << 21) - 1)
    va = [base + (s << PAGE_SHIFT) for s in free]
    for slot, mfn in zip(free, (code, load, store), strict=True):
        mem.frame(l1)[slot] = (mfn << PAGE_SHIFT) | 0x67  # present, rw, user, A, D
    # movabs rax, [load]; movabs [store + 8], rax; ud2
    insns = (b"\x48\xa1" + va[1].to_bytes(8, "little") + b"\x48\xa3"
             + (va[2] + 8).to_bytes(8, "little") + b"\x0f\x0b")
    mem.write(code << PAGE_SHIFT, insns)
    mem.write_u64(load << PAGE_SHIFT, 0x1234_5678_9ABC_DEF0)
    hv.machine.walker.flush()
    dom.flush_tlbs()
    pager.evict(dom, np.array([code, load, store]))
    v.rip.write(va[0])
    return code, load, store


def test_vcpu_load_store_and_fetch(guest):
    """The x86 paths through Unicorn: the fetch, the load and the store each
    reach the unmapped-memory hook, which fills the chunk, and the
    instruction goes on with the frame's real contents."""
    hv, dom, pager = guest
    v, mem = dom.vcpus[0], hv.machine.memory
    code, load, store = load_store_code(hv, dom, pager)
    v.run(3)
    faults = mem.absent.faults
    assert (faults["fetch"], faults["read"], faults["write"]) == (1, 1, 1)
    assert v.gpr[0] == 0x1234_5678_9ABC_DEF0
    assert mem.read_u64((store << PAGE_SHIFT) + 8) == 0x1234_5678_9ABC_DEF0
    assert sorted(pager.fetched) == sorted((code, load, store))


def test_a_failed_fetch_for_a_load_ends_the_slice_there(guest):
    """The unmapped-memory hook's fetch fails (a post-copy's connection
    dropped): the exception leaves the slice, the domain is not crashed, the
    load is not done and not counted; the next slice runs it."""
    hv, dom, pager = guest
    v, mem = dom.vcpus[0], hv.machine.memory
    code, load, store = load_store_code(hv, dom, pager)
    domctl.write_absent(hv, np.array([code]), pager.kept[code][None])  # the fetch is done
    pager.drop_in = "_on_unmapped"
    rip = v.rip.read()
    with pytest.raises(PostcopyPaused):
        v.run(3)
    assert dom.shutdown_reason is None
    assert (v.rip.read(), v.last_retired, v.gpr[0] == 0x1234_5678_9ABC_DEF0) == (rip, 0, False)
    assert v.run(2) == 2  # the load again, and the store
    assert mem.read_u64((store << PAGE_SHIFT) + 8) == 0x1234_5678_9ABC_DEF0

def test_a_failed_fetch_in_the_walk_pauses(guest, reference):
    """The MMU's walk crosses an unmapped chunk and its fill's fetch fails as
    a post-copy's does when its connection drops: the exception reaches
    run_domain's caller, the domain is paused, not crashed, and the slice
    ended at the access, its time the instructions it retired; given the
    pages and unpaused, the guest ends as the uninterrupted run does."""
    hv, dom, pager = guest
    pager.evict(dom, hv.machine.frames.owned_by(dom.domid))
    pager.drop_in = "fill_walk"
    ends = []
    for v in dom.vcpus:
        v.after_slice = lambda v: ends.append((v, v.clock, v.last_retired))
    with pytest.raises(PostcopyPaused):
        run_domain(hv, dom, LIMIT_NS)
    v, clock, retired = ends[-1]
    assert (v.clock, v.runstate.state, hv.scheduler.current) == (
        clock + retired, RUNSTATE_runnable, None)
    assert pager.drop_in is None and dom.shutdown_reason is None and dom.paused
    for v in dom.vcpus:
        v.after_slice = None
    domctl.unpausedomain(dom)
    run_domain(hv, dom, LIMIT_NS)
    assert outcome(bytes(dom.console_out)) == reference
