"""A guest that can make no progress ends with exit 1 and a one-line reason
instead of running to the time limit. Xen has no such watchdog: this is
pvlab's run loop (scheduler.py states the rule). Nothing can change any more
when no timer (a VCPU's or a host one) is set and every VCPU is blocked or
spins on sched_op yield with nothing else; a toolstack request still to come
is waited for. A guest that sleeps on its timer is never ended."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from hypervisor.scheduler import SPIN_YIELDS
from hypervisor.toolstack.control import Request
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, checkout_env, make_config
from tests.kernels import stall

MS = 1_000_000
LIMIT_NS = 10_000 * MS  # far beyond where the rule fires


@pytest.fixture
def stalling(booted):
    """stalling(mode, vcpus=1): a domain of the stall kernel in that mode."""
    def boot(mode: str, vcpus: int = 1):
        stall.MODE = mode
        return booted(replace(make_config(vcpus=vcpus), kernel="tests.kernels.stall"))
    yield boot
    stall.MODE = "block"


def test_a_vcpu_blocked_with_nothing_to_wake_it_ends_the_run(stalling):
    r = run_domain(*stalling("block"), LIMIT_NS)
    assert r.reason == "hung" and r.virtual_ns < MS
    assert r.why == "every VCPU is blocked with no timer set and no event to come"


def test_a_vcpu_yielding_for_ever_ends_the_run(stalling):
    hv, dom = stalling("yield")
    r = run_domain(hv, dom, LIMIT_NS)
    assert r.reason == "hung", r.reason
    assert r.why == ("1 VCPU(s) yield in a loop and 0 are blocked, with no timer set and no "
                     "event to come")
    assert dom.vcpus[0].idle_yields == SPIN_YIELDS  # the same point in every run
    assert r.virtual_ns < LIMIT_NS


def test_a_request_still_to_come_is_waited_for(stalling):
    """Before, the run ended at once as hung and the request was never made."""
    hv, dom = stalling("block")
    r = run_domain(hv, dom, LIMIT_NS, requests=[Request(5 * MS, command="poweroff")])
    assert any(n.startswith("at 5.000 ms: ") for n in r.notes), r.notes
    assert any("didn't acknowledge" in n for n in r.notes), r.notes
    assert r.reason == "hung" and r.virtual_ns >= 5 * MS


def test_a_guest_that_sleeps_is_not_ended(booted):
    """Its tasks sleep on timers between their work: it waits, it is not hung."""
    r = run_domain(*booted(make_config("run=spawner:1:1:40")), LIMIT_NS)
    assert r.reason == "poweroff" and r.virtual_ns >= 40 * MS
    r = run_domain(*booted(make_config("run=spawner:1:1:400")), 20 * MS)
    assert r.reason == "running" and not r.why


def test_pvlab_run_says_why_in_one_line_and_exits_1(tmp_path):
    cfg = tmp_path / "stall.toml"
    cfg.write_text('name = "stall"\nmemory = 16\nvcpus = 1\n'
                   f'image = "{ROOT / "firmware/guest.elf"}"\n'
                   'kernel = "tests.kernels.stall"\n')
    r = subprocess.run([sys.executable, "-m", "hypervisor", "run", str(cfg), "--until", "10s"],
                       cwd=ROOT, env=checkout_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == ("pvlab: domain stall hung: every VCPU is blocked with no timer set "
                         "and no event to come"), r.stderr
