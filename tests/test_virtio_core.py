"""The guest's virtio core (guestos/drivers/virtio.py, docs/virtio.md): Linux's
order at probe, freeze and thaw as the device sees it, and the reviewer's
race: with option virtio.nosync the explorer finds a schedule in which a
queue's interrupt is handled after the reset deleted the queue; without it
the flush finishes the half-handled interrupt before the reset, whatever the
schedule, and the config change it carried waits for the end of the thaw."""

from __future__ import annotations

import pytest

from hypervisor.public.io.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_STATUS,
)
from hypervisor.toolstack.explore import Scenario, explore
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT
from tests.kview import KernelView
from tests.test_balloon import balloon_config, device, requests

ACK, DRIVER = VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
# the handshake as the device sees it: STATUS writes, and QueueReady (Q1 set, Q0 cleared)
HANDSHAKE = [("S", 0), ("S", ACK), ("S", DRIVER), ("S", FEATURES_OK),
             ("Q1", 0), ("Q1", 1), ("Q1", 2), ("S", DRIVER_OK)]
RACE_CMDLINE = "run=hashchain:40:32 irqaffinity=1"
RACE_SEEDS = [4, 5]          # seed 5 catches the interrupt half handled at the freeze
FAILURE = "virtio: FAILURE: an interrupt of queue 2 handled after the reset deleted the queue"
FLUSHED = "virtio-mmio at 0xd0000000: reset: finished the interrupt that cpu1 had half handled"
HELD = ("virtio_balloon: a config change held back while config changes were disabled, "
        "delivered now")


def _watch(t) -> list[tuple[str, int]]:
    """The device's STATUS and QueueReady writes, in order."""
    seen: list[tuple[str, int]] = []
    write, sel = t.mmio_write, [0]

    def spy(offset, size, value):
        if offset == VIRTIO_MMIO_STATUS:
            seen.append(("S", value))
        elif offset == VIRTIO_MMIO_QUEUE_READY:
            seen.append((f"Q{value}", sel[0]))
        elif offset == 0x030:  # QueueSel
            sel[0] = value
        write(offset, size, value)
    t.mmio_write = spy
    return seen


def test_the_device_sees_linuxs_order_at_probe_freeze_and_thaw(booted):
    """Probe: reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, the queues, DRIVER_OK.
    Freeze: the reset, then the queues stopped. Thaw: the handshake again.
    A target changed while the device is reset is met after the thaw."""
    hv, dom = booted(balloon_config("run=hashchain", memory=16))
    t, bal = device(dom)
    seen = _watch(t)
    changed = []

    def change_while_frozen(vcpu, nr, args, rc):
        out = dom.console_out
        if b"virtio_balloon: frozen" in out and b"thawed" not in out and not changed:
            changed.append(1)
            bal.num_pages = 8 * 256     # mem-set 8, as the host would
            t.config_changed()
    hv.after_hypercall = change_while_frozen
    r = run_domain(hv, dom, None, requests=requests("1ms mem-set 12", "3ms checkpoint"))
    out = r.console.decode()
    assert r.reason == "poweroff" and changed, out[-2000:]
    assert seen[:len(HANDSHAKE)] == HANDSHAKE
    freeze = seen.index(("S", 0), 1)
    assert seen[freeze:freeze + 4] == [("S", 0), ("Q0", 0), ("Q0", 1), ("Q0", 2)]
    assert seen[freeze + 4:freeze + 4 + len(HANDSHAKE)] == HANDSHAKE  # the thaw
    assert "virtio_balloon: balloon at its target: 2048 pages" in out.split("thawed")[-1]


@pytest.fixture(scope="module")
def race_config(tmp_path_factory):
    """A balloon polled every millisecond, its irq on cpu1, a checkpoint at
    3 ms and a new target just after."""
    def write(options: str):
        path = tmp_path_factory.mktemp("race") / "race.toml"
        path.write_text(f'name = "race"\nmemory = 16\nvcpus = 2\n'
                        f'image = "{ROOT / "firmware/guest.elf"}"\n'
                        f'cmdline = "{RACE_CMDLINE} {options}"\nseed = 1\n'
                        'requests = ["1ms mem-set 12", "3ms checkpoint", "3005us mem-set 8"]\n'
                        '[balloon]\nstats_interval = "1ms"\n')
        return str(path)
    return write


def _results(groups) -> dict[int, tuple[str, ...]]:
    return {seed: g.outcome.results for g in groups for seed in g.seeds}


def test_the_explorer_finds_the_unflushed_handler_and_the_flush_closes_it(race_config):
    racy = explore(Scenario(race_config("virtio.nosync=1")), RACE_SEEDS, jobs=1)
    assert all(g.outcome.reason == "poweroff" for g in racy)
    found = _results(racy)
    assert any(FAILURE in line for line in found[5]), found
    assert not any("FAILURE" in line for line in found[4]), found  # schedules differ
    flushed = explore(Scenario(race_config(""), results="FAILURE|finished|held back"),
                      RACE_SEEDS, jobs=1)
    got = _results(flushed)
    assert all(g.outcome.reason == "poweroff" and g.outcome.trouble == "" for g in flushed)
    assert not any("FAILURE" in line for lines in got.values() for line in lines), got
    # the same schedule: the flush finished the interrupt, whose config change
    # (the new target) waited for the end of the thaw
    assert got[5] == (FLUSHED, HELD) and got[4] == (), got


def test_irqaffinity_moves_the_interrupt_and_the_balloon_works_there(booted):
    hv, dom = booted(balloon_config(RACE_CMDLINE, memory=16))
    t, bal = device(dom)
    r = run_domain(hv, dom, None, requests=requests("1ms mem-set 12", "3ms mem-set 16"))
    out = r.console.decode()
    assert r.reason == "poweroff" and "balloon at its target: 0 pages" in out, out[-2000:]
    from guestos.drivers.virtio_mmio import virtio_mmio_devices
    dev = virtio_mmio_devices(KernelView(hv, dom))[0]
    assert dev.irq_cpu == 1 and dev.interrupts >= 2
    assert dom.evtchn.ports[t.port].vcpu == 1
