"""The balloon during post-copy (hypervisor/toolstack/balloonrace.py): under
many schedules of pages arriving, the guest inflating, deflating, taking a
frame back and writing, and post-copy's end, no frame is lost, freed twice,
freed while absent or handed to the guest with another's data, under the
drop policy (QEMU's), the reconcile policy, and with no post-copy at all;
the account closes: the domain's frames are its mapped pages and what the
policy left. Without the inhibit, post-copy loses a page and the harness says
so. The rules of reconcile one by one, and a real guest ballooning during a
lazy restore and during a post-copy migration under both policies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor import domctl
from hypervisor.devices.balloon import Balloon, BalloonError
from hypervisor.public.xen import INVALID_MFN
from hypervisor.toolstack import balloonctl
from hypervisor.toolstack.balloonrace import STEPS, FreeLog, Harness
from hypervisor.toolstack.context import audit, context_of
from hypervisor.toolstack.lazyrestore import restore_image_lazy
from hypervisor.toolstack.precopy import PrecopyOptions
from hypervisor.toolstack.session import Observer, run_domain, save_domain
from tests.test_balloon import balloon_config, requests
from tests.test_postcopy import migrate_here

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


def test_balloon_uninhibit_counts_the_inhibits_left_after_its_own():
    h = Harness("drop", postcopy=True)
    try:
        balloonctl.apply(h.hv, h.dom, "balloon-inhibit", "")
        line = balloonctl.apply(h.hv, h.dom, "balloon-uninhibit", "")
        assert line == "balloon inhibit released (1 left); still inhibited"
        line = balloonctl.apply(h.hv, h.dom, "balloon-uninhibit", "")
        assert line.startswith("balloon inhibit released (0 left); policy drop: ")
    finally:
        h.close()


# --- a real guest ballooning during a lazy restore -------------------------------------------

def _p2m_mapped(hv, dom) -> set[int]:
    """The frames the guest's own p2m list names."""
    frames, size = context_of(hv).p2m_lists()[dom.domid]
    p2m = np.asarray(domctl.map_foreign_bulk(hv, dom, list(frames))).reshape(-1)[:size]
    return set(p2m[p2m != INVALID_MFN].astype(np.int64).tolist())


def _reservation(hv, dom) -> set[int]:
    """The domain's frames, shared_info (the hypervisor's) left out."""
    d = domctl.dump_frames(hv, dom)
    return set(d.mfns[~d.xenheap].tolist())


@pytest.mark.parametrize("policy", ["drop", "reconcile"])
def test_a_guest_ballooning_during_a_lazy_restore_ends_with_every_frame_accounted_for(
        booted, tmp_path, policy):
    """Saved with a 4 MiB balloon target under the guest's ``deflate``
    policy, restored lazily (QEMU's fast snapshot load is post-copy from a
    file) with the inhibit held until the last page is in: the restore
    refills the balloon while pages are still absent, a checkpoint's freeze
    deflates it and its thaw inflates it again, all while inhibited; then
    the release, a mem-set that deflates it all, and the guest's digest.
    Frames: none freed twice nor while absent; the domain's frames are its
    p2m's and, under drop, the inflates it dropped. (A lazily restored guest
    with a balloon crashed before: the walker asked the absent frames about
    the device's register page, beyond RAM.)"""
    cfg = balloon_config("run=hashchain virtio_balloon.policy=deflate", memory=16, stats=0)
    cfg = dataclasses.replace(cfg, maxmem=24,
                              balloon=dataclasses.replace(cfg.balloon, postcopy=policy))
    hv, dom = booted(cfg)
    run_domain(hv, dom, 2_000_000, requests=requests("1ms mem-set 12"))
    path = tmp_path / "g.img"
    save_domain(hv, dom, str(path), 3_000_000)
    hv2, dom2, _, image = restore_image_lazy(path)
    try:
        # one frame a slice asked of the background pass (its block's other
        # frames come with it): pages are still absent when the balloon refills
        hv2.machine.memory.absent.background = 1
        bal = domctl.find_device(dom2, Balloon)
        log = FreeLog(hv2)
        log.watch(bal)
        balloonctl.postcopy_inhibit(dom2)
        notes: list[str] = []
        absent_at: dict[str, int] = {}

        def look(t_ns: int) -> None:
            if bal.inhibits and "inflate" not in absent_at and bal.actual:
                absent_at["inflate"] = domctl.mem_paging_stats(hv2)[0]
            if bal.inhibits and domctl.mem_paging_stats(hv2)[0] == 0:
                notes.append(balloonctl.postcopy_release(dom2))
        t0 = max(v.clock for v in dom2.vcpus)
        r = run_domain(hv2, dom2, None, observer=Observer(50_000, look, t0 + 50_000),
                       note=notes.append, requests=requests(
                           f"{(t0 + 400_000) // 1000}us checkpoint",
                           f"{(t0 + 3_000_000) // 1000}us mem-set 16"))
    finally:
        image.close()
    out = r.console.decode()
    assert r.reason == "poweroff", out[-2000:]
    assert "hashchain digest" in out
    assert absent_at["inflate"] > 0  # the balloon refilled while pages were still absent
    m = bal.metrics
    assert log.wrong == [] and log.count == m.freed
    mapped, owned = _p2m_mapped(hv2, dom2), _reservation(hv2, dom2)
    assert mapped <= owned
    if policy == "drop":
        assert m.dropped == 2 * 1024 and m.dropped_deflates == 1024
        assert len(owned - mapped) == m.dropped  # accounted, not lost: QEMU's leftover
    else:
        assert m.queued == 3 * 1024 and m.reconciled == 2 * 1024 and m.kept == 0
        assert owned == mapped
    released = [i for i, n in enumerate(notes) if "balloon inhibit released" in n]
    mem_set = [i for i, n in enumerate(notes) if "mem-set 16: balloon target 0 pages" in n]
    assert released and mem_set and released[0] < mem_set[0], notes
    assert bal.actual == 0 and audit(hv2) == []


