"""The host daemon: each test starts its own ``pvlab daemon`` in a child
process on a socket in a fresh directory, drives it with the QMP client, and
stops it. Domains are made, listed, paused, ballooned, saved (to a file and
as a checkpoint), restored, shut down and destroyed; their consoles are
typed at; bad requests leave the daemon answering and its other domains
running; images move between the daemon and the scripted ``pvlab
save``/``restore`` both ways."""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.toolstack.qmp import Client, DaemonNotRunning, QmpError
from tests.conftest import ROOT, checkout_env

GUEST = ROOT / "firmware" / "guest.elf"
WAIT_S = 60.0  # the most a test waits for the daemon or a guest (a slow machine)
POLL_S = 0.05  # how often a test looks again for what it waits for
POLLS = int(WAIT_S / POLL_S)
# results of a computing guest: what it prints is fixed by its arguments
RESULTS = ("hashchain digest", "counter ")
COMPUTE = "run=hashchain:300:32,counter:3:100000"


def write_config(d: Path, name: str, cmdline: str = "run=sh", memory: int = 16,
                 extra: str = "") -> Path:
    path = d / f"{name}.toml"
    path.write_text(f'name = "{name}"\nmemory = {memory}\nvcpus = 1\nimage = "{GUEST}"\n'
                    f'cmdline = "{cmdline}"\nseed = 1\n{extra}')
    return path


