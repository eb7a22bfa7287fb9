"""The live save (save.py send_domain_memory_live, as xg_sr_save.c's): a
guest that keeps writing is saved while it runs, in rounds of the pages it
dirtied, then suspended for a small final round; the image is an xl save
file that the image check and a restore in a fresh process take, and the
guest ends with the results of an uninterrupted run. Xen's policy stops at
five rounds for a guest that always dirties more than 50 pages; a table
that cannot be normalised while the guest runs is deferred (XTAB, then sent
again suspended), and once suspended such a table is an error that leaves
the guest running, nothing written and log-dirty off."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hypervisor import domctl
from hypervisor.mm.frames import PageType
from hypervisor.public.arch_x86 import _PAGE_PRESENT, PTE_FRAME_MASK
from hypervisor.public.xen import INVALID_MFN, PAGE_SHIFT
from hypervisor.toolstack import pfinfo, session
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import BalloonConfig, load_config
from hypervisor.toolstack.context import audit, domain_of
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.image import scan_image
from hypervisor.toolstack.precopy import (
    NS,
    Policy,
    PrecopyOptions,
    PrecopyStats,
    precopy_policy,
)
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import live_save, run_domain
from tests.conftest import ROOT, booting, checkout_env, make_config

EXAMPLE = ROOT / "examples" / "live-save.toml"
AT_NS = 3_000_000
LIMIT_NS = 2_000_000_000


def outcome(out: str) -> list[str]:
    return sorted(line for line in out.splitlines()
                  if line.startswith(("hashchain digest", "counter ", "dirtier")))


@pytest.fixture(scope="module")
def example():
    return load_config(EXAMPLE)


@pytest.fixture(scope="module")
def reference(example):
    with booting() as boot:
        r = run_domain(*boot(example), LIMIT_NS)
    assert r.reason == "poweroff"
    return outcome(r.console.decode())


def save_live(cfg, path: Path, opts: PrecopyOptions, **kwargs):
    with booting() as boot:
        hv, dom = boot(cfg)
        result, out, info = live_save(hv, dom, path, AT_NS, opts, **kwargs)
    return result, out, info


@pytest.fixture(scope="module")
def saved(example, tmp_path_factory):
    path = tmp_path_factory.mktemp("live") / "guest.img"
    off: list[bool] = []  # log-dirty's state when the save reports completion
    with booting() as boot:
        hv, dom = boot(example)
        result, out, info = live_save(hv, dom, path, AT_NS, PrecopyOptions(),
                                      report=lambda i: off.append(
                                          hv.machine.paging.enabled(dom.domid))
                                      if i.status == "completed" else None)
        assert out.ok, out.error
        assert not hv.domains  # destroyed after the save, as xl save does
    return path, result, info, off


def test_a_writing_guest_saved_live_ends_as_an_uninterrupted_run(saved, reference):
    path, before, info, _ = saved
    live, final = info.rounds[:-1], info.rounds[-1]
    assert len(live) > 1 and final.final and not any(r.final for r in live)
    assert live[0].pfns == info.total >> PAGE_SHIFT  # the first round: every pfn
    assert final.pages < live[0].pages // 10
    # a CLEAN before each round but the first, which sends every pfn
    assert info.status == "completed" and info.dirty_sync_count == len(info.rounds) - 1
    p = subprocess.run([sys.executable, "-m", "hypervisor", "restore", str(path)], cwd=ROOT,
                       env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    assert "suspend hypercall returned 0 (resumed in a new domain)" in p.stdout
    assert outcome(before.console.decode() + p.stdout) == reference


def test_log_dirty_is_off_when_the_save_completes(saved):
    assert saved[3] == [False]


def test_the_image_check_takes_a_live_image(saved, capsys):
    path = saved[0]
    info = scan_image(path)
    assert info.copies > info.nr_pfns and info.domain["kind"] == "live save"
    assert main(["image", "show", str(path)]) == 0
    assert "a live save at" in capsys.readouterr().out
    assert main(["image", "check", str(path)]) == 0
    assert f"a good image of 4096 pfns in {info.copies} page copies (live save)" \
        in capsys.readouterr().out


def test_the_policy_stops_at_five_rounds_for_a_guest_dirtying_over_50_pages(saved):
    info = saved[2]
    live = info.rounds[:-1]
    assert [r.iteration for r in live] == [0, 1, 2, 3, 4]
    assert all(r.pfns > 50 for r in live[1:])


def test_the_policys_limits_are_settable(example, tmp_path):
    _, out, info = save_live(example, tmp_path / "a.img", PrecopyOptions(max_iterations=2))
    assert out.ok and [r.iteration for r in info.rounds[:-1]] == [0, 1]
    # every round dirties about 100 pages: under a threshold of 1000 the
    # first CLEAN stops the loop, and that round is still sent live (Xen's)
    _, out, info = save_live(example, tmp_path / "b.img", PrecopyOptions(dirty_threshold=1000))
    assert out.ok and [r.iteration for r in info.rounds[:-1]] == [0, 1]


def test_the_downtime_limit_stops_when_the_dirty_pages_fit_in_it():
    opts = PrecopyOptions(downtime_limit_ns=1_000_000)
    bandwidth = 1 << 30  # a page takes 3.8 us: 1 ms holds 262 of them
    assert precopy_policy(PrecopyStats(1, 0, 200), opts, bandwidth) == Policy.STOP_AND_COPY
    assert precopy_policy(PrecopyStats(1, 0, 300), opts, bandwidth) == Policy.CONTINUE_PRECOPY
    # nothing measured yet (the first round): only Xen's rules
    assert precopy_policy(PrecopyStats(0, 0, 200), opts, 0) == Policy.CONTINUE_PRECOPY
    assert precopy_policy(PrecopyStats(1, 0, -1), opts, bandwidth) == Policy.CONTINUE_PRECOPY
    assert precopy_policy(PrecopyStats(5, 0, -1), opts, bandwidth) == Policy.STOP_AND_COPY
    assert opts.wire_ns(1 << 30) == NS


def test_a_table_caught_mapping_a_foreign_frame_is_deferred_then_sent_suspended(saved):
    """The L1 that maps shared_info (a frame not in the guest's pseudophysical
    map) cannot be normalised while the guest runs: Xen's EAGAIN. It goes as
    XTAB in that round and again, with data, in the final one, after the
    guest's suspend path unmapped shared_info."""
    path, _, info, _ = saved
    assert info.rounds[0].deferred >= 1 and info.rounds[-1].deferred == 0
    image = scan_image(path)
    sent: dict[int, list[int]] = {}
    for b in image.batches:
        for pfn, nib in zip(b.pfns.tolist(), b.nibbles.tolist(), strict=True):
            sent.setdefault(pfn, []).append(nib)
    deferred = [p for p, nibs in sent.items() if nibs[0] == pfinfo.XTAB
                and pfinfo.level(nibs[-1]) == 1]
    assert deferred and all(sent[p][-1] == image.nibbles[p] for p in deferred)