# --- a real guest ballooning during a post-copy migration ------------------------------------

@pytest.mark.parametrize("policy", ["drop", "reconcile"])
def test_a_guest_ballooning_during_a_postcopy_migration_ends_with_every_frame_accounted_for(
        policy):
    """Ballooned by 4 MiB under the guest's ``deflate`` policy, then a pure
    post-copy migration: the suspend's freeze deflates the balloon and the
    resume at the destination inflates it again while its pages are still
    at the source, under the inhibit the destination takes at the start;
    the release when the last page is in applies the domain's policy. Then
    a mem-set deflates it all and the guest's digest ends the run. Frames at
    the destination: none freed twice nor while absent; the domain's frames
    are its p2m's and, under drop, the inflates it dropped."""
    cfg = balloon_config("run=hashchain virtio_balloon.policy=deflate", memory=16, stats=0)
    cfg = dataclasses.replace(cfg, name="mig", maxmem=24,
                              balloon=dataclasses.replace(cfg.balloon, postcopy=policy))
    seen: dict = {}

    def started(rx) -> None:
        bal = domctl.find_device(rx.dom, Balloon)
        seen["bal"], seen["log"] = bal, FreeLog(rx.hv)
        seen["log"].watch(bal)
        assert bal.inhibits == 1 and domctl.mem_paging_stats(rx.hv)[0] > 0
        # the host starts no balloon operation while post-copy runs
        assert "refused" in balloonctl.apply(rx.hv, rx.dom, "mem-set", "8")

    got = migrate_here(PrecopyOptions(postcopy=True, max_iterations=0), at_ns=3_000_000,
                       cfg=cfg, requests=tuple(requests("1ms mem-set 12")), started=started)
    hv2, dom2, bal, log = got["hv"], got["dom"], seen["bal"], seen["log"]
    assert got["out"].ok, got["said"]
    released = [line for line in got["heard"] if "balloon inhibit released" in line]
    assert released and bal.inhibits == 0, got["heard"]
    assert "hashchain digest" in got["console"], got["console"][-2000:]
    m = bal.metrics
    assert log.wrong == [] and log.count == m.freed
    mapped, owned = _p2m_mapped(hv2, dom2), _reservation(hv2, dom2)
    assert mapped <= owned
    if policy == "drop":
        assert m.dropped == 1024  # the resume's inflate, acknowledged, not acted on
        assert len(owned - mapped) == m.dropped  # accounted, not lost: QEMU's leftover
    else:
        assert m.queued == 1024 and m.reconciled == 1024 and m.kept == 0
        assert owned == mapped
    assert audit(hv2) == []


def test_a_second_release_says_what_its_own_inhibit_dropped():
    """The release's line counts the requests of its own inhibit, not the
    device's whole life (a second post-copy into the same domain)."""
    h = Harness("drop", postcopy=True)
    try:
        h.inflate(5)
        assert "1 inflated frames were left" in balloonctl.postcopy_release(h.dom)
        balloonctl.postcopy_inhibit(h.dom)
        h.inflate(6)
        h.inflate(7)
        assert "2 inflated frames were left" in balloonctl.postcopy_release(h.dom)
    finally:
        h.close()
