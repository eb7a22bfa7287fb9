"""The guest kernel's tasks: several per VCPU and across VCPUs, preempted on
the timer tick; pgds built unpinned, pinned before first use, unpinned and
freed at exit, all on the pgd_list; yield, sleep, spawn; a faulting task
killed while the others go on; no page leaked."""

from __future__ import annotations

import re

import pytest

from guestos.mm import pfn_to_mfn
from hypervisor.mm.frames import PageType
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config, sweep
from tests.kview import KernelView, pgds, tasks
from tests.reference import hashchain_line

MS = 1_000_000


@pytest.fixture
def console(booted):
    """console(cmdline, vcpus=1, seed=1, memory=16): a guest's whole run, which
    must power off; its console."""
    def run(cmdline: str, vcpus: int = 1, seed: int = 1, memory: int = 16) -> str:
        hv, dom = booted(make_config(cmdline, vcpus=vcpus, seed=seed, memory=memory))
        r = run_domain(hv, dom)
        assert r.reason == "poweroff", r.console.decode() + str(dom.crash_report)
        return r.console.decode()
    return run


def no_leak(out: str) -> bool:
    m = re.search(r"\((\d+) pages free, (\d+) before the first task\)", out)
    return m is not None and m.group(1) == m.group(2)


def test_tasks_on_one_cpu_are_preempted_on_the_timer_tick(console):
    out = console("run=hashchain:60:64,counter:2:1000")
    # the hashchain runs first and for longer than a tick: the counter gets in
    assert out.index("hashchain start") < out.index("counter 1") \
        < out.index("hashchain digest")
    assert hashchain_line(60, 64) in out and no_leak(out)


@pytest.mark.parametrize("seed", sweep(range(10), fast=2))
def test_eight_tasks_on_four_vcpus_under_many_seeds(console, seed: int):
    chains = [(3, 4), (4, 3), (2, 8), (5, 2)]
    cmd = "run=" + ",".join(f"hashchain:{r}:{p}" for r, p in chains) \
        + ",counter:3:50000,counter:4:30000,hello,spawner:2:2:1"
    out = console(cmd, vcpus=4, seed=seed)
    for r, p in chains:
        assert hashchain_line(r, p) in out
    assert out.count("counter 2\n") == 2 + 2 and out.count("counter 3\n") == 2  # + children
    assert len(re.findall(r"task \d+ exited with code 0", out)) == 8 + 2
    assert {f"[cpu{n}] task" for n in range(4)} <= {m[:11] for m in re.findall(
        r"\[cpu\d\] task", out)}
    assert no_leak(out)


def test_spawn_starts_children_that_run_and_exit(console):
    out = console("run=spawner:3:2:5")
    assert [int(p) for p in re.findall(r"spawner: started pid (\d+)", out)] == [2, 3, 4]
    assert out.count("counter 2\n") == 3
    assert "task 1 spawned counter as task 4" in out and no_leak(out)


def test_sleep_lasts_its_virtual_time(booted):
    r = run_domain(*booted(make_config("run=spawner:1:1:40")))
    assert r.reason == "poweroff" and r.virtual_ns >= 40 * MS


def test_a_faulting_task_is_killed_and_the_others_go_on(console):
    out = console("run=fault,counter:3:1000,hello", vcpus=2)
    assert re.search(r"killed task 1: page fault at 0xffffffff80000000", out)
    assert "task 1 exited with code 139" in out
    assert "counter 3\n" in out and "hello from user space" in out and no_leak(out)


@pytest.mark.parametrize("hold", ["build", "exit"])
def test_a_held_construction_or_teardown_leaves_an_unpinned_pgd_on_the_list(booted,
                                                                           hold: str):
    """The guest option the save path needs: at 15 ms task 1's pgd is on the
    pgd_list, unpinned (and Xen agrees: not an L4, not pinned); later it goes on."""
    hv, dom = booted(make_config(f"run=counter:2:1000,counter:40:400000 hold={hold}:1:30"))
    run_domain(hv, dom, until_ns=15 * MS)
    view = KernelView(hv, dom)
    by_pid = {t["pid"]: t for t in tasks(view)}
    listed = pgds(view)
    held = by_pid[1]["pgd"]
    assert listed[held] is False  # on the list, unpinned
    assert listed[by_pid[2]["pgd"]] is True  # the running task's is pinned
    mfn = pfn_to_mfn(view, held)
    ft = hv.machine.frames
    assert not ft.pinned[mfn] and ft.type[mfn] != PageType.l4  # a plain page to Xen
    r = run_domain(hv, dom)
    out = r.console.decode()
    assert r.reason == "poweroff", out
    assert f"task 1: {'construction' if hold == 'build' else 'teardown'} held" in out
    assert no_leak(out)


def test_every_live_pgd_is_on_the_list_and_pinned_when_nothing_is_held(booted):
    hv, dom = booted(make_config("run=counter:30:100000,counter:30:100000", vcpus=2))
    run_domain(hv, dom, until_ns=5 * MS)
    view = KernelView(hv, dom)
    live = tasks(view)
    assert len(live) == 2
    assert pgds(view) == {t["pgd"]: True for t in live}


def test_an_idle_cpu_gets_its_own_timer_ticks(booted):
    """Regression: an upcall on one cpu cleared every pending bit of the shared
    bitmap, taking other cpus' timer events, so an idle cpu never woke again."""
    from guestos.time import tick_cpu
    # the counter outlives the run (it powered off at 30 ms, just before cpu1's
    # third tick in the schedules that woke cpu1 a little late)
    hv, dom = booted(make_config("run=counter:5:5000000", vcpus=2))
    assert run_domain(hv, dom, until_ns=45 * MS).reason == "running"
    view = KernelView(hv, dom)
    assert tick_cpu(view, 1).ticks >= 3 and tick_cpu(view, 0).ticks >= 3