class Daemon:
    """A daemon in a child process, and a client of it."""

    def __init__(self, d: Path, *args: str) -> None:
        self.dir = d
        self.sock = d / "run" / "pvlab.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hypervisor", "daemon", "--socket", str(self.sock),
             "--memory", "256", *args], env=checkout_env(), stderr=subprocess.PIPE)
        self.client = self.connect()

    def connect(self) -> Client:
        for _ in range(POLLS):
            try:
                return Client(self.sock, timeout=WAIT_S)
            except DaemonNotRunning:
                if self.proc.poll() is not None:
                    raise
                time.sleep(POLL_S)
        return Client(self.sock, timeout=WAIT_S)

    def __call__(self, command: str, **arguments: Any) -> Any:
        return self.client.execute(command, arguments)

    def event(self, event: str, **match: Any) -> dict[str, Any]:
        """The next ``event`` whose data has ``match``; others are passed over."""
        while True:
            ev = self.client.next_event(WAIT_S)
            assert ev is not None, f"no {event} event came"
            if ev["event"] == event and all(ev["data"].get(k) == v for k, v in match.items()):
                return ev

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self("quit")
            except (OSError, QmpError):
                pass
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # a short path: a Unix socket's path has at most 107 bytes
    d = Path(tempfile.mkdtemp(prefix="pvd", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Daemon]:
    dmn = Daemon(workdir)
    yield dmn
    dmn.stop()


class Console:
    """A client of a domain's console socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(path)
        self.seen = bytearray()

    def type(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def until(self, marker: str) -> str:
        """Read until ``marker`` has come; everything read so far."""
        while marker.encode() not in self.seen:
            data = self.sock.recv(4096)
            assert data, f"the console closed before {marker!r} came"
            self.seen += data
        return self.seen.decode(errors="replace")

    def to_end(self) -> str:
        """Everything until the domain goes (the daemon closes its console)."""
        while data := self.sock.recv(4096):
            self.seen += data
        return self.seen.decode(errors="replace")

    def close(self) -> None:
        self.sock.close()


def results(text: str) -> list[str]:
    return sorted(line.strip() for line in text.splitlines() if line.startswith(RESULTS))


def state(daemon: Daemon, name: str) -> str:
    return next(r["state"] for r in daemon("domain-list") if r["name"] == name)


def wait_state(daemon: Daemon, name: str, letter: str) -> None:
    for _ in range(POLLS):
        if letter in state(daemon, name):
            return
        time.sleep(POLL_S)
    raise AssertionError(f"{name} never showed {letter!r}")


def shell(daemon: Daemon, workdir: Path, name: str = "sh", paused: bool = False,
          extra: str = "") -> tuple[dict[str, Any], Console]:
    """A shell guest with a console attached, at its first prompt."""
    made = daemon("domain-create", config=str(write_config(workdir, name, extra=extra)),
                  paused=paused)
    con = Console(daemon("domain-console", domain=name)["path"])
    if not paused:
        con.until("$ ")
    return made, con


# --- domains -----------------------------------------------------------------------------

def test_create_list_pause_destroy(daemon: Daemon, workdir: Path) -> None:
    made, con = shell(daemon, workdir, paused=True)
    assert made["name"] == "sh" and made["domid"] >= 1
    assert daemon.event("DOMAIN_CREATED")["data"] == made
    (row,) = daemon("domain-list")
    assert row["state"][2] == "p" and row["vcpus"] == 1 and row["memory_mib"] >= 16
    info = daemon("domain-info", domain=made["domid"])
    assert info["name"] == "sh" and info["paused"] and len(info["vcpu_list"]) == 1
    daemon("domain-unpause", domain="sh")
    con.until("$ ")
    wait_state(daemon, "sh", "b")  # the shell waits for a line
    daemon("domain-pause", domain="sh")
    assert state(daemon, "sh") == "-bp---"
    # print_vcpuinfo: blocked, not running; "p" is for an offline VCPU only
    assert daemon("domain-vcpu-list", domain="sh")[0]["state"] == "-b-"
    with pytest.raises(QmpError) as e:
        daemon("domain-create", config=str(write_config(workdir, "sh")))
    assert "already exists" in e.value.desc
    daemon("domain-destroy", domain="sh")
    assert daemon.event("DOMAIN_DESTROYED")["data"] == made
    assert daemon("domain-list") == []
    with pytest.raises(QmpError) as e:
        daemon("domain-pause", domain="sh")
    assert e.value.klass == "DomainNotFound"
    con.close()
    # a new domain never gets the domid of one just destroyed (Xen's domid_alloc)
    again = daemon("domain-create", config=str(write_config(workdir, "sh")), paused=True)
    assert again["domid"] == made["domid"] + 1


def test_console_and_socket_modes(daemon: Daemon, workdir: Path) -> None:
    _, con = shell(daemon, workdir)
    con.type("hello\n")
    assert "hello from user space" in con.until("exited with code 0")
    path = Path(daemon("domain-console", domain="sh")["path"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.sock.parent.stat().st_mode) == 0o700
    late = Console(str(path))  # a second client gets the recent output first
    assert "hello from user space" in late.until("hello from user space")
    daemon("domain-destroy", domain="sh")
    assert con.to_end() and not path.exists()
    con.close()
    late.close()


def test_deterministic_clock(workdir: Path) -> None:
    """The deterministic clock's daemon: the same commands, the same console."""
    daemon = Daemon(workdir, "--clock", "deterministic")
    try:
        assert daemon("host-info")["clock"] == "deterministic"
        _, con = shell(daemon, workdir)
        con.type("hello\n")
        assert "hello from user space" in con.until("exited with code 0")
        daemon("domain-shutdown", domain="sh", reason="poweroff")
        assert daemon.event("SHUTDOWN")["data"]["reason"] == "poweroff"
        con.close()
    finally:
        daemon.stop()


def test_shutdown_poweroff_and_reboot(daemon: Daemon, workdir: Path) -> None:
    made, con = shell(daemon, workdir)
    daemon("domain-shutdown", domain="sh", reason="reboot")
    assert daemon.event("SHUTDOWN")["data"]["reason"] == "reboot"
    again = daemon.event("DOMAIN_CREATED", name="sh")["data"]  # on_reboot=restart
    assert again["domid"] != made["domid"]
    con.close()
    con = Console(daemon("domain-console", domain="sh")["path"])
    con.until("$ ")
    daemon("domain-shutdown", domain="sh", reason="poweroff")
    assert daemon.event("SHUTDOWN")["data"] == {**again, "reason": "poweroff"}
    daemon.event("DOMAIN_DESTROYED", domid=again["domid"])  # on_poweroff=destroy
    assert daemon("domain-list") == []
    con.close()


def test_mem_set_and_mem_max(daemon: Daemon, workdir: Path) -> None:
    shell(daemon, workdir, extra='[balloon]\nstats_interval = "5ms"\n')[1].close()
    daemon("domain-mem-set", domain="sh", kib=12 * 1024)
    ev = daemon.event("BALLOON_CHANGE")
    assert ev["data"]["target_kib"] == 12 * 1024
    while ev["data"]["actual_kib"] != 12 * 1024:  # the driver gives the pages back
        ev = daemon.event("BALLOON_CHANGE")
    with pytest.raises(QmpError):
        daemon("domain-mem-set", domain="sh", kib=64 * 1024)  # above its memory
    daemon("domain-mem-max", domain="sh", kib=32 * 1024)
    assert daemon("domain-info", domain="sh")["maxmem_mib"] == 32
    with pytest.raises(QmpError):
        daemon("domain-mem-max", domain="sh", kib=1024)  # below what it holds


# --- save and restore ----------------------------------------------------------------------

def test_save_checkpoint_runs_on(daemon: Daemon, workdir: Path) -> None:
    made, con = shell(daemon, workdir)
    img = workdir / "ck.img"
    out = daemon("domain-save", domain="sh", file=str(img), checkpoint=True)
    assert out["file"] == str(img) and out["pages"] > 0 and out["bytes"] == img.stat().st_size
    daemon.event("RESUME", domid=made["domid"])
    con.type("hello\n")  # the same domain runs on
    assert "hello from user space" in con.until("exited with code 0")
    assert [r["domid"] for r in daemon("domain-list")] == [made["domid"]]
    con.close()


@pytest.mark.slow
def test_save_restore_equals_uninterrupted_two_domains(daemon: Daemon, workdir: Path) -> None:
    """Two computing guests at once; one is saved and restored, and both
    print the same results."""
    ref_cfg = write_config(workdir, "ref", COMPUTE)
    cfg = write_config(workdir, "hc", COMPUTE)
    daemon("domain-create", config=str(ref_cfg), paused=True)
    daemon("domain-create", config=str(cfg), paused=True)
    ref = Console(daemon("domain-console", domain="ref")["path"])
    before = Console(daemon("domain-console", domain="hc")["path"])
    daemon("domain-unpause", domain="ref")
    daemon("domain-unpause", domain="hc")
    before.until("hashchain start")
    img = workdir / "hc.img"
    daemon("domain-save", domain="hc", file=str(img))
    text = before.to_end()  # saved away: destroyed
    made = daemon("domain-restore", file=str(img), paused=True)
    assert made["name"] == "hc"
    after = Console(daemon("domain-console", domain="hc")["path"])
    daemon("domain-unpause", domain="hc")
    saved_restored = results(text + after.to_end())
    assert saved_restored == results(ref.to_end())
    assert len(saved_restored) == 4
    for c in (ref, before, after):
        c.close()


def pvlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", *args], env=checkout_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_images_move_between_daemon_and_scripted(daemon: Daemon, workdir: Path) -> None:
    """An image the daemon saved restores with ``pvlab restore``, and one
    ``pvlab save`` wrote restores into the daemon; each guest ends with the
    uninterrupted run's results."""
    cfg = write_config(workdir, "hc", COMPUTE)
    whole = pvlab("run", str(cfg), "--fast")
    assert whole.returncode == 0
    expected = results(whole.stdout)
    daemon("domain-create", config=str(cfg), paused=True)
    con = Console(daemon("domain-console", domain="hc")["path"])
    daemon("domain-unpause", domain="hc")
    con.until("hashchain start")
    img = workdir / "from-daemon.img"
    daemon("domain-save", domain="hc", file=str(img))
    first = con.to_end()
    restored = pvlab("restore", str(img))
    assert restored.returncode == 0, restored.stderr
    assert results(first + restored.stdout) == expected

    img2 = workdir / "from-pvlab.img"
    saved = pvlab("save", str(cfg), str(img2), "--at", "3ms")
    assert saved.returncode == 0, saved.stderr
    daemon("domain-restore", file=str(img2), paused=True)
    con = Console(daemon("domain-console", domain="hc")["path"])
    daemon("domain-unpause", domain="hc")
    assert results(saved.stdout + con.to_end()) == expected


# --- failures leave the daemon and its other domains as they were ------------------------------

def test_bad_requests_leave_the_daemon_answering(daemon: Daemon, workdir: Path) -> None:
    made, con = shell(daemon, workdir)
    bad = workdir / "bad.toml"
    bad.write_text("name = \n")
    junk = workdir / "junk.img"
    junk.write_bytes(b"not an image" * 100)
    huge = write_config(workdir, "huge", memory=1024)
    failures = [
        ("domain-create", {"config": str(bad)}),
        ("domain-create", {"config": str(workdir / "missing.toml")}),
        ("domain-create", {"config": str(huge)}),  # more than the machine has
        ("domain-create", {"config": "relative.toml"}),
        ("domain-restore", {"file": str(junk)}),
        ("domain-save", {"domain": "sh", "file": str(workdir / "no" / "dir.img")}),
        ("domain-shutdown", {"domain": "sh", "reason": "explode"}),
        ("domain-mem-set", {"domain": "sh", "kib": 4096}),  # no balloon
        ("domain-pause", {"domain": 99}),
        ("domain-pause", {}),
    ]
    for command, args in failures:
        with pytest.raises(QmpError) as e:
            daemon(command, **args)
        assert e.value.desc, command
    assert not any(workdir.glob("no*"))
    assert [r["domid"] for r in daemon("domain-list")] == [made["domid"]]
    con.type("hello\n")
    assert "hello from user space" in con.until("exited with code 0")
    con.close()


def test_failed_saves_leave_guests_running(daemon: Daemon, workdir: Path) -> None:
    """A save the guest never acknowledges (built without save/restore) and one
    whose file cannot be written: an error each, no file, the guests run on."""
    made = daemon("domain-create",
                  config=str(write_config(workdir, "ns", "run=sh nosaverestore")))
    con = Console(daemon("domain-console", domain="ns")["path"])
    con.until("$ ")
    img = workdir / "ns.img"
    with pytest.raises(QmpError) as e:
        daemon("domain-save", domain="ns", file=str(img))
    assert "did not acknowledge" in e.value.desc and not img.exists()
    con.type("hello\n")
    assert "hello from user space" in con.until("exited with code 0")
    _, sh = shell(daemon, workdir)
    unwritable = Path("/proc/pvlab-test.img")  # no file can be made in /proc, even by root
    with pytest.raises(QmpError) as e:
        daemon("domain-save", domain="sh", file=str(unwritable))
    assert "cannot write" in e.value.desc and "the guest runs on" in e.value.desc
    daemon.event("RESUME", name="sh")
    sh.type("hello\n")
    assert "hello from user space" in sh.until("exited with code 0")
    assert {r["name"] for r in daemon("domain-list")} == {"ns", "sh"}
    assert daemon("domain-list")[0]["domid"] == made["domid"]
    con.close()
    sh.close()


def test_a_client_gone_mid_save_and_two_clients(daemon: Daemon, workdir: Path) -> None:
    """A client that goes away while its save waits: the save is still made,
    its answer dropped; a second client sees the events and is answered."""
    made, con = shell(daemon, workdir)
    other = Client(daemon.sock, timeout=WAIT_S)
    img = workdir / "gone.img"
    gone = Client(daemon.sock, timeout=WAIT_S)  # greeted and negotiated
    gone.sock.sendall(b'{"execute": "domain-save", "arguments": {"domain": "sh", "file": "'
                      + str(img).encode() + b'"}}\n')
    gone.close()
    while True:
        ev = other.next_event(WAIT_S)
        assert ev is not None
        if ev["event"] == "DOMAIN_DESTROYED":
            break
    assert ev["data"] == made and img.exists()
    assert other.execute("domain-list") == []
    other.close()
    con.close()


def test_quit_and_sigterm_stop_every_domain_and_remove_the_sockets(workdir: Path) -> None:
    for stop in ("quit", "sigterm"):
        daemon = Daemon(workdir)
        _, con = shell(daemon, workdir)
        console = Path(daemon("domain-console", domain="sh")["path"])
        if stop == "quit":
            assert daemon("quit") == {}
        else:
            daemon.proc.terminate()
        assert daemon.proc.wait(WAIT_S) == 0
        assert con.to_end() and not console.exists() and not daemon.sock.exists()
        con.close()
        daemon.stop()


# --- the command line ------------------------------------------------------------------------

@pytest.mark.slow
def test_detach_status_stop(workdir: Path) -> None:
    sock = workdir / "run" / "pvlab.sock"
    pidfile = workdir / "d.pid"
    started = pvlab("daemon", "--detach", "--socket", str(sock), "--pidfile", str(pidfile),
                    "--memory", "64")
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    try:
        status = pvlab("daemon", "status", "--socket", str(sock))
        assert status.returncode == 0 and "0 domain(s)" in status.stdout
        again = pvlab("daemon", "--socket", str(sock))
        assert again.returncode == 2 and "already listens" in again.stderr
        stopped = pvlab("daemon", "stop", "--socket", str(sock))
        assert stopped.returncode == 0, stopped.stderr
        assert not sock.exists() and not pidfile.exists()
    finally:
        if pidfile.exists():
            subprocess.run(["kill", str(pid)], check=False)
    status = pvlab("daemon", "status", "--socket", str(sock))
    assert status.returncode == 1
    assert status.stderr.strip().startswith("pvlab: no pvlab daemon is listening")
    bad = pvlab("daemon", "--memory", "5", "--socket", str(sock))
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


_PARAMS = {"domain-create": ("config", "paused"), "domain-info": ("domain",),
           "domain-pause": ("domain",), "domain-unpause": ("domain",),
           "domain-destroy": ("domain",), "domain-shutdown": ("domain", "reason"),
           "domain-save": ("domain", "file", "checkpoint", "paused", "live"),
           "domain-restore": ("file", "paused"), "domain-mem-set": ("domain", "kib"),
           "domain-mem-max": ("domain", "kib"), "domain-vcpu-list": ("domain",),
           "domain-console": ("domain",), "host-dmesg": ("clear",),
           # migrations that cannot go anywhere: nobody listens, a receiver that
           # says nothing, descriptors never passed
           "migrate": ("domain", "uri"), "migrate-incoming": ("uri", "paused"),
           "query-migrate": ("domain",), "migrate_cancel": ("domain",), "getfd": ("fdname",),
           "closefd": ("fdname",)}


def _mostly(usual: Any, rare: Any) -> Any:
    """``usual`` six times in seven, ``rare`` otherwise."""
    from hypothesis import strategies as st
    return st.integers(0, 6).flatmap(lambda n: rare if n == 6 else usual)


def _fuzz_calls(workdir: Path, commands: list[str]) -> Any:
    """The daemon's own commands, each mostly with its own arguments and
    values that mean something (the domain by name or domid, a configuration
    and images that exist, do not, or are no image), sometimes with values of
    any type or an argument it does not take."""
    from hypothesis import strategies as st
    junk = workdir / "junk.img"
    junk.write_bytes(b"not an image" * 100)
    anything = st.one_of(st.none(), st.booleans(), st.integers(-2, 2 ** 40),
                         st.text(max_size=8), st.lists(st.integers(), max_size=2))
    files = [str(workdir / n) for n in ("sh.img", "sh2.img", "no/dir.img")] + [str(junk)]
    meaning = {"domain": st.sampled_from(["sh", "sh2", 1, 2, 3, "4", "nosuch"]),
               "config": st.sampled_from([str(workdir / "sh.toml"), str(workdir / "sh2.toml"),
                                          str(workdir / "none.toml"), "sh.toml"]),
               "file": st.sampled_from(files), "paused": st.booleans(),
               "checkpoint": st.booleans(), "clear": st.booleans(), "live": st.booleans(),
               "uri": st.sampled_from(["tcp:127.0.0.1:1", "exec:true", "fd:nope", "bogus"]),
               "fdname": st.sampled_from(["a", "b"]),
               "reason": st.sampled_from(["poweroff", "reboot", "halt", "explode"]),
               "kib": st.sampled_from([0, 4096, 12 * 1024, 16 * 1024, 1 << 40, -1])}

    def arguments(command: str) -> Any:
        keys = _PARAMS.get(command, ())
        given = {k: _mostly(meaning[k], anything) for k in keys}
        extra = _mostly(st.just({}), st.fixed_dictionaries({"extra": anything}))
        args = st.tuples(st.fixed_dictionaries(given), extra).map(lambda a: {**a[0], **a[1]})
        return st.tuples(st.just(command), args)

    calls = st.sampled_from(commands).flatmap(arguments)
    first = st.just(("domain-create", {"config": str(workdir / "sh.toml")}))
    return st.tuples(first, st.lists(calls, min_size=1, max_size=6)).map(
        lambda c: [c[0], *c[1]])


def test_fuzzed_commands_leave_the_daemon_answering(daemon: Daemon, workdir: Path) -> None:
    """Hypothesis throws the daemon's own commands at it with arguments of
    every kind, domains made, paused, saved and destroyed among them: every
    answer is a return or a one-line error, and the daemon still answers."""
    from hypothesis import HealthCheck, given, settings
    write_config(workdir, "sh")
    write_config(workdir, "sh2")
    commands = [c["name"] for c in daemon("query-commands") if c["name"] not in
                ("quit", "qmp_capabilities")]

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(_fuzz_calls(workdir, commands))
    def fuzz(calls: list[tuple[str, dict[str, Any]]]) -> None:
        for command, args in calls:
            try:
                daemon.client.execute(command, args, timeout=WAIT_S)
            except QmpError as e:
                assert e.klass in ("GenericError", "DomainNotFound") and e.desc, command
                assert "\n" not in e.desc and "Traceback" not in e.desc, e.desc
        assert "pvlab" in daemon("query-version")

    fuzz()
    assert daemon.proc.poll() is None