def _shared_info_l1(hv, dom) -> tuple[int, int]:
    """The L1 frame mapping the domain's shared_info, and the slot."""
    ft = hv.machine.frames
    target = domctl.shared_info_frame(dom)
    rows = hv.machine.memory.u64.reshape(-1, 512)
    for mfn in np.flatnonzero((ft.owner == dom.domid) & (ft.type == PageType.l1)).tolist():
        hit = np.flatnonzero(((rows[mfn] & np.uint64(_PAGE_PRESENT)) != 0)
                             & ((rows[mfn] & np.uint64(PTE_FRAME_MASK)) >> np.uint64(PAGE_SHIFT)
                                == np.uint64(target)))
        if hit.size:
            return mfn, int(hit[0])
    raise AssertionError("no L1 maps shared_info")


def test_a_table_that_fails_once_suspended_is_an_error_the_guest_runs_on(
        example, reference, booted, tmp_path, monkeypatch):
    """Once the guest is suspended nothing may fail to normalise (Xen would
    defer it and drop it: pvlab refuses). The test breaks the guest's p2m for
    a page an L1 of the final round maps, after the suspend."""
    hv, dom = booted(example)
    run_domain(hv, dom, AT_NS - 1_000_000)
    l1, slot = _shared_info_l1(hv, dom)
    rows = hv.machine.memory.u64.reshape(-1, 512)
    tdom = domain_of(hv, dom)
    other = next(i for i in range(512) if i != slot and rows[l1][i] & _PAGE_PRESENT)
    victim = int(hv.machine.m2p[int(rows[l1][other] & PTE_FRAME_MASK) >> PAGE_SHIFT])
    suspend = session.LiveRun.suspend
    kept = {}

    def suspend_then_break(self):
        suspend(self)
        frame, i = divmod(victim, 512)
        kept["mfn"] = int(rows[tdom.p2m_frames[frame]][i])
        rows[tdom.p2m_frames[frame]][i] = INVALID_MFN
    monkeypatch.setattr(session.LiveRun, "suspend", suspend_then_break)
    path = tmp_path / "guest.img"
    before, out, info = live_save(hv, dom, path, AT_NS, PrecopyOptions())
    assert not out.ok and "in the final round, with the guest suspended" in out.error
    assert "the guest runs on (its suspend hypercall returned 1)" in out.error
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert not hv.machine.paging.enabled(dom.domid)
    assert dom.shutdown_reason is None
    frame, i = divmod(victim, 512)
    rows[tdom.p2m_frames[frame]][i] = kept["mfn"]  # the guest's p2m as it was
    assert audit(hv) == []
    r = run_domain(hv, dom, LIMIT_NS)
    assert r.reason == "poweroff"
    assert outcome(r.console.decode()) == reference


