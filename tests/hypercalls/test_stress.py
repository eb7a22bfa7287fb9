"""The pagetable stress guest (firmware/tests/stress.S): address spaces built,
pinned, used, unpinned and freed in varying shapes from x86 code, some left
built but unpinned, with the frame-accounting invariants checked after every
hypercall."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from hypervisor.mm.frames import PageType
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import FIRMWARE, ROOT


@pytest.fixture
def run_stress(booted):
    """run_stress(cmdline, seed=1, audit_every_call=False, until_ns=None): the
    stress guest's run, the invariants holding at its end (and after every
    hypercall if asked); its console and what the audits saw."""
    def run(cmdline: str, seed: int = 1, audit_every_call: bool = False,
            until_ns: int | None = None) -> tuple[str, dict[str, int]]:
        cfg = replace(DomainConfig("stress", 16, 1, FIRMWARE / "tests/stress.elf"),
                      cmdline=cmdline, seed=seed)
        hv, dom = booted(cfg)
        seen: dict[str, int] = {"calls": 0, "max_pinned_l4": 0, "max_unpinned_tables": 0}

        def check(vcpu, nr, args, rc) -> None:
            problems = audit(hv, p2m=False)
            assert problems == [], \
                f"after hypercall {nr}{tuple(map(hex, args))} -> {rc}: {problems}"
            ft = hv.machine.frames
            mine = ft.owner == dom.domid
            l4 = mine & (ft.type == PageType.l4)
            seen["calls"] += 1
            seen["max_pinned_l4"] = max(seen["max_pinned_l4"], int((l4 & ft.pinned).sum()))

        if audit_every_call:
            hv.after_hypercall = check
        r = run_domain(hv, dom, until_ns)
        assert r.reason == ("poweroff" if until_ns is None else "time"), dom.crash_report
        assert audit(hv) == []
        return r.console.decode(), seen
    return run


def totals(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 16)
            for m in re.finditer(r"^stress: ([a-z ]+?) ([0-9a-f]{16})$", out, re.M)}


@pytest.mark.slow
def test_invariants_hold_after_every_hypercall_over_a_long_run(run_stress):
    out, seen = run_stress("1000", audit_every_call=True)
    assert out.rstrip().endswith("Test result: SUCCESS"), out
    t = totals(out)
    assert t["iterations"] == 1000
    # every kind of step happened, many times
    assert t["trees pinned and used"] > 700 and t["trees left unpinned"] > 60
    assert t["frames ballooned out and back"] > 200
    assert seen["calls"] > 10_000
    assert seen["max_pinned_l4"] >= 1 + 5  # the bootstrap L4 and most slots at once


def test_results_do_not_depend_on_the_machine_frames(run_stress):
    """Different hypervisor seeds shuffle the frames differently; what the guest
    reads through its tables is the same."""
    a, _ = run_stress("200", seed=1)
    b, _ = run_stress("200", seed=2)
    assert "Test result: SUCCESS" in a
    assert totals(a) == totals(b)


def test_generator_seed_changes_the_shapes(run_stress):
    a, _ = run_stress("100 1")
    b, _ = run_stress("100 2")
    assert totals(a)["checksum"] != totals(b)["checksum"]


def test_frames_shows_l1_to_l4_and_pinned_tables_of_the_stress_guest(capsys):
    from hypervisor.toolstack.cli import main
    assert main(["frames", str(ROOT / "examples/stress.toml"), "--at", "2ms",
                 "--summary"]) == 0
    out = capsys.readouterr().out
    assert "invariants: all hold" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.strip().split()[:1] in (["L1"], ["L2"], ["L3"], ["L4"])}
    assert set(rows) == {"L1", "L2", "L3", "L4"}
    assert int(rows["L4"][1]) >= 2  # pinned L4s: the bootstrap one and built trees
    assert all(int(rows[t][0]) >= int(rows["L4"][1]) for t in ("L3", "L2", "L1"))
