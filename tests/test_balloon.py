"""The balloon from the guest's side: the example runs hashchain to the
reference digest while ballooned down and back with a checkpoint between; the
frame-accounting invariants hold after every balloon operation; each restore
policy works across a save and a restore in a fresh process, and the 2012
discard code's leak is shown; events racing the freeze are harmless under many
seeds; an inhibit drops inflates or queues them and frees each once when it lifts;
a device still live is not saved."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from hypervisor.devices.balloon import Balloon
from hypervisor.public.memory import XENMEM_populate_physmap
from hypervisor.public.xen import Hypercall
from hypervisor.toolstack.config import BalloonConfig, load_config
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.save import SaveError
from hypervisor.toolstack.session import run_domain, save_domain
from tests.conftest import ROOT, booting, checkout_env, make_config

EXAMPLE = ROOT / "examples" / "balloon.toml"
REFERENCE_DIGEST = "hashchain digest ef1035920e1827ec"  # examples/smp.toml's hashchain
PAGES_PER_MIB = 256
POWER_OFF = re.compile(r"powering off \((\d+) pages free, (\d+) before the first task\)")


def balloon_config(cmdline: str, memory: int = 32, vcpus: int = 2, seed: int = 1,
                   stats: int = 5_000_000):
    cfg = make_config(cmdline, vcpus=vcpus, memory=memory, seed=seed)
    return dataclasses.replace(cfg, balloon=BalloonConfig(stats))


def requests(*texts: str):
    return [parse_request(t) for t in texts]


def free_pages_line(console: str) -> tuple[int, int]:
    m = POWER_OFF.search(console)
    assert m, console[-2000:]
    return int(m.group(1)), int(m.group(2))


def device(dom):
    t = dom.devices[0]
    assert isinstance(t.device, Balloon)
    return t, t.device


# --- the example ------------------------------------------------------------------------

@pytest.mark.slow
def test_the_example_balloons_to_half_and_back_with_a_checkpoint_and_the_same_digest(booted):
    cfg = load_config(EXAMPLE)
    hv, dom = booted(cfg)
    t, bal = device(dom)
    r = run_domain(hv, dom, None, requests=cfg.requests)
    out = r.console.decode()
    assert r.reason == "poweroff", out[-3000:]
    assert REFERENCE_DIGEST in out
    notes = "\n".join(r.notes)
    assert "mem-set 16: balloon target 4096 pages" in notes
    assert "checkpoint 1:" in notes and "image written" in notes
    assert "actual 4096 pages; the guest has 16.0 of its 32 MiB" in notes  # the 9 ms stats
    assert "virtio_balloon: thawed" in out
    assert bal.metrics.freed >= 4096 and bal.actual == 0 and bal.num_pages == 0
    free, before = free_pages_line(out)
    assert free == before  # every page came back
    assert dom.tot_pages == 32 * PAGES_PER_MIB
    assert audit(hv) == []


@pytest.mark.slow
def test_pvlab_run_of_the_example_exits_0_with_the_reference_digest():
    p = subprocess.run([sys.executable, "-m", "hypervisor", "run", str(EXAMPLE)], cwd=ROOT,
                       env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert REFERENCE_DIGEST in p.stdout
    assert "[toolstack] checkpoint 1:" in p.stdout


# --- the invariants after every balloon operation ------------------------------------------

def test_frame_accounting_holds_after_every_balloon_operation(booted):
    """After each request the device serves and after each populate_physmap
    the driver makes, the frame-accounting invariants hold (one owner a frame,
    counts equal a recount, no writable mapping of a pagetable; the p2m check
    too: the driver updates its p2m before it tells the host)."""
    cfg = balloon_config("run=hashchain", memory=16)
    hv, dom = booted(cfg)
    t, bal = device(dom)
    problems: list[str] = []
    checks = [0]
    serve = bal.handle_queue

    def checked_serve(q):
        serve(q)
        checks[0] += 1
        problems.extend(audit(hv))

    def after(vcpu, nr, args, rc):
        if nr == Hypercall.memory_op and args[0] == XENMEM_populate_physmap:
            checks[0] += 1
            problems.extend(audit(hv))

    bal.handle_queue = checked_serve
    hv.after_hypercall = after
    r = run_domain(hv, dom, None, requests=requests("1ms mem-set 8", "4ms mem-set 12",
                                                    "7ms mem-set 16"))
    assert r.reason == "poweroff", r.console.decode()[-2000:]
    assert checks[0] >= 24 and problems == []  # 8 inflates, 8 deflates, 8 populates
    assert bal.metrics.freed == 8 * PAGES_PER_MIB
    assert bal.metrics.deflated == 8 * PAGES_PER_MIB
    assert audit(hv) == []


# --- the policies across a save and a restore in a fresh process -----------------------------

RESTORE_SCRIPT = """
import sys
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import run_domain
hv, dom, _ = restore_image(sys.argv[1])
bal = dom.devices[0].device
print("RESTORED", dom.tot_pages, bal.num_pages, bal.actual)
t = max(v.clock for v in dom.vcpus) // 1_000_000 + 3
r = run_domain(hv, dom, None, requests=[parse_request(f"{t}ms mem-set 32")])
print(r.console.decode())
print("END", r.reason, dom.tot_pages, bal.num_pages, bal.actual, audit(hv))
"""


@pytest.fixture
def save_ballooned(booted):
    """save_ballooned(tmp_path, policy, extra="", seed=1): a guest ballooned
    down to half and saved under ``policy``; the image."""
    def save(tmp_path: Path, policy: str, extra: str = "", seed: int = 1) -> Path:
        cfg = balloon_config(f"run=hashchain virtio_balloon.policy={policy} {extra}".strip(),
                             seed=seed)
        hv, dom = booted(cfg)
        r = run_domain(hv, dom, 3_000_000, requests=requests("1ms mem-set 16"))
        assert r.reason == "running"
        assert dom.tot_pages == 16 * PAGES_PER_MIB  # ballooned down by half
        path = tmp_path / f"{policy}.img"
        result, _ = save_domain(hv, dom, str(path), 4_000_000)
        assert f"policy {policy}" in result.console.decode()
        return path
    return save


def restore_elsewhere(path: Path) -> tuple[list[str], str]:
    p = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, str(path)], cwd=ROOT,
                       env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    restored = next(line for line in lines if line.startswith("RESTORED")).split()
    end = next(line for line in lines if line.startswith("END")).split(None, 5)
    return restored + end, p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["discard", "deflate", "keep"])
def test_a_guest_ballooned_to_half_saved_restored_and_ballooned_back_finishes(save_ballooned,
                                                                              tmp_path, policy):
    path = save_ballooned(tmp_path, policy)
    fields, out = restore_elsewhere(path)
    _, tot, num_pages, actual, _, reason, end_tot, end_target, end_actual, problems = fields
    assert reason == "poweroff", out[-3000:]
    assert REFERENCE_DIGEST in out
    # the image carries the host's target: each policy comes back to it
    assert int(num_pages) == 16 * PAGES_PER_MIB
    if policy == "deflate":
        assert int(tot) == 32 * PAGES_PER_MIB and int(actual) == 0  # deflated at freeze
    else:
        assert int(tot) == 16 * PAGES_PER_MIB and int(actual) == 16 * PAGES_PER_MIB
    if policy == "discard":
        assert "discarded the balloon's 4096 pages (fresh frames" in out
    if policy == "keep":
        assert "restored: 4096 pages in the balloon" in out
    # ballooned back up: everything is the guest's again, nothing leaked
    assert (int(end_tot), int(end_target), int(end_actual)) == (32 * PAGES_PER_MIB, 0, 0)
    free, before = free_pages_line(out)
    assert free == before
    assert problems == "[]"


@pytest.mark.slow
def test_the_2012_discard_code_leaks_what_the_fixed_discard_gives_back(save_ballooned,
                                                                        tmp_path):
    """The lab of docs/labs/balloon-s4.md: balloonbug=leak counts the pages
    back as RAM but never gives them frames nor frees them."""
    path = save_ballooned(tmp_path, "discard", "balloonbug=leak")
    fields, out = restore_elsewhere(path)
    assert fields[5] == "poweroff" and REFERENCE_DIGEST in out
    assert "never freed: LEAKED" in out
    free, before = free_pages_line(out)
    assert before - free == 16 * PAGES_PER_MIB  # half the guest, gone
    assert int(fields[6]) == 16 * PAGES_PER_MIB  # the domain never got those frames back


# --- events racing the freeze ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RaceEnd:
    """How a run ended: what the assertions look at, small enough to pass up
    from a forked child."""
    step: int                  # the register access its event came at (0: none)
    steps: int                 # the register accesses of the freeze and the thaw
    reason: str
    why: str                   # the crash report and the console's tail
    digest: bool
    problems: list[str]
    ring_errors: int
    free: tuple[int, int]
    balloon: tuple[int, int]   # num_pages, actual


def _race_ends(seed: int, policy: str, first: int, stride: int) -> list[RaceEnd]:
    """A checkpoint at 3 ms; the run has no event of its own, but at the
    device's register accesses ``first``, ``first + stride``, ... between the
    start of the freeze and the end of the thaw it forks a child (os.fork
    copies the machine) in which the host changes the target, returns the
    stats buffer and fires the event channel, all at once, and which runs to
    the end. The children one at a time, then the run itself, last; so each
    step's run shares everything before its step with the others."""
    with booting() as boot:
        return _race(boot, seed, policy, first, stride)


