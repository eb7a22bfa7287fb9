"""The one toolstack layer (libxl.py) and what the daemon needed below it:
domids as Xen hands them out, one name per domain, a fast-clock run that
never sleeps past its limit, a save whose temporary file cannot be removed
failing as a value, and an image restored into a machine beside another
domain."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypervisor import domctl, scheduler
from hypervisor.toolstack import libxl
from hypervisor.toolstack.control import type_on_console
from hypervisor.toolstack.save import SaveError
from hypervisor.toolstack.session import run_domain, save_domain
from tests.conftest import make_config

SHELL = "run=sh"


def test_a_new_domid_is_never_one_just_destroyed(booted) -> None:
    hv = booted.bare(64)
    a = libxl.create_domain(hv, make_config(SHELL, name="a"))
    libxl.destroy_domain(hv, a)
    b = libxl.create_domain(hv, make_config(SHELL, name="b"))
    assert (a.domid, b.domid) == (1, 2)


def test_a_taken_name_is_refused_and_nothing_is_made(booted) -> None:
    hv = booted.bare(64)
    libxl.create_domain(hv, make_config(SHELL, name="twin"))
    free = domctl.physinfo(hv).free_pages
    with pytest.raises(libxl.LibxlError, match="already exists"):
        libxl.create_domain(hv, make_config(SHELL, name="twin"))
    assert len(hv.domains) == 1 and domctl.physinfo(hv).free_pages == free


def test_a_fast_clock_run_never_sleeps_past_its_limit(booted, monkeypatch) -> None:
    """Regression: with every VCPU blocked, the fast clock slept until the next
    timer even when the run's limit came first (a daemon could not answer)."""
    hv, dom = booted(make_config(SHELL), clock="fast")
    run_domain(hv, dom, domctl.system_time(hv) + 50_000_000)  # at its prompt
    slept: list[float] = []
    real_sleep = scheduler.time.sleep
    monkeypatch.setattr(scheduler.time, "sleep", lambda s: (slept.append(s), real_sleep(s)))
    for _ in range(20):
        domctl.run(hv, domctl.system_time(hv) + 100_000)  # 0.1 ms
    assert slept and max(slept) <= 100_000 / 1e9


def test_a_save_whose_temporary_file_cannot_go_fails_as_a_value(booted, tmp_path) -> None:
    """Regression: an OSError while removing the temporary file escaped the
    save's outcome (the daemon's loop would have died with every domain)."""
    hv, dom = booted(make_config(SHELL))
    dest = tmp_path / "g.img"
    (tmp_path / f".{dest.name}.tmp-{os.getpid()}").mkdir()  # neither written nor removed
    with pytest.raises(SaveError, match="the guest runs on"):
        save_domain(hv, dom, str(dest), 3_000_000)
    assert dom.is_running and not dest.exists()


def test_restore_into_a_machine_beside_another_domain(booted, tmp_path: Path) -> None:
    hv = booted.bare(128)
    other = libxl.create_domain(hv, make_config(SHELL, name="other"))
    saved = libxl.create_domain(hv, make_config(SHELL, name="saved"))
    save_domain(hv, saved, str(tmp_path / "s.img"), 3_000_000)
    assert list(hv.domains) == [other.domid]
    dom = libxl.restore_domain(hv, tmp_path / "s.img", paused=True)
    assert dom.domid == 3 and dom.paused
    rows = {r["name"]: r for r in libxl.domain_list(hv)}
    assert rows["saved"]["state"][2] == "p" and set(rows) == {"other", "saved"}
    with pytest.raises(libxl.LibxlError, match="already exists"):
        libxl.restore_domain(hv, tmp_path / "s.img")
    libxl.unpause(dom)
    type_on_console(hv, dom, b"hello\nexit\n")
    r = run_domain(hv, dom, 2_000_000_000)
    assert r.reason == "poweroff" and b"hello from user space" in r.console
    assert other.is_running
