"""pvlab xl's verbs against a real daemon, started in a temporary directory as
a child process and stopped at the end: create, list, mem-set, pause and
unpause, save -c, save then restore, shutdown -w, destroy, vcpu-list, info,
dmesg, and `pvlab console` through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.toolstack.cli import main
from hypervisor.toolstack.qmp import Client, DaemonNotRunning
from tests.conftest import GUEST_IMAGE, ROOT, checkout_env
from tests.reference import hashchain_line
from tests.terminal import read_until

HELLO = b"hello from user space"


class Host:
    """A daemon of our own: its socket, its directory, its log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "run" / "pvlab.sock"
        self.log = root / "daemon.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hypervisor", "daemon", "--socket", str(self.sock)],
                cwd=ROOT, env=checkout_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_until_it_answers()

    def _wait_until_it_answers(self) -> None:
        for _ in range(600):  # a guard against a daemon that never listens, not a timing
            if self.proc.poll() is not None:
                break
            try:
                Client(self.sock, timeout=5).close()
                return
            except (DaemonNotRunning, OSError):
                select.select([], [], [], 0.1)
        raise RuntimeError(f"the daemon did not start: {self.log.read_text()}")

    def stop(self) -> None:
        try:
            with Client(self.sock) as c:
                c.execute("quit")
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def config(self, name: str, cmdline: str = "run=sh", memory: int = 16,
               extra: str = "") -> str:
        path = self.root / f"{name}.toml"
        path.write_text(f'name = "{name}"\nmemory = {memory}\nvcpus = 1\n'
                        f'image = "{GUEST_IMAGE}"\ncmdline = "{cmdline}"\nseed = 1\n{extra}')
        return str(path)


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Iterator[Host]:
    h = Host(tmp_path_factory.mktemp("xl"))
    try:
        yield h
    finally:
        h.stop()


def xl(capsys, host: Host, *argv: str) -> tuple[int, str, str]:
    """``pvlab xl ARGV --socket`` the host's, in this process."""
    code = main(["xl", *argv, "--socket", str(host.sock)])
    out, err = capsys.readouterr()
    return code, out, err


def row(capsys, host: Host, name: str) -> list[str] | None:
    """The domain's line of xl list, split; None if it is not listed."""
    code, out, _ = xl(capsys, host, "list")
    assert code == 0 and out.startswith("Name ")
    lines = [line.split() for line in out.splitlines()[1:]]
    return next((cells for cells in lines if cells[0] == name), None)


def test_create_list_info_and_destroy(capsys, host):
    code, _, err = xl(capsys, host, "create", host.config("one"))
    assert code == 0, err
    assert err.splitlines()[-1].startswith("Created domain ") and "(one)" in err
    cells = row(capsys, host, "one")
    assert cells is not None and cells[2] == "16" and cells[3] == "1"
    code, out, _ = xl(capsys, host, "list", "-l", "one")
    info = json.loads(out)
    assert code == 0 and [i["name"] for i in info] == ["one"]
    domid = str(info[0]["domid"])
    code, out, _ = xl(capsys, host, "vcpu-list", "one")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["one", domid, "0"]
    code, out, _ = xl(capsys, host, "info")
    assert code == 0 and "xen_major              : 4" in out.splitlines()
    assert xl(capsys, host, "destroy", domid)[0] == 0
    assert row(capsys, host, "one") is None
    code, _, err = xl(capsys, host, "destroy", "one")
    assert code == 1 and err == "pvlab: one is an invalid domain identifier (no domain " \
                                "has that name or domid)\n"


def state(capsys, host: Host, name: str) -> str:
    cells = row(capsys, host, name)
    assert cells is not None, f"{name} is not listed"
    return cells[4]


def test_pause_and_unpause(capsys, host):
    assert xl(capsys, host, "create", host.config("pz"))[0] == 0
    assert xl(capsys, host, "pause", "pz")[0] == 0
    assert state(capsys, host, "pz")[2] == "p"
    code, out, _ = xl(capsys, host, "vcpu-list", "pz")
    # a paused domain's VCPU is not running; "p" is for an offline VCPU only
    assert code == 0 and out.splitlines()[1].split()[4] in ("---", "-b-")
    assert xl(capsys, host, "unpause", "pz")[0] == 0
    assert state(capsys, host, "pz")[2] == "-"
    assert xl(capsys, host, "destroy", "pz")[0] == 0


