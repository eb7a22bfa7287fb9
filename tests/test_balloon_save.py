"""A guest with pages ballooned out saves and checkpoints under every policy.

A ballooned-out pfn has no frame: the guest's p2m holds INVALID_MFN there, and
the save must report it XTAB (as Xen's getpageframeinfo3 reports a pfn with no
frame), never look it up as a frame nor count it as a pagetable. The save's
count of pagetables (and of pinned ones) is checked against the frame table
at the moment of the save, and the image restored in a fresh process runs to
the digests of the same guest never ballooned."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hypervisor import domctl
from hypervisor.toolstack import pfinfo
from hypervisor.toolstack.checkpoint import try_save
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, checkout_env
from tests.test_balloon import balloon_config, requests

PROGRAMS = "run=hashchain:120:64,hashchain:120:64,dirtier"
DIGEST = re.compile(r"hashchain digest [0-9a-f]+")

RESTORE_SCRIPT = """
import sys
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import run_domain
hv, dom, _ = restore_image(sys.argv[1])
r = run_domain(hv, dom, None)
print(r.console.decode())
print("END", r.reason)
"""


def config(policy: str, seed: int):
    return balloon_config(f"{PROGRAMS} virtio_balloon.policy={policy}", memory=8, seed=seed,
                          stats=0)


def digests(console: str) -> list[str]:
    return sorted(DIGEST.findall(console))


def tables_in_frame_table(hv, dom) -> tuple[int, int]:
    """The domain's pagetables and pinned pagetables, as the frame table has them."""
    mfns = np.flatnonzero(hv.machine.frames.owner == dom.domid)
    nib = pfinfo.nibble(domctl.getpageframeinfo3(hv, dom, mfns))
    return int(pfinfo.is_table(nib).sum()), int(pfinfo.is_pinned_table(nib).sum())


def restore_elsewhere(path: Path) -> str:
    p = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, str(path)], cwd=ROOT,
                       env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "END poweroff" in p.stdout, p.stdout[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def unballooned_digests() -> dict[int, list[str]]:
    return {}


def reference(booted, cache: dict[int, list[str]], seed: int) -> list[str]:
    if seed not in cache:
        hv, dom = booted(config("keep", seed))
        r = run_domain(hv, dom, None)
        assert r.reason == "poweroff"
        cache[seed] = digests(r.console.decode())
        assert len(cache[seed]) == 2
    return cache[seed]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 8])
@pytest.mark.parametrize("policy", ["discard", "deflate", "keep"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["save", "checkpoint"])
def test_a_ballooned_guest_saves_counts_its_tables_and_restores_to_the_same_digests(
        booted, tmp_path, unballooned_digests, policy, seed, checkpoint):
    want = reference(booted, unballooned_digests, seed)
    hv, dom = booted(config(policy, seed))
    seen = {}

    def save(d) -> bool:
        seen["tables"] = tables_in_frame_table(hv, d)
        seen["ballooned"] = d.max_pages - d.tot_pages
        seen["outcome"] = try_save(hv, d, tmp_path / "x.img", checkpoint=checkpoint)
        return checkpoint  # a checkpoint's guest runs on

    r = run_domain(hv, dom, None, requests=requests("1ms mem-set 6", "6ms suspend"),
                   on_suspend=save)
    outcome = seen["outcome"]
    assert outcome.ok, outcome.error
    if policy != "deflate":
        assert seen["ballooned"] > 0  # pages were out when it saved
    assert (outcome.stats.tables, outcome.stats.pinned) == seen["tables"]
    if checkpoint:
        assert r.reason == "poweroff"
        assert digests(r.console.decode()) == want
    assert digests(restore_elsewhere(outcome.path)) == want
