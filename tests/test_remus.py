"""Remus (remus.py, save.write_checkpointed_stream, restore.receive_checkpoints):
a guest replicated in epochs to a backup, its console output held until the
epoch that produced it has committed there. The primary here dies at
chosen octets of its stream (its connections cut, nothing more done, as a
SIGKILL leaves them); the backup fails over to the last committed epoch and
the guest runs to its end: what the primary let out plus what the backup
shows is the uninterrupted run's output, no line lost or repeated. The
primary's stream ending cleanly (the guest shut down) leaves the backup
with nothing to run; a backup that goes away leaves the primary running
alone with its held output let out. The same with real processes and
SIGKILL at real times is the slow test at the end."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from hypervisor.toolstack import remus, stream
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.migrate import Channel, MigrateError
from hypervisor.toolstack.session import run_domain
from hypervisor.toolstack.transport import Destination, parse_remus_target
from tests.conftest import ROOT, booting, checkout_env

EXAMPLE = ROOT / "examples" / "live-save.toml"
AT_NS = 3_000_000
INTERVAL_NS = 2_000_000


def programs(out: bytes) -> list[str]:
    """The programs' lines (the kernel's and the toolstack's, which differ
    with every suspend, aside), sorted: two VCPUs interleave them freely."""
    return sorted(line for line in out.decode().splitlines() if not line.startswith("["))


@pytest.fixture(scope="module")
def reference():
    with booting() as boot:
        r = run_domain(*boot(load_config(EXAMPLE)))
    assert r.reason == "poweroff"
    return programs(r.console)


class Killed(Exception):
    """The primary's process is gone."""


class DyingWriter(io.RawIOBase):
    """The primary's stream, cut after ``limit`` octets: its connection
    shut, as the kernel shuts a killed process's sockets."""

    def __init__(self, out, limit: int, socks: list[socket.socket]) -> None:
        self.out, self.limit, self.socks, self.sent = out, limit, socks, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        room = self.limit - self.sent
        if room <= 0 or len(data) > room:
            self.out.write(bytes(data[:max(room, 0)]))
            self.die()
        self.out.write(data)
        self.sent += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()

    def die(self) -> None:
        self.out.flush()
        for s in self.socks:
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        raise Killed


class DyingReader(io.RawIOBase):
    """The backup's end of the stream, gone after ``limit`` octets."""

    def __init__(self, src, limit: int, socks: list[socket.socket]) -> None:
        self.src, self.limit, self.socks, self.got = src, limit, socks, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.got >= self.limit:
            for s in self.socks:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            raise Killed
        data = self.src.read(n)
        self.got += len(data)
        return data


def channel(sock: socket.socket) -> Channel:
    return Channel(sock.makefile("rb"), sock.makefile("wb"), closer=lambda _w: sock.close())


def replicate(limit: int | None = None, backup_dies: bool = False,
              dies_awaiting: int | None = None):
    """A primary in this thread, a backup in another, on socket pairs. The
    primary dies after ``limit`` octets of its stream (None: never), or
    once epoch ``dies_awaiting`` is on the wire, before its acknowledgement
    is read (the backup commits what the primary never lets out). Returns
    (what the primary let out, what the backup showed, the primary's
    outcome or None if it died, the backup's notes)."""
    main_p, main_b = socket.socketpair()
    shown, notes, backup_out = bytearray(), [], {}

    def backup() -> None:
        ch = channel(main_b)
        if backup_dies:  # after the first epoch and a few more octets
            ch.reader = DyingReader(ch.reader, 21_000_000, [main_b])
        try:
            got = remus.remus_receive(ch, say=notes.append)
        except (Killed, MigrateError):
            return
        if got is not None:
            shown.extend(got.output)
            r = run_domain(got.hv, got.dom, None, lambda _d, data: shown.extend(data))
            backup_out["reason"] = r.reason
        ch.close()

    t = threading.Thread(target=backup)
    t.start()
    released = bytearray()
    outcome = None
    with booting() as boot:
        hv, dom = boot(load_config(EXAMPLE))
        writer = DyingWriter(main_p.makefile("wb"), limit or 1 << 62, [main_p])
        read_ack = remus.read_ack

        def awaiting(src, epoch: int) -> None:
            if epoch == dies_awaiting:
                writer.die()
            read_ack(src, epoch)

        def connect() -> Channel:
            return Channel(main_p.makefile("rb"), writer, closer=lambda _w: main_p.close())
        remus.read_ack = awaiting
        try:
            outcome = remus.remus_run(hv, dom, AT_NS, connect,
                                      lambda _d, data: released.extend(data), INTERVAL_NS,
                                      note=notes.append)
        except Killed:
            pass
        finally:
            remus.read_ack = read_ack
        t.join()
    return bytes(released), bytes(shown), outcome, notes, backup_out


@pytest.fixture(scope="module")
def whole():
    return replicate()


def test_a_whole_run_replicates_every_epoch_and_lets_all_output_out(whole, reference):
    released, shown, outcome, notes, _ = whole
    assert outcome.error == "" and outcome.result.reason == "poweroff"
    assert outcome.epochs > 10
    assert programs(released) == reference
    assert shown == b""
    assert any("the primary ended the replication" in n for n in notes)


# the stream of the whole run is some 44 MB: the first epoch (the live
# rounds and the final one) about 20 MB, then some 0.4 MB an epoch
@pytest.mark.parametrize("limit, awaiting", [
    (31_000_000, None), (None, 3),
    pytest.param(None, 30, marks=pytest.mark.slow)])
