"""The portable cases (tests/hypercalls/portable.py) from real x86 code in a
plain PV test guest (firmware/tests/hcall.elf, XTF-style) and from the Python
kernel path: both give Xen's result for every step, hence the same results.
The x86 guest checks each result itself and reports its verdict as XTF does."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import pytest

import hypervisor.core
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import FIRMWARE
from tests.hypercalls.guest import run_case
from tests.hypercalls.kinds import KINDS, NEEDS, Ctx
from tests.hypercalls.portable import ANY, CASES
from tests.hypercalls.x86gen import generate


def expected(skipped: Collection[str] = ()) -> dict[str, object]:
    return {f"{name}.{n}": step[-1] for name, steps in CASES.items() if name not in skipped
            for n, step in enumerate(steps) if step[0] != "needs"}


def matches(got: dict[str, int], want: dict[str, object]) -> list[str]:
    return [f"{k}: got {got.get(k)}, want {v}" for k, v in want.items()
            if v is not ANY and got.get(k) != v]


@dataclass
class X86Run:
    rcs: dict[str, int]   # every step's result, by case step
    verdict: str          # the last line's "Test result:"
    console: str


@pytest.fixture
def run_x86(booted):
    """run_x86(vcpus=2): the x86 case guest's run, which must power off with
    the invariants holding."""
    def run(vcpus: int = 2) -> X86Run:
        hv, dom = booted(DomainConfig("hcall", 16, vcpus, FIRMWARE / "tests/hcall.elf"))
        r = run_domain(hv, dom)
        assert r.reason == "poweroff", dom.crash_report
        assert audit(hv) == []
        out = r.console.decode()
        rcs = {}
        for m in re.finditer(r"^rc (\S+) ([0-9a-f]{16})$", out, re.M):
            v = int(m.group(2), 16)
            rcs[m.group(1)] = v - (1 << 64) if v >> 63 else v
        last = out.rstrip("\n").rsplit("\n", 1)[-1]
        assert last.startswith("Test result: "), out[-400:]
        return X86Run(rcs, last.removeprefix("Test result: "), out)
    return run


def interpret(c: Ctx) -> tuple[dict[str, int], set[str]]:
    """Every case from the Python kernel path, as the x86 guest runs them: the
    results by case step, and the cases skipped for a need the domain lacks."""
    out: dict[str, int] = {}
    skipped: set[str] = set()
    for name, steps in CASES.items():
        for n, (kind, *args) in enumerate(steps):
            if kind == "needs":
                what, count = args
                if not NEEDS[what].python(c, count):
                    skipped.add(name)
                    break
                continue
            out[f"{name}.{n}"] = KINDS[kind].python(c, args[:-1])
    return out, skipped


def run_python(vcpus: int = 2) -> tuple[dict[str, int], set[str]]:
    return run_case(lambda g: interpret(Ctx(g)), vcpus=vcpus)


def test_generated_x86_cases_are_up_to_date():
    assert (FIRMWARE / "tests/cases.S").read_text() == generate(), \
        "firmware/tests/cases.S is stale: python -m tests.hypercalls.x86gen > " \
        "firmware/tests/cases.S, then make firmware"


def test_x86_path_gives_xens_results(run_x86):
    run = run_x86()
    assert matches(run.rcs, expected()) == []
    assert run.verdict == "SUCCESS", run.console


def test_python_path_gives_xens_results():
    rcs, skipped = run_python()
    assert skipped == set()
    assert matches(rcs, expected()) == []


def test_both_paths_agree_step_for_step(run_x86):
    x86, (py, _) = run_x86().rcs, run_python()
    assert set(x86) == set(py) == set(expected())
    differ = {k: (x86[k], py[k]) for k in x86 if x86[k] != py[k] and expected()[k] is not ANY}
    assert differ == {}


def test_x86_guest_reports_failure_with_the_case_step_and_both_results(
        monkeypatch: pytest.MonkeyPatch, run_x86):
    """The guest checks each result itself: a hypervisor that answers one
    hypercall otherwise (here xen_version says 4.18) makes the verdict FAILURE,
    and the line names the case, the step, the result and the wanted one."""
    real = hypervisor.core.do_xen_version

    def older(vcpu: object, cmd: int, *args: int) -> int:
        rc = real(vcpu, cmd, *args)
        return (4 << 16) | 18 if rc == (4 << 16) | 19 else rc

    monkeypatch.setattr(hypervisor.core, "do_xen_version", older)
    run = run_x86()
    assert run.verdict == "FAILURE"
    assert f"FAILURE: xen_version.0: got {(4 << 16) | 18}, wanted {(4 << 16) | 19}\n" \
        in run.console


def test_the_worst_verdict_wins(monkeypatch: pytest.MonkeyPatch, run_x86):
    """A failure and a later skip: FAILURE (XTF's set_status keeps the worst)."""
    real = hypervisor.core.do_xen_version
    monkeypatch.setattr(hypervisor.core, "do_xen_version",
                        lambda vcpu, cmd, *args: real(vcpu, cmd, *args) ^ (cmd == 0))
    run = run_x86(vcpus=1)
    assert "SKIP: vcpu_op_second_vcpu: needs 2 VCPUs\n" in run.console
    assert run.verdict == "FAILURE"


def test_x86_guest_reports_skip_for_a_case_that_needs_a_second_vcpu(run_x86):
    """With one VCPU the cases that need a second are skipped, on both paths
    alike, and the verdict is SKIP, never SUCCESS (XTF's rule)."""
    run = run_x86(vcpus=1)
    py, skipped = run_python(vcpus=1)
    assert skipped, "no case needs a second VCPU"
    assert run.verdict == "SKIP"
    for name in skipped:
        assert f"SKIP: {name}: needs 2 VCPUs\n" in run.console
    assert set(run.rcs) == set(py) == set(expected(skipped))
    assert matches(run.rcs, expected(skipped)) == []
