"""The frame-accounting invariants hold after building a domain and after
every hypercall of a whole run: every frame has one owner, M2P and p2m agree,
a validated table maps only what its domain may and no pagetable writable,
and the type and reference counts equal a recount from the pagetables."""

from __future__ import annotations

from hypervisor.public.xen import MMUEXT_PIN_L4_TABLE
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config
from tests.hypercalls.guest import RO, run_case


def test_invariants_after_every_hypercall(booted):
    hv, dom = booted(make_config("run=hello,hello", vcpus=2))
    assert audit(hv) == []
    seen = []

    def check(vcpu, nr, args, rc):
        problems = audit(hv)
        assert problems == [], f"after hypercall {nr}{tuple(args)} -> {rc}: {problems}"
        seen.append(nr)

    hv.after_hypercall = check
    r = run_domain(hv, dom)
    assert r.reason == "poweroff"
    assert len(seen) > 30


def test_audit_catches_a_wrong_count(booted):
    hv, dom = booted(make_config())
    ft = hv.machine.frames
    mfn = int(ft.owned_by(dom.domid)[0])
    ft.ref_count[mfn] += 1
    assert any("ref_count" in p for p in audit(hv))


def test_audit_catches_a_wrong_linear_count(booted):
    """linear_pt_count (Xen's inc_linear_entries / inc_linear_uses) is
    recounted from the tables' linear entries too."""
    hv, dom = booted(make_config())
    ft = hv.machine.frames
    ft.linear[int(ft.owned_by(dom.domid)[0])] = 1
    assert any("linear" in p for p in audit(hv))


def test_audit_recounts_a_linear_entry_left_in_place():
    """The current L4 maps a pinned L4 linearly at poweroff: run_case's audit
    recounts both tables' linear_pt_count and finds them as kept."""
    def case(g):
        _, l4b = g.table()
        assert g.mmuext1(MMUEXT_PIN_L4_TABLE, l4b) == 0
        return g.mmu_update([((g.l4_mfn << 12) + 8 * 300, (l4b << 12) | RO)])
    assert run_case(case) == (0, 1)


def test_destroying_a_domain_frees_every_frame(booted):
    hv, dom = booted(make_config())
    free_before = hv.machine.frames.nr_free
    owned = len(hv.machine.frames.owned_by(dom.domid))
    hv.destroy_domain(dom)
    assert hv.machine.frames.nr_free == free_before + owned
    assert audit(hv) == []