def test_the_primary_killed_fails_over_with_every_line_once(limit, awaiting, reference):
    released, shown, outcome, notes, backup = replicate(limit, dies_awaiting=awaiting)
    assert outcome is None  # it died
    assert any(n.startswith("Remus Failover for domain") for n in notes)
    assert backup["reason"] == "poweroff"
    assert programs(released + shown) == reference


def test_output_is_held_until_its_epoch_is_acknowledged():
    sink, log, dom = bytearray(), io.BytesIO(), object()
    buf = remus.OutputBuffer(lambda _d, data: sink.extend(data), log=log)
    buf.hold(dom, b"a")
    buf.start_new_epoch()          # epoch 0 closed at its suspend
    buf.hold(dom, b"b")
    assert sink == b""
    buf.release_one(0)
    assert sink == b"a"            # epoch 1's output waits for its own commit
    buf.start_new_epoch()
    buf.release_all()
    assert sink == b"ab"
    # the backup learns each epoch's output and each release, in order
    # REMUS_OUTPUT records, as they ride the stream
    end, log = log.tell(), io.BytesIO(log.getvalue())
    got = remus.OutputLog()
    while log.tell() < end:
        got.take(stream.read_record(log, log.tell()))
    assert got.held == {0: b"a", 1: b"b"} and got.released == 0
    assert got.unreleased(1) == b"b"


def test_a_backup_that_dies_leaves_the_primary_running_its_output_let_out(reference):
    released, _, outcome, notes, _ = replicate(backup_dies=True)
    assert remus.BACKUP_FAILED in notes
    assert outcome.result.reason == "poweroff"
    assert programs(released) == reference


@pytest.mark.parametrize("text, why", [
    ("nowhere", "HOST:PORT"),
    ("127.0.0.1:99999", "HOST:PORT"),
    ("127.0.0.1:7001 -i 0", "milliseconds"),
    ("127.0.0.1:7001 -i x", "milliseconds"),
    ("-s 'ssh -p 22' 127.0.0.1:7001", "-s goes with ssh:HOST"),
    ("127.0.0.1:7001 ssh:b", "want"),
])
def test_a_bad_remus_request_is_refused_before_the_run(capsys, text, why):
    with pytest.raises(ValueError, match=why):
        parse_remus_target(text)
    # pvlab run says it in one line, exit 2, before the guest runs
    assert main(["run", str(EXAMPLE), "--request", f"3ms remus {text}"]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="remus takes the backup"):
        parse_request("3ms remus ")


def test_a_remus_request_names_the_backup_and_the_interval():
    req = parse_request("3ms remus 127.0.0.1:7001 -i 5")
    assert req.command == "remus"
    assert parse_remus_target(req.value) == (Destination("127.0.0.1", 7001), 5_000_000)
    assert parse_remus_target("localhost:9") == (Destination("localhost", 9), None)
    # over ssh, main_remus's rune: migrate-receive -r on the far side
    dest, interval = parse_remus_target("-i 2 -s 'ssh -p 2222' ssh:b")
    assert dest.rune == "exec ssh -p 2222 b pvlab migrate-receive -r" and interval == 2_000_000


# --- real processes ------------------------------------------------------------------

def _pvlab(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hypervisor.toolstack.cli", *args],
                            cwd=ROOT, env=checkout_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def _backup() -> tuple[subprocess.Popen, int]:
    b = _pvlab("migrate-receive", "-r", "--listen", "127.0.0.1:0")
    line = b.stderr.readline().decode()
    assert line.startswith("migration target: listening on 127.0.0.1:"), line
    return b, int(line.rsplit(":", 1)[1])


def _primary(port: int) -> subprocess.Popen:
    return _pvlab("run", str(EXAMPLE), "--request", f"3ms remus 127.0.0.1:{port} -i 2")


@pytest.mark.slow
@pytest.mark.parametrize("lines", [1, 6])
def test_sigkill_of_the_primary_process_fails_over_exactly_once(lines, reference):
    """The primary killed once it has let out ``lines`` lines of the
    programs' output after Remus began (early and late; the in-process
    kills above take other points)."""
    b, port = _backup()
    p = _primary(port)
    out = bytearray()
    started, seen = False, 0
    while seen < lines:
        line = p.stdout.readline()
        assert line, "the primary ended before it was killed"
        out += line
        if line.startswith(b"[toolstack]") and b"Remus to the backup" in line:
            started = True
        elif started and not line.startswith(b"["):
            seen += 1
    os.kill(p.pid, signal.SIGKILL)
    out += p.stdout.read()
    p.wait()
    shown, err = b.communicate(timeout=120)
    assert b"Remus Failover for domain" in err, err.decode()
    assert programs(bytes(out) + shown) == reference


@pytest.mark.slow
def test_sigkill_of_the_backup_leaves_the_primary_running_to_its_results(reference):
    b, port = _backup()
    p = _primary(port)
    out = bytearray()
    while b"Remus to the backup" not in out:
        out += p.stdout.readline()
    b.kill()  # as Remus begins: before the banner, or inside the first epoch
    b.wait()
    rest, _ = p.communicate(timeout=120)
    out += rest
    assert p.returncode == 0
    assert remus.BACKUP_FAILED.encode() in out
    assert programs(bytes(out)) == reference
