"""Checkpoints: the one writer behind `pvlab checkpoint`, a `checkpoint`
request and the demo; its file names; a save's failure as a value; and the
`pvlab checkpoint` verb through the command line (exit codes, files made,
--every/--until/--max, bad input as one line with exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.toolstack.checkpoint import CheckpointWriter, checkpoint_path
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.control import Request
from hypervisor.toolstack.image import scan_image
from hypervisor.toolstack.incremental import parent_of
from hypervisor.toolstack.session import boot, run_domain, suspend_and_save
from tests.conftest import GUEST_IMAGE, make_config

# a guest that counts for longer than any run here: it answers a suspend at once
BUSY = "run=counter:1000:400000"
# a guest whose one task sleeps for 3 s, for a run that waits long: it outlives
# the save's 2 s wait after a request (a 2 s sleep ended inside the wait in the
# schedules whose tick came due before its end: the wake-up is at a tick)
SLEEPER = "run=spawner:1:1:3000"


def _config_file(tmp_path: Path, cmdline: str = BUSY) -> Path:
    cfg = tmp_path / "busy.toml"
    cfg.write_text(f'name = "busy"\nmemory = 16\nvcpus = 1\nimage = "{GUEST_IMAGE}"\n'
                   f'cmdline = "{cmdline}"\nseed = 1\n')
    return cfg


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pvlab: "), err
    return err[0]


def test_checkpoint_names_count_on_from_the_highest_in_the_directory(tmp_path):
    assert checkpoint_path(tmp_path, "d") == (1, tmp_path / "d-checkpoint-001.img")
    (tmp_path / "d-checkpoint-007.img").write_bytes(b"")
    (tmp_path / "other-checkpoint-009.img").write_bytes(b"")
    assert checkpoint_path(tmp_path, "d") == (8, tmp_path / "d-checkpoint-008.img")


def test_pvlab_checkpoint_every_until_writes_one_image_each_time(tmp_path, capsys):
    out = tmp_path / "ck"
    rc = main(["checkpoint", str(_config_file(tmp_path)), str(out), "--every", "5ms",
               "--until", "12ms"])
    stdout = capsys.readouterr().out
    assert rc == 0
    made = sorted(p.name for p in out.iterdir())
    assert made == ["busy-checkpoint-001.img", "busy-checkpoint-002.img"]
    assert "[toolstack] checkpoint 1: " in stdout and "2 checkpoints in" in stdout
    info = scan_image(out / made[0])
    assert info.checkpoint and info.domain["kind"] == "checkpoint"
    assert parent_of(out / made[1])["file"] == made[0]  # then an increment over it


def test_pvlab_checkpoint_max_stops_the_checkpoints_not_the_guest(tmp_path, capsys):
    out = tmp_path / "ck"
    rc = main(["checkpoint", str(_config_file(tmp_path)), str(out), "--every", "3ms",
               "--until", "12ms", "--max", "1"])
    assert rc == 0
    assert [p.name for p in out.iterdir()] == ["busy-checkpoint-001.img"]
    assert "1 checkpoints in" in capsys.readouterr().out


@pytest.mark.parametrize("args, why", [
    (["--every", "0ms"], "--every must be more than 0"),
    (["--every", "5ms", "--max", "0"], "--max must be at least 1"),
])
def test_pvlab_checkpoint_bad_numbers_are_one_line_and_exit_2(tmp_path, capsys, args, why):
    out = tmp_path / "ck"
    assert main(["checkpoint", str(_config_file(tmp_path)), str(out), *args]) == 2
    assert why in _one_line_error(capsys)
    assert not out.exists()


def test_pvlab_checkpoint_into_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("")
    assert main(["checkpoint", str(_config_file(tmp_path)), str(taken), "--every", "5ms"]) == 2
    assert "is not a directory" in _one_line_error(capsys)


def test_pvlab_checkpoint_of_a_missing_config_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["checkpoint", str(tmp_path / "none.toml"), str(tmp_path / "ck"),
                 "--every", "5ms"]) == 2
    assert "no such configuration" in _one_line_error(capsys)


def test_a_checkpoint_request_goes_through_the_writer_it_is_given(tmp_path):
    hv, dom = boot(make_config(BUSY, name="req"))
    writer = CheckpointWriter(tmp_path)
    r = run_domain(hv, dom, 8_000_000, requests=[Request(4_000_000, command="checkpoint")],
                   checkpoints=writer)
    hv.close()
    assert r.reason == "running"
    assert writer.taken == [tmp_path / "req-checkpoint-001.img"]
    assert [o.path for o in r.checkpoints] == writer.taken
    assert 0 < r.checkpoints[0].console_bytes <= len(r.console)


def test_a_failed_checkpoint_is_said_and_the_guest_runs_on(tmp_path):
    hv, dom = boot(make_config(BUSY, name="gone"))
    writer = CheckpointWriter(tmp_path / "removed")  # a directory that is not there
    r = run_domain(hv, dom, 8_000_000, requests=[Request(4_000_000, command="checkpoint")],
                   checkpoints=writer)
    hv.close()
    assert r.reason == "running" and writer.taken == []
    assert not r.checkpoints[0].ok and "does not exist" in r.checkpoints[0].error
    assert any(n.startswith("checkpoint 1 failed: ") for n in r.notes)
    assert any("resuming it" in n or "suspend hypercall returns 1" in n for n in r.notes) \
        or "suspend hypercall returned 1" in r.console.decode()


def test_a_save_says_why_it_failed_as_a_value(tmp_path):
    """The toolstack's wait for an acknowledgement ends in a field of the run's
    result, not in a message the save has to search for."""
    hv, dom = boot(make_config(f"{SLEEPER} nosaverestore"))
    result, outcome = suspend_and_save(hv, dom, tmp_path / "x.img", 5_000_000)
    assert result.unacknowledged == "suspend"
    assert not outcome.ok and outcome.stats is None
    assert "did not acknowledge the suspend request" in outcome.error
    assert not (tmp_path / "x.img").exists() and dom.is_running
    hv.close()


def test_two_checkpoint_requests_before_the_suspend_make_one_checkpoint(tmp_path):
    """Regression: both requests write control/shutdown = suspend, the guest
    suspends once, and the second request's checkpoint was left wanted: the
    next plain suspend, which the toolstack should resume cancelled, wrote
    a checkpoint."""
    hv, dom = boot(make_config(BUSY, name="twice"))
    writer = CheckpointWriter(tmp_path)
    reqs = [Request(4_000_000, command="checkpoint"), Request(4_000_000, command="checkpoint"),
            Request(9_000_000, command="suspend")]
    r = run_domain(hv, dom, 14_000_000, requests=reqs, checkpoints=writer)
    hv.close()
    assert r.reason == "running"
    assert writer.taken == [tmp_path / "twice-checkpoint-001.img"]
    assert any("suspended; resuming it" in n for n in r.notes)
