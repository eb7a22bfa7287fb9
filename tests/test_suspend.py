"""The suspend path of the guest kernel, from the toolstack's request to the
thaw: control/shutdown watch, freezer, PM phases, stop_machine(xen_suspend)
on vcpu0 with pin-all and the suspend hypercall, cancelled resume (THAW).
The trace is asserted line by line; every task must finish with the digest
it has without the suspend."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hypervisor.public.event_channel import EVTCHNOP_send
from hypervisor.public.sched import SCHEDOP_yield
from hypervisor.public.xen import Hypercall
from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.context import context_of
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.session import run_domain
from hypervisor.toolstack.xenstored import home
from tests.conftest import booting, make_config, sweep
from tests.kview import KernelView

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "suspend-cancel.toml"
LIMIT_NS = 2_000_000_000
STEP = re.compile(r"^\[cpu\d\] (shutdown request|suspend|freezer|PM|xenbus: xs_|xen_suspend|"
                  r"xen_mm_|pre-suspend|post-suspend|testdev|Ignoring)")

# the path of examples/suspend-cancel.toml, line by line (4 VCPUs, 2 test
# devices, two pgds unpinned at the moment of the save)
TRACE = """\
[cpu0] shutdown request: suspend
[cpu0] suspend: freeze_processes
[cpu0] freezer: 4 tasks frozen
[cpu0] freezer: freezable workers frozen (1 runs so far)
[cpu0] PM: dpm_suspend_start(FREEZE)
[cpu0] testdev1: freeze
[cpu0] testdev0: freeze
[cpu0] xenbus: xs_suspend
[cpu0] PM: dpm_suspend_noirq(FREEZE)
[cpu0] testdev1: freeze_noirq
[cpu0] testdev0: freeze_noirq
[cpu0] suspend: stop_machine(xen_suspend) on cpu0
[cpu0] xen_suspend: on cpu0, cpus 1,2,3 spinning with events masked
[cpu0] PM: sysdev_suspend(FREEZE)
[cpu0] xen_mm_pin_all: 2 unpinned pgds pinned (SavePinned)
[cpu0] pre-suspend: start_info's store and console frames are pfns, shared_info unmapped
[cpu0] suspend hypercall (SCHEDOP_shutdown, SHUTDOWN_suspend)
[cpu0] suspend hypercall returned 1 (cancelled or checkpointed)
[cpu0] post-suspend: shared_info mapped, start_info's frames are mfns
[cpu0] xen_mm_unpin_all: 2 SavePinned pgds unpinned
[cpu0] PM: sysdev_resume
[cpu0] PM: dpm_resume_noirq(THAW)
[cpu0] testdev0: thaw_noirq
[cpu0] testdev1: thaw_noirq
[cpu0] xenbus: xs_suspend_cancel
[cpu0] PM: dpm_resume_end(THAW)
[cpu0] testdev0: thaw
[cpu0] testdev1: thaw
[cpu0] freezer: thaw_processes: 4 tasks thawed (workers: 1 runs)
[cpu0] suspend: done
""".splitlines()


def steps(out: str) -> list[str]:
    return [line for line in out.splitlines() if STEP.match(line)]


def shape(trace: list[str]) -> list[str]:
    """The trace without its counts (tasks, worker runs, pgds), which depend on timing."""
    return [re.sub(r"\d+(?= (tasks|runs|unpinned|SavePinned))", "N", line) for line in trace]


def outcome(out: str) -> list[str]:
    """What the tasks printed of their results, in an order-free form."""
    return sorted(line for line in out.splitlines()
                  if line.startswith(("hashchain digest", "counter ", "hello", "spawner")))


def run(cfg, requests=None, seed: int | None = None, hook=None, until: int = LIMIT_NS):
    """Boot, run (``hook`` first sees the machine) and close; the run and the
    closed machine. The module's reference run needs it, so it is no fixture."""
    with booting() as boot:
        hv, dom = boot(cfg, seed=seed)
        if hook is not None:
            hook(hv, dom)
        r = run_domain(hv, dom, until_ns=until,
                       requests=cfg.requests if requests is None else requests)
        return r, hv, dom


@pytest.fixture(scope="module")
def example():
    return load_config(EXAMPLE)


@pytest.fixture(scope="module")
def reference(example):
    """The same guest without the suspend."""
    r, _, _ = run(example, requests=[])
    assert r.reason == "poweroff"
    return outcome(r.console.decode())


def test_the_example_runs_freeze_then_thaw_in_the_order_linux_has(example, reference):
    r, _, _ = run(example)
    out = r.console.decode()
    assert r.reason == "poweroff", out
    assert steps(out) == TRACE
    assert outcome(out) == reference
    # before the pin-all the kernel says what its pgd_list holds: the four
    # tasks alive, two of them held half built or half torn down
    assert "[cpu0] pgd_list: 4 pgds, 2 of them unpinned" in out
    # the toolstack saw the suspend and resumed the domain cancelled
    assert any("suspended; resuming it" in n for n in r.notes)
    m = re.search(r"\((\d+) pages free, (\d+) before the first task\)", out)
    assert m and m.group(1) == m.group(2)


