"""virtio-console in a running guest: portecho reads a port and writes it back
upper-cased, through a Unix socket the test connects to; and the 2011 S4
review's console test: a read blocked waiting for the host stays blocked
across a save and a restore in a fresh process if the host side is
connected again (then data comes and it returns), and ends with end of file
if it is not; the same across a checkpoint, and a host disconnect reaches
the guest after it. One save is shared by the module's restore tests."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hypervisor import domctl
from hypervisor.toolstack.checkpoint import try_save
from hypervisor.toolstack.config import parse_config
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, booting, checkout_env

MS = 1_000_000
ECHOED = "portecho: echoed"
EOF_LINE = "portecho: end of file"


def console_config(sock: Path, cmdline: str = "run=portecho", **extra):
    return parse_config({"name": "vc", "memory": 16, "image": "firmware/guest.elf",
                         "cmdline": cmdline,
                         "channel": [f"name=echo, connection=socket, path={sock}"], **extra},
                        ROOT / "vc.toml")


def connect(path: Path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(path))
    c.settimeout(5)
    return c


def test_portecho_through_a_socket(booted, tmp_path):
    sock = tmp_path / "e.sock"
    hv, dom = booted(console_config(sock))
    client = connect(sock)  # before the guest reads: its read waits for input
    r = run_domain(hv, dom, 20 * MS)
    assert "virtio_console: port 1 is vport0p1, named 'echo'" in r.console.decode()
    assert ECHOED not in r.console.decode() and r.reason == "running"
    client.sendall(b"hello, port\n")
    run_domain(hv, dom, 40 * MS)
    assert client.recv(100) == b"HELLO, PORT\n"
    client.close()  # the host side closes: the read returns 0
    r = run_domain(hv, dom, None)
    console = r.console.decode()
    assert f"{ECHOED} 12 bytes" in console and EOF_LINE in console
    assert r.reason == "poweroff"


RESTORE_SCRIPT = """
import json, socket, sys
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import run_domain
from hypervisor import domctl
MS = 1_000_000
path, sock, connected = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
hv, dom, _ = restore_image(path)
out = {}
client = None
if connected:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(sock)
    client.settimeout(5)
start = max(v.clock for v in dom.vcpus)
r = run_domain(hv, dom, start + 20 * MS)
out["after_resume"] = r.console.decode()
out["reason_resume"] = r.reason
if connected:
    client.sendall(b"after the restore\\n")
    run_domain(hv, dom, start + 40 * MS)
    out["echo"] = client.recv(100).decode()
    client.close()
r = run_domain(hv, dom, None)
out["end"] = r.console.decode()
out["reason"] = r.reason
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """A guest whose portecho waits in a read, the host connected, saved."""
    tmp = tmp_path_factory.mktemp("vcsave")
    sock, image = tmp / "e.sock", tmp / "vc.img"
    with booting() as boot:
        hv, dom = boot(console_config(sock))
        client = connect(sock)
        seen = {}

        def save(d) -> bool:
            seen["outcome"] = try_save(hv, d, image)
            return False

        r = run_domain(hv, dom, None, requests=[parse_request("20ms suspend")],
                       on_suspend=save)
        assert seen["outcome"].ok, seen["outcome"].error
        assert ECHOED not in r.console.decode() and EOF_LINE not in r.console.decode()
        client.close()
        domctl.destroydomain(hv, dom)  # its socket goes with it
    return image, sock


def restore_elsewhere(image: Path, sock: Path, connected: bool) -> dict:
    p = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, str(image), str(sock),
                        "1" if connected else "0"], cwd=ROOT, env=checkout_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_blocked_read_survives_a_restore_with_the_host_connected(saved):
    out = restore_elsewhere(*saved, connected=True)
    resumed = out["after_resume"]
    assert "virtio_console: restored: vport0p1 host open" in resumed
    assert EOF_LINE not in resumed and ECHOED not in resumed  # still waiting
    assert out["reason_resume"] == "running"
    assert out["echo"] == "AFTER THE RESTORE\n"
    assert f"{ECHOED} 18 bytes" in out["end"]
    assert EOF_LINE in out["end"] and out["reason"] == "poweroff"  # the disconnect reached it


def test_blocked_read_ends_at_a_restore_with_the_host_gone(saved):
    out = restore_elsewhere(*saved, connected=False)
    assert "virtio_console: restored: vport0p1 host closed" in out["after_resume"]
    assert EOF_LINE in out["after_resume"] and ECHOED not in out["end"]
    assert out["reason"] == "poweroff"


