"""Property-based tests (hypothesis): random sequences of mmu_update,
update_va_mapping, mmuext_op and memory_op thrown at a domain from its own
kernel. After every hypercall the frame-accounting invariants hold (the
audit recounts everything from the pagetables): the hypervisor never crashes,
never lets the domain map a frame it may not, never leaves a writable mapping
of a pagetable, and its counts equal a full recount.

One run uses a fixed seed; the other a random one, which hypothesis prints
(with the failing sequence) if it finds a counterexample."""

from __future__ import annotations

import struct
from dataclasses import replace

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from hypervisor.public.memory import XENMEM_decrease_reservation, XENMEM_populate_physmap
from hypervisor.public.xen import (
    MMUEXT_CLEAR_PAGE,
    MMUEXT_NEW_USER_BASEPTR,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_UNPIN_TABLE,
    Hypercall,
)
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import booting, make_config
from tests.hypercalls.guest import RO, RW, Guest
from tests.kernels import probe

POOL = 10
# targets an entry may point at: a pool frame, or something it must not map
SPECIAL = ("l4", "xen", "mmio")

op = st.one_of(
    st.tuples(st.just("entry"), st.integers(0, POOL - 1), st.integers(0, 511),
              st.one_of(st.integers(0, POOL - 1), st.sampled_from(SPECIAL)),
              st.sampled_from([0, RO, RW, RW | 0x80, RO | 0x10])),
    st.tuples(st.just("kmap"), st.integers(0, POOL - 1), st.booleans()),
    st.tuples(st.just("pin"), st.integers(0, POOL - 1), st.integers(1, 4)),
    # the natural pins of the starting tree: pool k as an L(k+1)
    st.tuples(st.just("pin"), st.integers(0, 3)).map(lambda t: (t[0], t[1], t[1] + 1)),
    st.tuples(st.just("unpin"), st.integers(0, POOL - 1)),
    st.tuples(st.just("user_base"), st.one_of(st.integers(0, POOL - 1), st.none())),
    st.tuples(st.just("decrease"), st.integers(0, POOL - 1)),
    st.tuples(st.just("populate"), st.integers(0, POOL - 1)),
    st.tuples(st.just("clear"), st.integers(0, POOL - 1)),
)


def run_ops(ops: list[tuple]) -> None:
    calls = []

    def check(vcpu, nr, args, rc):
        problems = audit(hv)
        calls.append(nr)
        assert problems == [], f"after hypercall {nr} {tuple(hex(a) for a in args)} -> {rc}"

    def fn(cpu):
        g = Guest(cpu)
        pool = [g.alloc() for _ in range(POOL)]
        mfns = [m for _, m in pool]
        # start from a valid tree, read-only in the kernel's mapping: pool 3 is
        # an L4 -> pool 2 (L3) -> pool 1 (L2) -> pool 0 (L1) -> pool 6..9 (data)
        for level_pfn, slot, target, flags in ((pool[3][0], 0, mfns[2], RW),
                                               (pool[2][0], 0, mfns[1], RW),
                                               (pool[1][0], 0, mfns[0], RW),
                                               *((pool[0][0], k, mfns[6 + k], RW)
                                                 for k in range(4))):
            g.write_entry(level_pfn, slot, (target << 12) | flags)
        for k in range(4):
            g.set_ro(pool[k][0])
        hv.after_hypercall = check
        for o in ops:
            kind, i = o[0], o[1]
            pfn, _ = pool[i] if isinstance(i, int) else (None, None)
            if kind == "entry":
                _, _, slot, target, flags = o
                tmfn = {"l4": g.l4_mfn, "xen": 1, "mmio": 1 << 36}.get(target) \
                    if isinstance(target, str) else mfns[target]
                g.mmu_update([((mfns[i] << 12) + 8 * slot, (tmfn << 12) | flags if flags else 0)])
            elif kind == "kmap":
                g.update_va_mapping(g.va(pfn), (mfns[i] << 12) | (RO if o[2] else RW))
            elif kind == "pin":
                g.mmuext1(MMUEXT_PIN_L1_TABLE + o[2] - 1, mfns[i])
            elif kind == "unpin":
                g.mmuext1(MMUEXT_UNPIN_TABLE, mfns[i])
            elif kind == "user_base":
                g.mmuext1(MMUEXT_NEW_USER_BASEPTR, 0 if i is None else mfns[i])
            elif kind in ("decrease", "populate"):
                buf = g.scratch + 0x400
                value = mfns[i] if kind == "decrease" else pfn
                g.cpu.write(buf + 64, struct.pack("<Q", value))
                g.cpu.write(buf, struct.pack("<QQIIH6x", buf + 64, 1, 0, 0, 0x7FF0))
                op_nr = XENMEM_decrease_reservation if kind == "decrease" \
                    else XENMEM_populate_physmap
                if kind == "decrease":
                    # as Linux's balloon: the p2m forgets the pfn before the frame goes
                    g.cpu.write_u64(g.si.mfn_list + 8 * pfn, (1 << 64) - 1)
                if g.cpu.hypercall(Hypercall.memory_op, op_nr, buf) == 1 and kind == "populate":
                    mfns[i] = struct.unpack("<Q", g.cpu.read(buf + 64, 8))[0]
                    g.cpu.write_u64(g.si.mfn_list + 8 * pfn, mfns[i])
            elif kind == "clear":
                g.mmuext1(MMUEXT_CLEAR_PAGE, mfns[i])
        # put the kernel's own state back where it can power off: no user base
        g.mmuext1(MMUEXT_NEW_USER_BASEPTR, 0)
        hv.after_hypercall = None

    probe.PROBE = fn
    try:
        with booting() as boot:  # a machine per example, closed after it
            hv, dom = boot(replace(make_config(), kernel="tests.kernels.probe"))
            r = run_domain(hv, dom)
            assert r.reason == "poweroff", dom.crash_report
            assert audit(hv) == []
    finally:
        probe.PROBE = None


SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@seed(20261122)
@SETTINGS
@given(st.lists(op, min_size=5, max_size=40))
def test_invariants_hold_fixed_seed(ops):
    run_ops(ops)


@SETTINGS
@given(st.lists(op, min_size=5, max_size=40))
def test_invariants_hold_random_seed(ops):
    run_ops(ops)


def test_a_frame_is_handed_out_zeroed_the_first_time_and_every_time_after():
    """A frame never handed out is not zeroed again (the machine's memory is
    a fresh anonymous mapping: zeros); one that was used and freed is zeroed
    when it is taken again, by alloc, alloc_many and alloc_contiguous alike."""
    import numpy as np

    from hypervisor.mm.frames import FrameTable
    from hypervisor.mm.memory import MachineMemory
    ft = FrameTable(MachineMemory(1024), seed=3)
    rows = ft.memory.u64.reshape(ft.nr_frames, -1)
    first = [ft.alloc(1), *ft.alloc_many(1, 8), *ft.alloc_contiguous(1, 2)]
    assert not rows[first].any() and not ft.pristine[first].any()
    for mfn in first:
        rows[mfn] = 0xDEAD
        ft.ref_count[mfn] = 0
        ft.free(mfn)
    again = [ft.alloc(1), *ft.alloc_many(1, ft.nr_free - 1)]
    assert set(first) <= set(again) and not rows[again].any()
    assert not ft.pristine[np.array(again)].any()