def _race(boot, seed: int, policy: str, first: int, stride: int) -> list[RaceEnd]:
    cfg = balloon_config(f"run=hashchain:40:32 virtio_balloon.policy={policy}", memory=16,
                         seed=seed, stats=1_000_000)
    hv, dom = boot(cfg)
    t, bal = device(dom)
    seen, step, armed, ends, child = [0], [0], [False], [], []
    mmio_write, mmio_read = t.mmio_write, t.mmio_read

    def event():
        if not bal.inhibits:
            bal.num_pages = 2 * PAGES_PER_MIB if bal.num_pages else 4 * PAGES_PER_MIB
            t.config_changed()
        bal._poll()
        dom.evtchn.set_pending(t.port)

    def inject():
        if armed[0] and not child:
            seen[0] += 1
            if seen[0] >= first and (seen[0] - first) % stride == 0:
                fork = _fork()
                if fork.child:
                    child.append(fork.fd)
                    step[0] = seen[0]
                    event()
                else:
                    ends.append(fork.end(seen[0]))

    def write(offset, size, value):
        mmio_write(offset, size, value)
        inject()

    def read(offset, size):
        value = mmio_read(offset, size)
        inject()
        return value

    t.mmio_write, t.mmio_read = write, read

    def arm(vcpu, nr, args, rc):
        out = dom.console_out
        armed[0] = b"suspend: freeze_processes" in out and b"virtio_balloon: thawed" not in out

    hv.after_hypercall = arm
    r = None
    try:
        r = run_domain(hv, dom, None, requests=requests("1ms mem-set 12", "3ms checkpoint",
                                                        "4500us mem-set 16"))
    finally:
        if child:   # never back into pytest from a child
            _child_exit(child[0], lambda: _end(r, hv, bal, step[0], seen[0]))
    died = [e for e in ends if not isinstance(e, RaceEnd)]
    assert not died, died[0]
    return [*ends, _end(r, hv, bal, 0, seen[0])]