def test_save_live_from_the_command_line_with_json_progress(tmp_path, capfd):
    path = tmp_path / "g.img"
    assert main(["save", str(EXAMPLE), str(path), "--at", "3ms", "--live", "--json",
                 "--max-iterations", "3"]) == 0
    lines = [json.loads(x) for x in capfd.readouterr().err.splitlines()]
    assert [x["status"] for x in lines][-1] == "completed"
    assert {"total", "transferred", "remaining", "dirty-pages-rate",
            "dirty-sync-count"} <= set(lines[0]["ram"])
    assert "expected-downtime" in lines[0] and "downtime" in lines[-1]
    assert lines[-1]["ram"]["transferred"] < path.stat().st_size
    assert max(x["iteration"] for x in lines) == 3


def test_the_scripted_request_saves_live(tmp_path, capfd):
    path = tmp_path / "g.img"
    assert main(["run", str(EXAMPLE), "--request", f"3ms save-live {path}"]) == 0
    out = capfd.readouterr().out
    assert "Frames iteration 0: 4096/4096" in out and "(suspended)" in out
    assert scan_image(path).domain["kind"] == "live save"


@pytest.mark.parametrize("args, says", [
    (["--live", "--max-iterations", "0"], "not a positive whole number"),
    (["--live", "--bandwidth", "fast"], "not a positive whole number"),
    (["--json"], "--json reports a live save's rounds: give --live too"),
])
def test_bad_live_options_are_one_line(tmp_path, capsys, args, says):
    try:
        code = main(["save", str(EXAMPLE), str(tmp_path / "g.img"), "--at", "3ms", *args])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_a_guest_that_stops_during_the_rounds_fails_the_save_with_log_dirty_off(
        example, booted, tmp_path):
    hv, dom = booted(example)
    path = tmp_path / "guest.img"
    # a link so slow that the guest finishes its programs during the first round
    _, out, info = live_save(hv, dom, path, AT_NS, PrecopyOptions(bandwidth=1 << 20))
    assert not out.ok and "the guest stopped (poweroff) during the live save" in out.error
    assert info is None and not path.exists() and list(tmp_path.iterdir()) == []
    assert not hv.machine.paging.enabled(dom.domid)


def test_a_guest_with_its_balloon_inflated_is_saved_live(booted, tmp_path):
    """The ballooned pfns have no frame: deferred as XTAB in the live rounds
    and sent again in the final one (by then the guest's freeze deflated the
    balloon: Linux's policy, the default); the balloon's place is in the
    config written first, its state in EMULATOR_CONTEXT at the end."""
    cfg = dataclasses.replace(
        make_config("run=hashchain:100:256,dirtier:60:20000:400", vcpus=2, memory=8,
                    name="bal"),
        balloon=BalloonConfig(0), requests=[parse_request("1ms mem-set 6")])
    ref = run_domain(*booted(cfg), LIMIT_NS, requests=cfg.requests)
    assert ref.reason == "poweroff"
    hv, dom = booted(cfg)
    path = tmp_path / "bal.img"
    before, out, info = live_save(hv, dom, path, 8_000_000, PrecopyOptions(),
                                  requests=cfg.requests)
    assert out.ok, out.error
    assert info.rounds[0].deferred >= 512  # the balloon's 2 MiB
    image = scan_image(path)
    assert len(image.devices) == 1 and image.domain["devices"][0]["kind"] == "balloon"
    hv2, dom2, _ = restore_image(path)
    try:
        r = run_domain(hv2, dom2, LIMIT_NS)
        assert r.reason == "poweroff"
        assert outcome(before.console.decode() + r.console.decode()) \
            == outcome(ref.console.decode())
    finally:
        hv2.close()


def test_a_live_stream_on_a_pipe_is_restored_as_it_comes(example, reference):
    """A migration's wire never seeks: the sender writes no digest and the
    receiver reads exactly the stream's octets, leaving what follows it (the
    handshake's next message) unread."""
    import os
    import threading

    from hypervisor.toolstack.restore import restore_stream
    from hypervisor.toolstack.save import write_image_live

    rfd, wfd = os.pipe()
    got: dict = {}

    def receive() -> None:
        with os.fdopen(rfd, "rb") as f:
            got["restored"] = restore_stream(f)
            got["after"] = f.read()

    rx = threading.Thread(target=receive)
    rx.start()
    with booting() as boot:
        hv, dom = boot(example)
        run_domain(hv, dom, AT_NS)
        with os.fdopen(wfd, "wb") as w:
            session_live = session.LiveRun(hv, dom, AT_NS, None, None)
            write_image_live(hv, dom, w, session_live, PrecopyOptions(), digest=False)
            w.write(b"domain received")
        rx.join()
        hv2, dom2, stats = got["restored"]
        assert got["after"] == b"domain received" and stats.pages > 4096
        after = run_domain(hv2, dom2, LIMIT_NS)
    # the source's console holds everything up to its suspend
    text = session_live.result.console.decode() + after.console.decode()
    assert after.reason == "poweroff" and outcome(text) == reference
