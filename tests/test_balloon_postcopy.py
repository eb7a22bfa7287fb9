"""The balloon during post-copy (hypervisor/toolstack/balloonrace.py): under
many schedules of pages arriving, the guest inflating, deflating, taking a
frame back and writing, and post-copy's end, no frame is lost, freed twice,
freed while absent or handed to the guest with another's data, under the
drop policy (QEMU's), the reconcile policy, and with no post-copy at all;
the account closes: the domain's frames are its mapped pages and what the
policy left. Without the inhibit, post-copy loses a page and the harness says
so. The rules of reconcile one by one, and a real guest ballooning during a
lazy restore under both policies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor import domctl
from hypervisor.devices.balloon import BalloonError
from hypervisor.public.xen import INVALID_MFN
from hypervisor.toolstack import balloonctl
from hypervisor.toolstack.balloonrace import STEPS, Harness

EXAMPLES = 100
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
schedules = st.lists(st.tuples(st.sampled_from(STEPS), st.integers(0, 63)), min_size=1,
                     max_size=30)


def run_schedule(policy: str | None, postcopy: bool, steps) -> Harness:
    """Every step, the invariants after each and after the release."""
    h = Harness(policy, postcopy)
    inflates_inhibited = 0
    try:
        for name, i in [*steps, ("release", 0)]:
            inflates_inhibited += name == "inflate" and h.inhibited and bool(h.mapped())
            getattr(h, name)(i)
            assert h.violations() == [], (name, i)
        assert h.dom.tot_pages == len(h.mapped()) + len(h.left)  # the closing account
        m = h.bal.metrics
        if policy == "drop":
            assert m.dropped == inflates_inhibited and m.queued == 0
        if policy == "reconcile":
            assert h.left == set() and m.dropped == 0
            assert m.reconciled + m.kept <= inflates_inhibited
        assert h.log.count == m.freed
        return h
    finally:
        h.close()


@SETTINGS
@given(schedules)
def test_drop_loses_no_frame_and_leaves_its_dropped_inflates_with_the_domain(steps):
    run_schedule("drop", True, steps)


@SETTINGS
@given(schedules)
def test_reconcile_loses_no_frame_and_leaves_nothing(steps):
    run_schedule("reconcile", True, steps)


@SETTINGS
@given(schedules)
def test_without_post_copy_the_balloon_frees_at_once_and_loses_nothing(steps):
    run_schedule(None, False, steps)


# --- the race the inhibit exists for ------------------------------------------------------

def test_without_the_inhibit_a_page_arriving_after_its_frame_was_freed_is_caught():
    """Post-copy with no inhibit: the guest inflates a pfn whose page has not
    arrived (its frame is freed at once, while absent), deflates it (the
    fresh frame is the same one, the allocator's last freed) and writes it;
    then the page arrives and the pager places it by its table, over the
    guest's new data. The harness reports both."""
    h = Harness(None, postcopy=True)
    try:
        h.inflate(3)
        assert h.violations() == [f"mfn {h.ballooned[3]:#x} freed while absent"]
        h.deflate(0)
        h.arrive(3)
        found = h.violations()
        assert "pfn 0x3 holds pfn 0x3's version 1, not its own version 2" in found
    finally:
        h.close()


def test_the_same_schedule_under_either_policy_loses_nothing():
    for policy in ("drop", "reconcile"):
        run_schedule(policy, True, [("inflate", 3), ("deflate", 0), ("arrive", 3)])


# --- reconcile's rules ----------------------------------------------------------------------

@pytest.fixture
def reconcile():
    h = Harness("reconcile", postcopy=True)
    yield h
    h.close()


def test_an_inflate_of_a_page_that_arrived_meanwhile_is_applied_at_the_release(reconcile):
    h = reconcile
    h.inflate(5)
    mfn = h.ballooned[5]
    assert domctl.mem_paging_absent(h.hv, np.array([mfn]))[0]  # inflated while absent
    h.arrive(5)
    assert h.bal.metrics.freed == 0 and h.dom.tot_pages == 48
    h.release()
    assert h.bal.metrics.reconciled == 1 and h.dom.tot_pages == 47
    assert h.violations() == []


def test_inflate_then_deflate_of_one_frame_is_nothing(reconcile):
    h = reconcile
    h.inflate(5)
    mfn = h.ballooned[5]
    h.reuse(0)
    h.release()
    assert h.p2m[5] == mfn and h.bal.metrics.freed == 0 and h.bal.metrics.kept == 1
    assert h.violations() == []


def test_a_frame_the_guest_uses_again_is_not_freed(reconcile):
    """Its pfn back in the M2P, without a deflate naming it."""
    h = reconcile
    h.inflate(5)
    h.arrive(5)
    mfn = h.ballooned[5]
    domctl.mmu_machphys_update(h.hv, h.dom, np.array([mfn]), np.array([5]))
    assert balloonctl.postcopy_release(h.dom).endswith("0 queued frames freed, 1 kept")
    assert h.bal.metrics.freed == 0 and h.bal.metrics.kept == 1


def test_a_frame_inflated_twice_is_freed_once(reconcile):
    h = reconcile
    h.inflate(5)
    mfn = h.ballooned[5]
    h.bal.inflate_frame(mfn)  # named again: queued again
    assert len(h.bal.queue) == 2
    h.release()
    assert h.log.count == 1 and h.bal.metrics.reconciled == 1
    assert h.violations() == []


def test_a_frame_still_absent_at_the_release_is_never_freed(reconcile):
    """Post-copy is over when the release comes, so no frame is absent then;
    should one be, it stays the domain's (and its pager may still fill it)."""
    h = reconcile
    h.inflate(5)
    mfn = h.ballooned[5]
    assert "0 queued frames freed, 1 kept" in balloonctl.postcopy_release(h.dom)
    assert domctl.mem_paging_absent(h.hv, np.array([mfn]))[0]
    assert h.log.count == 0 and h.log.wrong == []
    assert int(domctl.dump_frames(h.hv, h.dom).mfns.tolist().count(mfn)) == 1


def test_the_host_starts_nothing_while_inhibited_and_says_post_copy_runs(reconcile):
    with pytest.raises(BalloonError, match="post-copy is running"):
        reconcile.bal.set_target(8)


def test_drop_neither_frees_nor_changes_the_frame(tmp_path):
    h = Harness("drop", postcopy=True)
    try:
        h.inflate(5)
        mfn = h.ballooned[5]
        assert h.bal.queue == [] and h.hv.machine.m2p[mfn] == 5  # untouched, as QEMU
        line = balloonctl.postcopy_release(h.dom)
        assert "policy drop: 1 inflated frames were left with the domain" in line
        assert h.p2m[5] == INVALID_MFN and h.dom.tot_pages == 48  # accounted, not lost
    finally:
        h.close()
