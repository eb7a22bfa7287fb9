"""Remus of a domain of the host daemon (``pvlab remus``, the daemon's
``remus`` live job): the daemon is the primary, ``pvlab migrate-receive -r
--listen`` the backup. The domain's console socket gets an epoch's output
only once the backup has acknowledged it, and the daemon tells each
committed epoch (REMUS_CHECKPOINT).

* The daemon killed (SIGKILL) mid-run: the backup fails over, and the
  console socket's output plus the backup's is an uninterrupted run's,
  each line once.
* ``xl destroy`` of the primary: "Primary domain has been destroyed.", and
  the backup fails over likewise.
* The backup killed: "Backup failed? resuming domain at primary.", exit 1,
  and the domain runs on in the daemon to its uninterrupted results.
* migrate_cancel: the stream ends cleanly, the backup destroys its copy,
  the domain runs on in the daemon.
* xl's flags pvlab does not build: one line, exit 2.

The guest runs about a second in the daemon, so the tests ask the daemon's
``remus`` command as the verb does, at once, rather than start the verb."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.qmp import Client, QmpError
from hypervisor.toolstack.remus import BACKUP_FAILED, PRIMARY_DESTROYED
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, booting, checkout_env
from tests.test_daemon import WAIT_S, Console, Daemon

EXAMPLE = ROOT / "examples" / "live-save.toml"   # 16 MiB, ends by itself
NAME = "live-save"
RESULTS = ("hashchain ", "counter ", "dirtier ")


def results(*texts: str) -> list[str]:
    return sorted(line.strip() for text in texts for line in text.splitlines()
                  if line.startswith(RESULTS))


@pytest.fixture(scope="module")
def reference() -> list[str]:
    with booting() as boot:
        r = run_domain(*boot(load_config(EXAMPLE)))
    assert r.reason == "poweroff"
    return results(r.console.decode())


@pytest.fixture
def primary() -> Iterator[Daemon]:
    d = Path(tempfile.mkdtemp(prefix="pvr", dir="/tmp"))  # a short path: sockets
    daemon = Daemon(d)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


def _pvlab(*argv: str, **kw) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "hypervisor", *argv], env=checkout_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def backup() -> tuple[subprocess.Popen[bytes], int]:
    b = _pvlab("migrate-receive", "-r", "--listen", "127.0.0.1:0")
    assert b.stderr is not None
    line = b.stderr.readline().decode()
    port = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert port, line
    return b, int(port.group(1))


class Remus(threading.Thread):
    """The daemon's ``remus`` command (what ``pvlab remus`` sends), asked at
    once after the domain's creation (the guest runs only a second), its
    answer or its error kept."""

    def __init__(self, daemon: Daemon, port: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(daemon.sock, timeout=WAIT_S)
        self.port = port
        self.answer: Any = None

    def run(self) -> None:
        try:
            self.answer = self.client.execute(
                "remus", {"domain": NAME, "uri": f"tcp:127.0.0.1:{self.port}", "interval": 2})
        except (QmpError, OSError) as e:
            self.answer = e
        self.client.close()

    def result(self) -> Any:
        self.join(WAIT_S)
        return self.answer


def replicated(daemon: Daemon) -> tuple[Console, subprocess.Popen[bytes], Remus]:
    """The guest created in the daemon, its console attached, and Remus of
    it under way to a backup: (console, backup, remus) once the first epoch
    has committed."""
    b, port = backup()
    daemon("domain-create", config=str(EXAMPLE))
    remus = Remus(daemon, port)
    remus.start()
    con = Console(daemon("domain-console", domain=NAME)["path"])
    daemon.event("REMUS_CHECKPOINT", name=NAME, epoch=0)
    return con, b, remus


def test_the_daemon_killed_fails_over_with_every_line_once(primary, reference):
    con, b, remus = replicated(primary)
    con.until("counter 1")
    primary.proc.send_signal(signal.SIGKILL)
    primary.proc.wait()
    seen = con.to_end()            # the socket ends with the daemon
    shown, err = b.communicate(timeout=WAIT_S)
    assert isinstance(remus.result(), OSError)  # its daemon is gone
    assert b"Remus Failover for domain" in err, err.decode()[-2000:]
    assert "counter 1" in results(seen) and results(shown.decode())  # both had a part
    assert results(seen, shown.decode()) == reference


def test_destroy_of_the_primary_fails_over(primary, reference):
    con, b, remus = replicated(primary)
    assert primary("domain-destroy", domain=NAME) == {}
    assert NAME not in [r["name"] for r in primary("domain-list")]
    assert remus.result()["line"] == PRIMARY_DESTROYED
    shown, berr = b.communicate(timeout=WAIT_S)
    assert b"Remus Failover for domain" in berr
    assert results(con.to_end(), shown.decode()) == reference


def test_the_backup_killed_leaves_the_domain_running_in_the_daemon(primary, reference):
    con, b, remus = replicated(primary)
    b.kill()
    b.communicate()
    assert BACKUP_FAILED in str(remus.result())
    assert results(con.to_end()) == reference   # the guest ran on to its poweroff


def test_migrate_cancel_ends_the_copy_and_the_domain_runs_on(primary, reference):
    con, b, remus = replicated(primary)
    assert primary("migrate_cancel", domain=NAME) == {}
    assert "the backup destroyed its copy" in remus.result()["line"]
    _, berr = b.communicate(timeout=WAIT_S)
    assert b.returncode == 0 and b"our copy is destroyed" in berr
    assert results(con.to_end()) == reference


@pytest.mark.parametrize("argv, why", [
    (["d", "h", "-c"], "remus -c: not built"),
    (["d", "h", "-b"], "remus -b: not built"),
    (["d", "h", "-N", "script"], "remus -N: not built"),
    (["d", "h", "-i", "0"], "-i 0: the interval"),
    (["d", "h", "--tcp", "127.0.0.1:1"], "give no HOST"),
    (["d", "--tcp", "nowhere"], "give HOST:PORT"),
    (["d"], "give the backup's HOST"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, why):
    assert main(["remus", *argv, "--socket", os.devnull]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1
