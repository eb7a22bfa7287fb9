"""Booting the example guest: the kernel's boot lines, a user program at CPL3,
a clean poweroff; several VCPUs brought up with vcpu_op."""

from __future__ import annotations

import pytest

from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config


@pytest.fixture
def run(booted):
    """run(cfg): boot the configuration and run it to its end."""
    return lambda cfg: run_domain(*booted(cfg))


def test_hello_boots_runs_and_powers_off(run):
    r = run(make_config("run=hello"))
    out = r.console.decode()
    assert r.reason == "poweroff", out
    assert "pvlab guest kernel booting on xen-3.0-x86_64" in out
    assert "hello from user space\n" in out
    assert "[cpu0] task 1 exited with code 0\n" in out


def test_secondary_vcpus_come_up_and_run_programs(run):
    r = run(make_config("run=hello,hello", vcpus=2))
    out = r.console.decode()
    assert r.reason == "poweroff", out
    assert "bringing up vcpu1: ok" in out
    assert "[cpu0] task 2: hello on cpu1" in out
    assert "[cpu1] task 2 exited with code 0" in out
    assert out.count("hello from user space\n") == 2


def test_user_pagetables_are_pinned_and_released(booted):
    """The task's user L4 is pinned while it runs and unpinned when it exits,
    so after poweroff no pinned L4 is left but the builder's."""
    cfg = make_config("run=hello")
    hv, dom = booted(cfg)
    run_domain(hv, dom)
    ft = hv.machine.frames
    owned = ft.owner == dom.domid
    assert int((ft.pinned & owned).sum()) == 1  # the bootstrap L4


def test_unknown_program_is_reported_and_the_others_run(run):
    r = run(make_config("run=nosuch,hello"))
    out = r.console.decode()
    assert r.reason == "poweroff", out
    assert "cannot start nosuch: error -2" in out and "hello from user space" in out


def test_kernel_panic_crashes_the_domain_with_a_report(monkeypatch, run):
    import guestos.boot
    from guestos.mm import KernelPanic

    def broken(cmdline):
        raise KernelPanic("a test made the command line unreadable")

    monkeypatch.setattr(guestos.boot, "parse_holds", broken)
    r = run(make_config("run=hello"))
    assert r.reason == "crash"
    assert "Kernel panic - not syncing: KernelPanic: a test made" in r.console.decode()
    assert "kernel oops in guestos.boot.start_kernel" in r.domain.crash_report