def test_blocked_read_survives_a_checkpoint(booted, tmp_path):
    sock = tmp_path / "e.sock"
    hv, dom = booted(console_config(sock))
    client = connect(sock)
    r = run_domain(hv, dom, 30 * MS, requests=[parse_request("15ms checkpoint")])
    console = r.console.decode()
    assert "virtio_console: restored: vport0p1 host open" in console  # the thaw
    assert EOF_LINE not in console and r.reason == "running"
    client.sendall(b"after the checkpoint\n")
    run_domain(hv, dom, 50 * MS)
    assert client.recv(100) == b"AFTER THE CHECKPOINT\n"
    client.close()
    r = run_domain(hv, dom, None)
    assert EOF_LINE in r.console.decode() and r.reason == "poweroff"


def test_pvlab_console_port_through_the_daemon(tmp_path):
    """``pvlab console DOM --port NAME`` bridges its input and output to the
    port's socket; Ctrl-] detaches. A port that is not there is one line."""
    from tests.test_daemon import Daemon, write_config

    workdir = Path(tempfile.mkdtemp(prefix="pvc", dir="/tmp"))  # a short socket path
    daemon = Daemon(workdir)
    try:
        sock = workdir / "e.sock"
        config = write_config(workdir, "vc", cmdline="run=portecho",
                              extra=f'channel = ["name=echo, connection=socket, '
                                    f'path={sock}"]\n')
        daemon("domain-create", config=str(config), paused=True)
        cli = [sys.executable, "-m", "hypervisor", "console", "--socket", str(daemon.sock),
               "vc"]
        bad = subprocess.run([*cli, "--port", "nosuch"], env=checkout_env(),
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "no console port 'nosuch'" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        proc = subprocess.Popen([*cli, "--port", "echo"], env=checkout_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        for _ in range(1200):  # the client is there before the guest reads
            if daemon("domain-console", domain="vc", port="echo")["port"]["host_connected"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("pvlab console --port never connected")
        daemon("domain-unpause", domain="vc")
        proc.stdin.write(b"through the cli\n")
        proc.stdin.flush()
        seen = b""
        while b"THROUGH THE CLI\n" not in seen:
            chunk = proc.stdout.read1(100)
            assert chunk, proc.stderr.read().decode()
            seen += chunk
        proc.stdin.write(b"\x1d")  # Ctrl-]
        proc.stdin.close()
        assert proc.wait(60) == 0
        assert b"detached from domain" in proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_example_configuration_loads():
    from hypervisor.toolstack.config import load_config
    cfg = load_config(ROOT / "examples/console.toml")
    assert [c.name for c in cfg.channels] == ["echo", "log"]


def test_nodetach_leaves_the_users_running_through_the_freeze(booted, tmp_path):
    """virtio.nodetach=1: the freeze neither cancels the control work nor
    stops the port's users (the planted bug tests/test_console_explore.py
    finds); without it, it does both."""
    for cmdline, said in (("run=portecho", "control work cancelled (0 messages dropped)\n"),
                          ("run=portecho virtio.nodetach=1",
                           "the control work and the users not stopped)\n")):
        sock = tmp_path / f"{len(cmdline)}.sock"
        hv, dom = booted(console_config(sock, cmdline=cmdline))
        client = connect(sock)
        r = run_domain(hv, dom, 20 * MS, requests=[parse_request("10ms checkpoint")])
        frozen = next(line for line in r.console.decode().splitlines(keepends=True)
                      if "virtio_console: frozen" in line)
        assert frozen.endswith(said), frozen
        client.close()


def test_a_client_that_reads_late_gets_every_byte(booted, tmp_path):
    """The host throttles a port whose client does not read (QEMU's generic
    port): portecho's writes wait for its buffer to be used, none is lost or
    overwritten, and they go on as the client reads."""
    sock = tmp_path / "e.sock"
    hv, dom = booted(console_config(sock))
    client = connect(sock)
    run_domain(hv, dom, 20 * MS)
    con = dom.devices[0].device
    con.ports[1].backend.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setblocking(False)
    payload = bytes(b"abcdefghijklmnopqrstuvwxyz\n"[i % 27] for i in range(48 * 1024))
    sent, got, t, unread = 0, b"", 20 * MS, 0
    for _ in range(5000):
        if len(got) == len(payload):
            break
        try:
            sent += client.send(payload[sent:sent + 8192]) if sent < len(payload) else 0
        except BlockingIOError:
            pass
        t += MS
        run_domain(hv, dom, t)
        if con.metrics.tx_throttled and unread < 20:
            unread += 1  # 20 ms more, throttled: the guest would write on if it could
            continue
        try:
            got += client.recv(65536)
        except BlockingIOError:
            pass
    assert got == payload.upper()
    assert con.metrics.tx_throttled > 0 and con.metrics.tx_dropped == 0
    client.close()
