"""The defects a new user hit, each as they met it: a listing piped into
``head``, kernel options the guest refused without a word (or with a useless
one), requests timed after the guest shut down, ``balloon-stats`` without a
statistics interval, a save to a missing directory that booted the guest
first, and a restored guest that could not be saved."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from guestos import pm
from guestos.cmdline import BadOption, parse_run
from hypervisor.toolstack.builder import BuildError
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.session import run_domain
from tests.conftest import FIRMWARE, GUEST_IMAGE, ROOT, checkout_env, make_config
from tests.test_balloon import balloon_config, requests

BUSY = "run=hashchain:60:32,hashchain:60:32"


def config_file(tmp_path: Path, cmdline: str = BUSY, extra: str = "") -> Path:
    path = tmp_path / "guest.toml"
    path.write_text(f'name = "guest"\nmemory = 8\nvcpus = 2\nimage = "{GUEST_IMAGE}"\n'
                    f'cmdline = "{cmdline}"\nseed = 1\n{extra}')
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("image")
    path = tmp / "guest.img"
    assert main(["save", str(config_file(tmp)), str(path), "--at", "3ms"]) == 0
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pvlab: "), err
    return err[0]


# --- the command line ------------------------------------------------------------------

def test_image_show_into_a_closed_pipe_stops_quietly(image):
    """``pvlab image show IMG --records | head``: the reader is gone before
    the listing ends. The read end is closed before the listing starts, so
    every write meets the closed pipe."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", "image", "show",
                            str(image), "--records"], cwd=ROOT, env=checkout_env(),
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert p.stderr == ""
    assert p.returncode == 0