@pytest.mark.parametrize("seed", sweep(range(10), fast=2))
def test_every_task_ends_with_its_digest_under_many_seeds(example, reference, seed: int):
    r, _, _ = run(example, seed=seed)
    out = r.console.decode()
    assert r.reason == "poweroff", out
    trace = steps(out)
    assert trace[0] == "[cpu0] shutdown request: suspend" and trace[-1] == "[cpu0] suspend: done"
    assert "[cpu0] xen_suspend: on cpu0, cpus 1,2,3 spinning with events masked" in trace
    assert outcome(out) == reference


@pytest.mark.parametrize("at_ms", sweep([1, 3, 6, 9, 15, 21, 26], fast=2))
def test_a_suspend_at_any_moment_changes_no_result(example, reference, at_ms: int):
    r, _, _ = run(example, requests=[parse_request(f"{at_ms}ms suspend")])
    out = r.console.decode()
    assert r.reason == "poweroff", out
    assert "[cpu0] suspend: done" in out and "FAILURE" not in out
    pinned = re.search(r"xen_mm_pin_all: (\d+) unpinned", out).group(1)
    assert f"xen_mm_unpin_all: {pinned} SavePinned pgds unpinned" in out
    assert outcome(out) == reference


def test_an_event_arriving_at_every_point_changes_nothing(example, reference):
    def noisy(hv, dom):
        n = [0]

        def throw(vcpu, nr, args, rc) -> None:
            # at every spin and every notification: the store's, the console's, an IPI
            if not (nr == Hypercall.sched_op and args[0] == SCHEDOP_yield
                    or nr == Hypercall.event_channel_op and args[0] == EVTCHNOP_send):
                return
            n[0] += 1
            ports = [p for p, port in enumerate(dom.evtchn.ports) if port.state >= 2]
            dom.evtchn.set_pending(ports[n[0] % len(ports)])
        hv.after_hypercall = throw

    r, _, _ = run(example, hook=noisy)
    out = r.console.decode()
    assert r.reason == "poweroff", out
    assert shape(steps(out)) == shape(TRACE)
    assert outcome(out) == reference


def test_held_pgds_are_pinned_for_the_save_and_unpinned_after_it(example):
    """xen_mm_unpin_all unpins exactly the SavePinned pgds: after the suspend the
    held construction's and teardown's pgds are unpinned again."""
    from guestos.mm import page_flags
    from guestos.pgd import PG_SAVEPINNED
    from guestos.suspend import suspend_state
    from tests.kview import pgds
    seen = {}

    def look(hv, dom):
        def after(vcpu, nr, args, rc) -> None:
            if "after" not in seen and b"suspend: done" in dom.console_out:
                view = KernelView(hv, dom)
                seen["after"] = pgds(view)
                seen["savepinned"] = [p for p in pgds(view) if page_flags(view, p) & PG_SAVEPINNED]
                seen["save_pinned"] = suspend_state(view).save_pinned
        hv.after_hypercall = after

    r, _, _ = run(example, hook=look)
    assert r.reason == "poweroff"
    assert seen["save_pinned"] == 2
    assert sorted(seen["after"].values()).count(False) == 2  # the two held pgds
    assert seen["savepinned"] == []


@pytest.mark.parametrize("device,phase,expect", [
    # freezing goes last-registered first: testdev2 froze, testdev1 fails, testdev2 thaws
    (2, "freeze", ["[cpu0] PM: dpm_suspend_start(FREEZE)",
                   "[cpu0] testdev2: freeze",
                   "[cpu0] testdev1: freeze",
                   "[cpu0] PM: device testdev1 failed to freeze: error -16",
                   "[cpu0] testdev2: thaw",
                   "[cpu0] suspend: dpm_suspend_start failed; aborted"]),
    (1, "freeze_noirq", ["[cpu0] PM: dpm_suspend_noirq(FREEZE)",
                         "[cpu0] testdev2: freeze_noirq",
                         "[cpu0] testdev1: freeze_noirq",
                         "[cpu0] testdev0: freeze_noirq",
                         "[cpu0] PM: device testdev0 failed to freeze_noirq: error -16",
                         "[cpu0] testdev1: thaw_noirq",
                         "[cpu0] testdev2: thaw_noirq",
                         "[cpu0] suspend: dpm_suspend_noirq failed; aborted",
                         "[cpu0] xenbus: xs_suspend_cancel",
                         "[cpu0] PM: dpm_resume_end(THAW)",
                         "[cpu0] testdev0: thaw",
                         "[cpu0] testdev1: thaw",
                         "[cpu0] testdev2: thaw"]),
])
def test_a_device_that_fails_to_freeze_aborts_the_suspend_cleanly(device, phase, expect):
    cfg = make_config(f"run=hashchain:60:32,counter:10:300000 testdevs=3 pmfail={device}:{phase}",
                      vcpus=2)
    r, _, _ = run(cfg, requests=[parse_request("3ms suspend")])
    out = r.console.decode()
    assert r.reason == "poweroff", out
    trace = steps(out)
    start = trace.index(expect[0])
    assert trace[start:start + len(expect)] == expect
    assert trace[start + len(expect)].startswith("[cpu0] freezer: thaw_processes")
    assert "suspend hypercall" not in out and not any("suspended" in n for n in r.notes)
    assert "counter 10" in out and "hashchain digest" in out