def _end(r, hv, bal: Balloon, step: int, seen: int) -> RaceEnd:
    out = r.console.decode()
    m = POWER_OFF.search(out)
    return RaceEnd(step, seen, r.reason, f"{r.domain.crash_report}\n{out[-2000:]}",
                   "hashchain digest" in out, audit(hv), bal.transport.metrics.ring_errors,
                   (int(m.group(1)), int(m.group(2))) if m else (-1, -2),
                   (bal.num_pages, bal.actual))


@dataclasses.dataclass
class _Fork:
    child: bool
    fd: int
    pid: int

    def end(self, step: int) -> RaceEnd | str:
        """The parent's side: the child's RaceEnd, or why there is none."""
        with os.fdopen(self.fd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(self.pid, 0)
        end = pickle.loads(data) if data else f"died with status {status:#x}"
        return end if isinstance(end, RaceEnd) else f"step {step}: the child {end}"


def _fork() -> _Fork:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        return _Fork(True, w, 0)
    os.close(w)
    return _Fork(False, r, pid)


def _child_exit(fd: int, end: Callable[[], RaceEnd]) -> NoReturn:
    """Send the child's RaceEnd (or why there is none) and end the child."""
    try:
        try:
            data = pickle.dumps(end())
        except BaseException:  # noqa: BLE001 - the parent reports it
            data = pickle.dumps("raised:\n" + traceback.format_exc())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    finally:
        os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("half", [0, 1])
@pytest.mark.parametrize("policy", ["discard", "deflate"])
@pytest.mark.parametrize("seed", [1, 2])
def test_an_event_at_each_step_of_the_freeze_is_harmless(seed, policy, half):
    """Every register access of the freeze and the thaw gets its event, the
    odd ones under seed 1, the even ones under seed 2; those in two halves
    (every other one), so that a parallel run spreads them over the cores."""
    *ends, free_run = _race_ends(seed, policy, seed + 2 * half, 4)
    assert free_run.reason == "poweroff" and free_run.steps > 20, free_run.why
    assert [e.step for e in ends] == list(range(seed + 2 * half, free_run.steps + 1, 4))
    for e in [*ends, free_run]:
        assert e.reason == "poweroff", f"step {e.step}: {e.why}"
        assert e.digest and e.problems == [], (e.step, e.problems)
        assert e.ring_errors == 0, e.step
        free, before = e.free
        assert free == before, e.step  # the last target (16 MiB) reached, nothing lost
        assert e.balloon == (0, 0), e.step


def test_a_request_on_a_queue_the_freeze_deleted_is_not_sent_and_says_so(booted,
                                                                          monkeypatch):
    """A thaw that deflates before the device is set up again (a discard
    written with leak_balloon, say) finds no deflate queue: the request is
    not sent, and the console says why (before, it went silently)."""
    from guestos.drivers import virtio_balloon as vb

    def deflate_first(cpu, dev):
        vb.leak_balloon(cpu, 16)
        return vb.virtballoon_thaw(cpu, dev)
    monkeypatch.setattr(vb.virtio_balloon_driver, "thaw", deflate_first)
    hv, dom = booted(balloon_config("run=hashchain virtio_balloon.policy=discard", memory=16))
    t, bal = device(dom)
    r = run_domain(hv, dom, None, requests=requests("1ms mem-set 12", "3ms checkpoint"))
    out = r.console.decode()
    assert r.reason == "poweroff", out[-2000:]
    assert "a request on queue 1, which the freeze deleted: not sent" in out
    assert bal.metrics.deflated == 0 and audit(hv) == []


def test_notifies_and_events_after_the_reset_are_discarded_and_counted(booted):
    cfg = balloon_config("run=hashchain", memory=16)
    hv, dom = booted(cfg)
    t, bal = device(dom)
    r = run_domain(hv, dom, None, requests=requests("1ms mem-set 12", "4ms checkpoint"))
    assert r.reason == "poweroff"
    assert t.metrics.resets >= 2  # probe and freeze
    before = t.metrics.notifies_discarded
    t.mmio_write(0x070, 4, 0)   # a reset, then a stray notify on every queue
    for q in range(3):
        t.mmio_write(0x050, 4, q)
    assert t.metrics.notifies_discarded == before + 3


# --- the inhibit ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["drop", "reconcile"])
def test_an_inflate_while_inhibited_is_acknowledged_and_follows_the_policy(booted, policy):
    """drop (QEMU's): no frame freed, during or after; reconcile: queued and
    freed once when the last inhibit goes."""
    cfg = balloon_config("run=hashchain", memory=16)
    cfg = dataclasses.replace(cfg, balloon=dataclasses.replace(cfg.balloon, postcopy=policy))
    hv, dom = booted(cfg)
    t, bal = device(dom)
    seen: dict[str, int] = {}

    def peek(vcpu, nr, args, rc):
        if bal.inhibits and bal.actual and "during" not in seen:
            seen["during"] = dom.tot_pages
    hv.after_hypercall = peek
    r = run_domain(hv, dom, None, requests=requests(
        "1ms mem-set 12", "1ms balloon-inhibit", "2ms mem-set 8", "3ms balloon-inhibit",
        "4ms balloon-uninhibit", "5ms balloon-stats", "6ms balloon-uninhibit",
        "7ms balloon-uninhibit"))
    notes = "\n".join(r.notes)
    assert r.reason == "poweroff"
    # the guest's inflate went through while inhibited: acknowledged, no frame freed
    assert seen["during"] == 16 * PAGES_PER_MIB
    assert "mem-set refused: ballooning is inhibited (post-copy is running" in notes
    assert f"post-copy policy {policy}; inhibited (1, " in notes  # the 5 ms stats
    assert "balloon-uninhibit refused: the balloon is not inhibited" in notes
    m = bal.metrics
    assert m.refused == 0 and m.freed == m.reconciled
    if policy == "drop":
        assert m.dropped == 4 * PAGES_PER_MIB and m.reconciled == 0
        assert "policy drop: 1024 inflated frames were left with the domain" in notes
        assert dom.tot_pages == 16 * PAGES_PER_MIB  # what QEMU leaves: not freed, not lost
    else:
        assert m.queued == 4 * PAGES_PER_MIB == m.reconciled
        assert "policy reconcile: 1024 queued frames freed, 0 kept" in notes
        assert dom.tot_pages == 12 * PAGES_PER_MIB  # the target of before the inhibit
    assert audit(hv) == []


# --- saving -------------------------------------------------------------------------------

def test_a_device_the_guest_left_live_is_not_saved_and_the_guest_runs_on(tmp_path,
                                                                         monkeypatch, booted):
    from guestos.drivers import virtio_balloon
    monkeypatch.setattr(virtio_balloon.virtio_balloon_driver, "freeze", lambda cpu, dev: 0)
    cfg = balloon_config("run=hashchain", memory=16)
    hv, dom = booted(cfg)
    with pytest.raises(SaveError, match="live .*did not reset it"):
        save_domain(hv, dom, str(tmp_path / "x.img"), 2_000_000)
    assert not (tmp_path / "x.img").exists()
    r = run_domain(hv, dom, None)
    assert r.reason == "poweroff" and "hashchain digest" in r.console.decode()


def test_a_register_page_left_mapped_stops_the_save_naming_its_entry_and_the_guest_runs_on(
        tmp_path, booted):
    """balloonbug=keepmap: the register page stays mapped inside xen_suspend,
    the save finds an L1 entry holding device memory and refuses, as Xen's
    normalise_pagetable does ("Bad mfn"); the guest, resumed cancelled, runs
    on and maps its registers again."""
    cfg = balloon_config("run=hashchain balloonbug=keepmap", memory=16)
    hv, dom = booted(cfg)
    with pytest.raises(SaveError, match=r"\(L1\) slot \d+: entry 0x0+d0000\w+ holds mfn "
                                        r"0xd0000, which is not the domain's"):
        save_domain(hv, dom, str(tmp_path / "x.img"), 2_000_000)
    assert not (tmp_path / "x.img").exists()
    r = run_domain(hv, dom, None)
    out = r.console.decode()
    assert "balloonbug=keepmap: the registers at 0xd0000000 stay mapped" in out
    assert r.reason == "poweroff" and "hashchain digest" in out


def test_device_memory_is_mappable_only_with_the_domains_permission(booted):
    cfg = balloon_config("run=hello", memory=16)
    hv, dom = booted(cfg)
    t, _ = device(dom)
    types = hv.machine.types
    pte = t.base | 0x67
    assert types.get_entry(1, pte, dom.domid, 0) == 0
    assert types.get_entry(2, pte, dom.domid, 0) < 0     # an L2 may not point there
    assert types.get_entry(1, pte + 0x1000, dom.domid, 0) < 0   # not given
    assert types.get_entry(1, pte, dom.domid + 1, 0) < 0         # another domain


def test_each_vcpu_engine_sends_device_memory_to_the_bus(booted):
    """The x86 path: Unicorn's mmio_map in every engine, before and after the
    VCPUs are rebuilt from their records (as a restore does)."""
    hv, dom = booted(balloon_config("run=hello", memory=16))
    t, _ = device(dom)
    for _ in range(2):
        for v in dom.vcpus:
            assert v.uc.mem_read(t.base, 4) == b"virt"
            assert int.from_bytes(v.uc.mem_read(t.base + 8, 4), "little") == 5
        dom.vcpus[1].uc.mem_write(t.base + 0x70, (1).to_bytes(4, "little"))
        assert t.status == 1
        t.mmio_write(0x70, 4, 0)
        hv.rebuild_vcpus(dom)