def test_a_run_into_a_closed_pipe_finishes_quietly():
    """``pvlab run CONFIG | head``: the console is written inside the guest's
    hypercall; a reader gone must not crash the guest with a traceback (test
    failed before: "internal error in hypercall", the domain crashed, exit 1)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", "run",
                            str(ROOT / "examples/hello.toml")], cwd=ROOT, env=checkout_env(),
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert p.stderr == ""
    assert p.returncode == 0


def test_a_save_to_a_missing_directory_is_refused_before_the_guest_boots(tmp_path, capsys):
    dest = tmp_path / "no-such-dir" / "x.img"
    assert main(["save", str(config_file(tmp_path)), str(dest), "--at", "3ms"]) == 2
    out = capsys.readouterr()
    assert "booting" not in out.out  # the guest never started
    assert out.err.strip() == f"pvlab: {dest.parent} does not exist: cannot write x.img there"


# --- kernel options ------------------------------------------------------------------

def test_pmfail_with_a_device_name_is_refused_before_boot_saying_dev_is_a_number(tmp_path,
                                                                                capsys):
    cfg = config_file(tmp_path, "run=hello pmfail=testdev0:freeze")
    assert main(["run", str(cfg)]) == 2
    line = one_line_error(capsys)
    assert "option pmfail=testdev0:freeze: want pmfail=DEV:PHASE, DEV a device's number" in line
    # the booting kernel says the same if it is given the word all the same
    assert pm.pmfail_error("pmfail=testdev0:freeze") in line


@pytest.mark.parametrize("word, why", [
    ("run=hello:1:2:3:4", "hello is given 4 numbers; a program takes at most 3"),
    ("run=hello:x", "must be integers"),
    ("run=hello,", "a program name is missing"),
])
def test_a_run_option_the_kernel_cannot_obey_is_refused_before_boot(booted, tmp_path, capsys,
                                                                    word, why):
    assert main(["run", str(config_file(tmp_path, word))]) == 2
    line = one_line_error(capsys)
    assert f"option {word}: " in line and why in line
    with pytest.raises(BuildError, match="option run="):
        booted(make_config(word))
    # and the kernel itself stops boot on it (BadOption: the domain crashes)
    with pytest.raises(BadOption, match=re.escape(why)):
        parse_run(word)


def test_an_unknown_program_is_named_with_the_programs_there_are(booted):
    hv, dom = booted(make_config("run=foo"))
    out = run_domain(hv, dom).console.decode()
    assert "cannot start foo: error -2 (no program 'foo' in the image; it has hello," in out


# --- requests ----------------------------------------------------------------------

def test_requests_timed_after_the_guest_shut_down_are_said(booted):
    hv, dom = booted(make_config("run=hello"))
    r = run_domain(hv, dom, requests=[parse_request("900ms mem-set 4"),
                                      parse_request("950ms suspend")])
    assert r.reason == "poweroff"
    said = [n for n in r.notes if "not made" in n]
    assert len(said) == 1, r.notes
    assert "the guest shut down (poweroff)" in said[0] and "2 request(s) not made" in said[0]
    assert "at 950.000 ms: the toolstack writes control/shutdown = suspend" in said[0]


def test_balloon_stats_without_a_statistics_interval_says_there_is_none(booted):
    hv, dom = booted(balloon_config(BUSY, memory=8, stats=0))
    r = run_domain(hv, dom, 3_000_000, requests=requests("2ms balloon-stats"))
    text = "\n".join(r.notes)
    assert "no statistics interval" in text
    assert "statistics of" not in text


# --- saving a restored guest ---------------------------------------------------------

def test_pvlab_restore_saves_with_a_save_request_and_the_image_restores(image, tmp_path,
                                                                        capsys):
    again = tmp_path / "again.img"
    assert main(["restore", str(image), "--request", f"6ms save {again}"]) == 0
    out = capsys.readouterr().out
    assert f"saved domain guest to {again}" in out and again.is_file()
    assert main(["restore", str(again)]) == 0
    assert "hashchain digest" in capsys.readouterr().out


def test_pvlab_run_saves_with_the_same_request(tmp_path, capsys):
    dest = tmp_path / "run.img"
    assert main(["run", str(config_file(tmp_path)), "--request", f"3ms save {dest}"]) == 0
    assert dest.is_file()
    assert "the domain is destroyed" in capsys.readouterr().out


@pytest.mark.parametrize("extra, why", [
    (["--request", "3ms save {dir}/none/x.img"], "does not exist"),
    (["--request", "3ms save {dir}/x.img", "--request", "5ms save {dir}/y.img"],
     "at most one save request"),
    (["--request", "3ms save {dir}/x.img", "--request", "4ms mem-set 4"],
     "comes after the save"),
    (["--request", "3ms save {dir}/x.img", "--until", "2ms"], "before its save"),
    (["--request", "3ms save {dir}/x.img", "--request", "2ms checkpoint"],
     "a checkpoint request and a save request"),
])
def test_a_save_request_that_cannot_be_made_is_refused_before_the_restore(image, tmp_path,
                                                                           capsys, extra, why):
    args = [a.format(dir=tmp_path) for a in extra]
    assert main(["restore", str(image), *args]) == 2
    out = capsys.readouterr()
    assert "restored" not in out.out
    err = out.err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err


# --- the stress example ---------------------------------------------------------------

def test_the_stress_guest_says_how_far_it_has_come(booted):
    """A long run of examples/stress.toml shows its progress in words, a line
    every twentieth of the run, not a bare hex count."""
    cfg = dataclasses.replace(make_config(), name="stress", image=FIRMWARE / "tests/stress.elf",
                              cmdline="40")
    hv, dom = booted(cfg)
    out = run_domain(hv, dom).console.decode()
    progress = [ln for ln in out.splitlines() if " of 40 iterations (" in ln]
    assert len(progress) == 20
    assert progress[0] == "stress: 2 of 40 iterations (5%)"
    assert progress[-1] == "stress: 40 of 40 iterations (100%)"
    assert out.rstrip().endswith("Test result: SUCCESS")


# --- the demo (its run from another directory: tests/test_demo.py) -----------------------

def test_the_demos_pm_columns_keep_every_step_whole():
    from hypervisor.toolstack.demo import pm_columns
    left = "[cpu0] pre-suspend: start_info's store and console frames are pfns, shared_info " \
           "unmapped"
    right = "[cpu0] post-suspend: shared_info mapped; console on pfn 0x42 port 1, store on " \
            "pfn 0x41 port 2; timer and IPI ports of 4 cpus bound again"
    rows = pm_columns(f"{left}\n[cpu0] PM: sysdev_suspend(FREEZE)\n", f"{right}\n")
    assert rows[0] == f"{left} | {right}"
    assert rows[1].startswith("[cpu0] PM: sysdev_suspend(FREEZE)") and rows[1].endswith("|")

