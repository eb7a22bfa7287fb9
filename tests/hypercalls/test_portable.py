"""The portable cases (tests/hypercalls/portable.py) from real x86 code in a
plain PV test guest (firmware/tests/hcall.elf, XTF-style) and from the Python
kernel path: both give Xen's result for every step, hence the same results."""

from __future__ import annotations

import re

import pytest

from hypervisor.public.xen import DOMID_SELF, Hypercall
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import FIRMWARE
from tests.hypercalls.guest import Guest, run_case
from tests.hypercalls.portable import ANY, CASES, RW, resolve
from tests.hypercalls.x86gen import generate


def expected() -> dict[str, object]:
    return {f"{name}.{n}": step[-1] for name, steps in CASES.items()
            for n, step in enumerate(steps)}


def matches(got: dict[str, int], want: dict[str, object]) -> list[str]:
    return [f"{k}: got {got.get(k)}, want {v}" for k, v in want.items()
            if v is not ANY and got.get(k) != v]


@pytest.fixture
def run_x86(booted):
    """run_x86(): the x86 case guest's results, by case step."""
    def run() -> dict[str, int]:
        hv, dom = booted(DomainConfig("hcall", 16, 1, FIRMWARE / "tests/hcall.elf"))
        r = run_domain(hv, dom)
        assert r.reason == "poweroff", dom.crash_report
        assert audit(hv) == []
        out = r.console.decode()
        assert "Test result: SUCCESS" in out
        rcs = {}
        for m in re.finditer(r"^rc (\S+) ([0-9a-f]{16})$", out, re.M):
            v = int(m.group(2), 16)
            rcs[m.group(1)] = v - (1 << 64) if v >> 63 else v
        return rcs
    return run


def run_python() -> dict[str, int]:
    def interpret(g: Guest) -> dict[str, int]:
        free_pfn = g.nr_pages - 1
        values = {"free_pfn": free_pfn, "free_mfn": g.mfn(free_pfn), "free_va": g.va(free_pfn),
                  "l4_mfn": g.l4_mfn, "xen_frame": 1, "mmio_frame": 1 << 36,
                  "scratch_list": g.scratch + 128, "scratch_list2": g.scratch + 192}
        out = {}
        for name, steps in CASES.items():
            for n, (kind, *args) in enumerate(steps):
                a = [resolve(x, values) for x in args[:-1]] if kind != "memop" else args[:1]
                if kind == "hypercall":
                    rc = g.cpu.hypercall(a[0], *a[1:])
                elif kind == "uvm":
                    rc = g.update_va_mapping(*a)
                elif kind in ("mmuext", "mmuext_fd"):
                    fd = a[3] if kind == "mmuext_fd" else DOMID_SELF
                    rc = g.mmuext1(a[0], a[1], a[2], foreigndom=fd)
                elif kind == "mmu_update":
                    rc = g.mmu_update([(a[0], a[1])])[0]
                elif kind == "memop":
                    rc = memop(g, a[0], [(off, resolve(v, values)) for off, v in args[1]])
                elif kind == "reseat_free":
                    rc = reseat_free(g, a[0], values)
                else:  # query
                    buf = g.scratch
                    g.cpu.write(buf, DOMID_SELF.to_bytes(2, "little"))
                    rc = g.cpu.hypercall(Hypercall.memory_op, a[0], buf)
                out[f"{name}.{n}"] = rc
        return out
    return run_case(interpret)


def memop(g: Guest, cmd: int, words: list[tuple[int, int]]) -> int:
    """memory_op(cmd, scratch) with a zeroed 256-byte scratch holding ``words``."""
    g.cpu.write(g.scratch, bytes(256))
    for off, value in words:
        g.cpu.write_u64(g.scratch + off, value)
    return g.cpu.hypercall(Hypercall.memory_op, cmd, g.scratch)


def reseat_free(g: Guest, offset: int, values: dict[str, int]) -> int:
    """The free pfn takes the frame whose mfn is at scratch+offset: p2m, then
    the guest's mapping at free_va (update_va_mapping's result)."""
    mfn = g.cpu.read_u64(g.scratch + offset)
    free_pfn = values["free_pfn"]
    g.cpu.write_u64(g.si.mfn_list + 8 * free_pfn, mfn)
    values["free_mfn"] = mfn
    return g.update_va_mapping(g.va(free_pfn), (mfn << 12) | RW)


def test_generated_x86_cases_are_up_to_date():
    assert (FIRMWARE / "tests/cases.S").read_text() == generate(), \
        "firmware/tests/cases.S is stale: python -m tests.hypercalls.x86gen > " \
        "firmware/tests/cases.S, then make firmware"


def test_x86_path_gives_xens_results(run_x86):
    assert matches(run_x86(), expected()) == []


def test_python_path_gives_xens_results():
    assert matches(run_python(), expected()) == []


def test_both_paths_agree_step_for_step(run_x86):
    x86, py = run_x86(), run_python()
    assert set(x86) == set(py) == set(expected())
    differ = {k: (x86[k], py[k]) for k in x86 if x86[k] != py[k] and expected()[k] is not ANY}
    assert differ == {}