def test_mem_set_reaches_the_target_and_mem_max_may_not_go_below_it(capsys, host):
    cfg = host.config("bal", memory=32, extra="[balloon]\n")
    assert xl(capsys, host, "create", cfg)[0] == 0
    with Client(host.sock) as events:
        code, _, err = xl(capsys, host, "mem-set", "bal", "24m")
        assert code == 0, err
        while True:  # until the balloon has given the guest's 8 MiB back to the host
            event = events.next_event(60)
            assert event is not None, "no BALLOON_CHANGE reaching the target"
            data = event.get("data", {})
            if event["event"] == "BALLOON_CHANGE" and data["actual_kib"] == 24 << 10:
                break
    assert row(capsys, host, "bal")[2] == "24"
    code, _, err = xl(capsys, host, "mem-max", "bal", "16384k")
    assert code == 1 and err.startswith("pvlab: ") and len(err.splitlines()) == 1
    assert xl(capsys, host, "mem-max", "bal", "1g")[0] == 0
    assert xl(capsys, host, "destroy", "bal")[0] == 0


def test_save_c_leaves_the_domain_running(capsys, host):
    assert xl(capsys, host, "create", host.config("ck"))[0] == 0
    image = host.root / "ck.img"
    code, _, err = xl(capsys, host, "save", "-c", "ck", str(image))
    assert code == 0, err
    assert err.splitlines()[-1].endswith("; the domain runs on") and image.stat().st_size
    assert state(capsys, host, "ck")[2:4] == "--"    # neither paused nor shut down
    assert xl(capsys, host, "destroy", "ck")[0] == 0


def test_save_then_restore_and_the_restored_shell_runs_a_program(capsys, host):
    """The domain is gone after xl save; xl restore -c brings it back and
    attaches: lines piped in reach its shell, whose hashchain prints what an
    uninterrupted run prints; the pipe's end exits the shell, and the guest
    powers off, which ends the console."""
    assert xl(capsys, host, "create", host.config("sr"))[0] == 0
    image = host.root / "sr.img"
    assert xl(capsys, host, "save", "sr", str(image))[0] == 0
    assert row(capsys, host, "sr") is None
    p = pvlab("xl", "restore", "-c", str(image), "--socket", str(host.sock),
              stdin="hashchain 3 2\n")
    assert p.returncode == 0, p.stderr
    assert hashchain_line(3, 2) in p.stdout
    assert p.stderr.splitlines()[-1] == "pvlab: the console of domain " \
        f"{_domid(p.stderr)} (sr) closed"
    assert row(capsys, host, "sr") is None    # powered off: destroyed (xl's on_poweroff)


def _domid(err: str) -> str:
    line = next(line for line in err.splitlines() if line.startswith("Restored domain "))
    return line.split()[2]


def test_shutdown_waits_and_dmesg_tells(capsys, host):
    assert xl(capsys, host, "create", host.config("sd"))[0] == 0
    code, _, err = xl(capsys, host, "shutdown", "-w", "sd")
    assert code == 0, err
    assert err.splitlines()[-1].endswith(" has been shut down (poweroff)")
    assert row(capsys, host, "sd") is None
    code, out, _ = xl(capsys, host, "dmesg", "-c")
    assert code == 0 and "(sd) shut down: poweroff" in out
    assert "(sd)" not in xl(capsys, host, "dmesg")[1]


def test_a_person_at_pvlab_console(capsys, host):
    """Through a pseudo-terminal: the shell of examples/shell.toml runs a
    typed line; Ctrl-] detaches with exit 0 and the domain runs on."""
    assert xl(capsys, host, "create", str(ROOT / "examples" / "shell.toml"))[0] == 0
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "console", "shell",
                             "--socket", str(host.sock)], stdin=slave, stdout=slave,
                            stderr=slave, cwd=ROOT, env=checkout_env())
    os.close(slave)
    seen = bytearray()
    try:
        assert read_until(master, seen, b"$ ")
        os.write(master, b"hellp\x7fo\r")
        assert read_until(master, seen, HELLO + b"\r\n")
        os.write(master, b"\x1d")
        assert proc.wait(timeout=60) == 0
        read_until(master, seen, b"runs on")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"detached from the console of domain" in seen
    assert state(capsys, host, "shell")[3] == "-"
    assert xl(capsys, host, "destroy", "shell")[0] == 0


def pvlab(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", *args], cwd=ROOT,
                          env=checkout_env(), capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_save_p_leaves_the_domain_paused(capsys, host):
    assert xl(capsys, host, "create", host.config("sp"))[0] == 0
    code, _, err = xl(capsys, host, "save", "-p", "sp", str(host.root / "sp.img"))
    assert code == 0, err
    assert state(capsys, host, "sp")[2] == "p"
    assert xl(capsys, host, "destroy", "sp")[0] == 0


def test_create_c_attaches_at_once(host):
    """xl create -c: the console from its first line (the kernel booting);
    input from a pipe."""
    p = pvlab("xl", "create", "-c", host.config("cc"), "--socket", str(host.sock),
              stdin="hello\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("[cpu0] pvlab guest kernel booting") and HELLO.decode() in p.stdout