def test_devices_registered_in_reverse_are_frozen_in_reverse_of_that():
    """The PM core's order is the registration order, not the devices' names:
    with testdev.order=reverse, testdev0 is registered last and frozen first,
    and pmfail=1 names testdev2, the first one registered after the console."""
    cfg = make_config("run=hashchain:60:32,counter:10:300000 testdevs=3 "
                      "testdev.order=reverse pmfail=1:freeze", vcpus=2)
    r, _, _ = run(cfg, requests=[parse_request("3ms suspend")])
    trace = steps(r.console.decode())
    start = trace.index("[cpu0] PM: dpm_suspend_start(FREEZE)")
    assert trace[start + 1:start + 7] == ["[cpu0] testdev0: freeze",
                                          "[cpu0] testdev1: freeze",
                                          "[cpu0] testdev2: freeze",
                                          "[cpu0] PM: device testdev2 failed to freeze: error -16",
                                          "[cpu0] testdev1: thaw",
                                          "[cpu0] testdev0: thaw"]


def test_an_unknown_registration_order_is_said_and_the_devices_go_forward():
    cfg = make_config("run=hashchain:60:32 testdevs=2 testdev.order=backwards", vcpus=1)
    r, _, _ = run(cfg, requests=[parse_request("1ms suspend")])
    out = r.console.decode()
    assert "[cpu0] testdev: order 'backwards' unknown (one of forward, reverse): forward" in out
    trace = steps(out)
    start = trace.index("[cpu0] PM: dpm_suspend_start(FREEZE)")
    assert trace[start + 1:start + 3] == ["[cpu0] testdev1: freeze", "[cpu0] testdev0: freeze"]


def test_a_kernel_without_save_restore_refuses_and_the_toolstack_gives_up():
    cfg = make_config("run=spawner:1:1:700 nosaverestore", vcpus=2)  # sleeps 0.7 s
    r, _, _ = run(cfg, requests=[parse_request("2ms suspend")])
    out = r.console.decode()
    assert r.reason == "poweroff", out
    assert ("[cpu0] Ignoring shutdown request: suspend: this kernel is built without "
            "save/restore support (option nosaverestore: CONFIG_XEN_SAVE_RESTORE=n)") in out
    assert "freeze_processes" not in out
    assert "guest didn't acknowledge suspend, cancelling request" in r.notes


def test_the_kernel_says_what_it_supports_in_xenstore(booted):
    for cmdline, suspend in (("run=hello", True), ("run=hello nosaverestore", False)):
        hv, dom = booted(make_config(cmdline))
        run_domain(hv, dom, until_ns=500_000)
        base = home(dom.domid) + "/control/"
        assert context_of(hv).store.read(base + "feature-poweroff") == b"1"
        assert (base + "feature-suspend" in context_of(hv).store.nodes) is suspend
        assert [w.path for w in context_of(hv).store.watches] == ["control/shutdown"]


@pytest.mark.parametrize("command,reason", [("poweroff", "poweroff"), ("halt", "poweroff"),
                                            ("reboot", "reboot")])
def test_poweroff_halt_and_reboot_requests(command: str, reason: str):
    cfg = make_config("run=counter:50:400000,counter:50:400000", vcpus=2)
    r, hv, dom = run(cfg, requests=[parse_request(f"3ms {command}")])
    out = r.console.decode()
    assert r.reason == reason, out
    assert f"[cpu0] shutdown request: {command}" in out
    assert "counter 50" not in out  # it stopped the tasks half way


def test_an_unknown_request_is_ignored_and_left_in_place():
    cfg = make_config("run=hashchain:20:16", vcpus=1)
    r, _, _ = run(cfg, requests=[parse_request("1ms control/shutdown=sleep")])
    out = r.console.decode()
    assert r.reason == "poweroff"
    assert "[cpu0] Ignoring shutdown request: sleep" in out



class PokingView(KernelView):
    """A KernelView that may write too: for driving one kernel function by hand."""

    def write(self, va: int, data: bytes) -> None:
        self._walker.write(self._table, va, data)

    def write_u64(self, va: int, value: int) -> None:
        self._walker.write_u64(self._table, va, value)


def test_a_frozen_worker_does_not_run_and_runs_again_after_the_thaw(booted):
    from guestos.freezer import periodic
    from guestos.workqueue import run_workqueue, workqueue
    hv, dom = booted(make_config("run=spawner:1:1:100 worker=10", vcpus=1))
    run_domain(hv, dom, until_ns=25_000_000)
    view = PokingView(hv, dom)
    k, wq = periodic(view), workqueue(view)
    runs = k.runs
    assert runs >= 2  # it has been running on the tick
    due = k.next
    wq.frozen = 1
    run_workqueue(view, due + 1)
    assert k.runs == runs  # frozen: it stays put
    wq.frozen = 0
    run_workqueue(view, due + 1)
    assert k.runs == runs + 1
