"""Live migration with xl's handshake (migrate.py, transport.py; xl_migrate.c):
a writing guest migrated to another process ends with the results of an
uninterrupted run, the octets on the wire are xl's, and every row of xl's
failure matrix leaves the guest running at the source (its suspend
hypercall returning 1, THAW, if it had suspended; or never suspended) and
nothing at the target; after GO the sender gives xl's warning and keeps its
copy suspended and renamed.

The receivers that are killed are real ``pvlab migrate-receive`` processes,
killed (SIGKILL) by the test's side of the wire at the moment the wire
shows: before the banner, mid-stream, after the ready message, after GO."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hypervisor.domctl import physinfo
from hypervisor.domctl import vcpu_clocks as dom_clocks
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.toolstack import migrate, save
from hypervisor.toolstack.builder import build_domain
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import BalloonConfig
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.image import scan_image
from hypervisor.toolstack.migrate import (
    FAILED_BADLY,
    MIGRATE_PERMISSION_TO_GO,
    MIGRATE_RECEIVER_BANNER,
    MIGRATE_RECEIVER_READY,
    MIGRATE_REPORT,
    Channel,
    MigrateError,
    migrate_receive,
)
from hypervisor.toolstack.savefile import XL_MAGIC
from hypervisor.toolstack.session import migrate_at, run_domain
from hypervisor.toolstack.transport import parse_destination, ssh_rune
from tests.conftest import GUEST_IMAGE, ROOT, booting, checkout_env, make_config

GUEST = "run=dirtier:100:20000:1000,counter:5:100000"  # ends at 41 ms
AT_NS = 3_000_000
LIMIT_NS = 2_000_000_000
MID_STREAM = 1 << 20  # octets into the first round (16 MiB)
RECEIVER = [sys.executable, "-m", "hypervisor", "migrate-receive"]


def outcome(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(("dirtier", "counter ")))


@pytest.fixture(scope="module")
def cfg():
    return make_config(GUEST, vcpus=2, name="mig")


@pytest.fixture(scope="module")
def reference(cfg):
    with booting() as boot:
        r = run_domain(*boot(cfg), LIMIT_NS)
    assert r.reason == "poweroff"
    lines = outcome(r.console.decode())
    assert "dirtier done passes=1000" in lines and "counter 5" in lines
    return lines


def toml(path: Path, cmdline: str = GUEST, kernel: str = "") -> Path:
    path.write_text(f'name = "mig"\nmemory = 16\nvcpus = 2\nimage = "{GUEST_IMAGE}"\n'
                    f'cmdline = "{cmdline}"\nseed = 1\n'
                    + (f'kernel = "{kernel}"\n' if kernel else ""))
    return path


def empty(hv, free: int) -> bool:
    """No domain left, and as many frames free as ``free``."""
    return not hv.domains and physinfo(hv).free_pages == free


# --- both ends in this process, on pipes ------------------------------------------------

class Recorder:
    """One direction of a wire, kept for the test."""

    def __init__(self, f) -> None:
        self.f, self.data = f, bytearray()

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.data += data
        return data

    def write(self, data: bytes) -> int:
        self.data += data
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def pipes() -> tuple[Channel, Channel]:
    """(the sender's channel, the receiver's), each direction recorded."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    tx = Channel(Recorder(os.fdopen(r2, "rb")), Recorder(os.fdopen(w1, "wb")))
    rx = Channel(os.fdopen(r1, "rb"), os.fdopen(w2, "wb"))
    return tx, rx


class Target(threading.Thread):
    """migrate_receive in a thread, on ``hv`` (None: a machine of its own);
    ``watch`` sees each line it says as it says it."""

    def __init__(self, ch: Channel, hv=None, watch=None, **kwargs) -> None:
        super().__init__()
        self.ch, self.hv, self.watch, self.kwargs = ch, hv, watch, kwargs
        self.got: migrate.Received | None = None
        self.error = ""
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        if self.watch is not None:
            self.watch(line)

    def run(self) -> None:
        try:
            self.got = migrate_receive(self.ch, self.hv, say=self.say, **self.kwargs)
        except MigrateError as e:
            self.error = str(e)
        finally:
            self.ch.close()


@pytest.fixture(scope="module")
def wire(cfg):
    """One migration on pipes, both ends here: what each side said, who was
    called what when, the octets each way, and the received guest's run."""
    tx, rx = pipes()
    seen: dict[str, object] = {}
    said: list[str] = []
    with booting() as boot:
        hv_rx = boot.bare(64, seed=5)

        def at_target(line: str) -> None:
            if "Transfer complete" in line:
                seen["target"] = [(d.name, d.paused) for d in hv_rx.domains.values()]
        target = Target(rx, hv_rx, watch=at_target)
        target.start()
        hv, dom = boot(cfg)

        def at_source(line: str) -> None:
            said.append(line)
            if "Giving target permission" in line:
                seen["source"] = (dom.name, dom.shutdown_reason)
        result, out = migrate_at(hv, dom, AT_NS, lambda: tx, say=at_source)
        target.join()
        assert target.got is not None, target.error
        got = target.got
        seen["after"] = (got.dom.name, got.dom.paused, dict(hv.domains))
        after = run_domain(got.hv, got.dom, LIMIT_NS)
    return {"out": out, "said": said, "heard": target.lines, "seen": seen,
            "to_target": bytes(tx.writer.data), "to_source": bytes(tx.reader.data),
            "console": result.console.decode() + after.console.decode(), "end": after.reason}


def test_a_migrated_guest_ends_as_an_uninterrupted_run(wire, reference):
    assert wire["out"].ok and wire["end"] == "poweroff"
    assert outcome(wire["console"]) == reference
    assert "suspend hypercall returned 0" in wire["console"]


def test_the_octets_on_the_wire_are_xls(wire, tmp_path):
    """The banner without its NUL, the other three messages with theirs,
    the report's octet 0; the stream between is an xl save file's."""
    assert wire["to_source"] == (MIGRATE_RECEIVER_BANNER + MIGRATE_RECEIVER_READY
                                 + MIGRATE_REPORT + b"\0")
    assert MIGRATE_RECEIVER_BANNER == b"xl migration receiver ready, send binary domain data.\n"
    assert MIGRATE_RECEIVER_READY == b"domain received, ready to unpause\0"
    assert MIGRATE_PERMISSION_TO_GO == b"domain is yours, you are cleared to unpause\0"
    assert MIGRATE_REPORT == b"my copy unpause results are as follows\0"
    to_target = wire["to_target"]
    assert to_target.endswith(MIGRATE_PERMISSION_TO_GO)
    stream = tmp_path / "stream.img"
    stream.write_bytes(to_target[:-len(MIGRATE_PERMISSION_TO_GO)])
    info = scan_image(stream, wire=True)
    assert to_target.startswith(XL_MAGIC) and info.domain["name"] == "mig"
    assert info.domain["kind"] == "live save" and info.copies > info.nr_pfns


def test_a_guest_goes_there_and_back(cfg, reference):
    """A -> B -> A: the received domain migrates again, back to the machine
    it left (its frames and its name free there again)."""
    with booting() as boot:
        hv, dom = boot(cfg)
        console, at = "", AT_NS
        for hv_next in (boot.bare(64, seed=5), hv):
            tx, rx = pipes()
            target = Target(rx, hv_next)
            target.start()
            result, out = migrate_at(hv, dom, at, lambda tx=tx: tx)
            target.join()
            assert out.ok and target.got is not None, target.error
            console += result.console.decode()
            hv, dom = hv_next, target.got.dom
            at = max(c for c in dom_clocks(dom)) + 2_000_000
        after = run_domain(hv, dom, LIMIT_NS)
    assert after.reason == "poweroff" and dom.name == "mig"
    assert outcome(console + after.console.decode()) == reference


def test_a_guest_with_its_balloon_inflated_migrates(booted):
    """The balloon's place travels in the config, its state at the end of
    the stream: the target re-creates it, and the guest ends as it would
    have at home."""
    cfg = dataclasses.replace(
        make_config("run=dirtier:60:20000:1000,counter:5:100000", vcpus=2, memory=8,
                    name="bal"),
        balloon=BalloonConfig(0), requests=[parse_request("1ms mem-set 6")])
    ref = run_domain(*booted(cfg), LIMIT_NS, requests=cfg.requests)
    tx, rx = pipes()
    target = Target(rx, booted.bare(64, seed=5))
    target.start()
    hv, dom = booted(cfg)
    result, out = migrate_at(hv, dom, 4_000_000, lambda: tx, requests=cfg.requests)
    target.join()
    assert out.ok and target.got is not None, target.error
    assert out.info.rounds[0].deferred >= 512  # the ballooned 2 MiB
    after = run_domain(target.got.hv, target.got.dom, LIMIT_NS)
    assert after.reason == "poweroff" and "balloon" in after.console.decode()
    text = result.console.decode() + after.console.decode()
    assert outcome(text) == outcome(ref.console.decode()) != []


def test_the_names_and_states_follow_xls_order(wire):
    """The target's copy is built paused as NAME--incoming; the source's is
    NAME--migratedaway and suspended when GO goes; at the end the target's
    is NAME and running, the source's destroyed."""
    seen = wire["seen"]
    assert seen["target"] == [("mig--incoming", True)]
    assert seen["source"] == ("mig--migratedaway", SHUTDOWN_suspend)
    assert seen["after"] == ("mig", False, {})
    assert wire["said"] == ["migration sender: Target has acknowledged transfer.",
                            "migration sender: Giving target permission to start.",
                            "migration sender: Target reports successful startup.",
                            "Migration successful."]
    assert wire["heard"] == [
        "migration target: Ready to receive domain.",
        "Loading new save file <incoming migration stream> (domain mig)",
        "migration target: Transfer complete, requesting permission to start domain.",
        "migration target: Got permission, starting domain.",
        "migration target: Domain started successfully."]


# --- the receiver alone, fed the recorded stream -------------------------------------------

def replay(wire, octets: bytes, **kwargs):
    """migrate_receive fed ``octets`` (then the end of the wire), on a machine
    of its own; returns (what it wrote back, the domain or None, the error,
    the machine)."""
    back = io.BytesIO()
    back.close = lambda: None  # keep what was written readable
    with booting() as boot:
        hv = boot.bare(64, seed=5)
        free = physinfo(hv).free_pages
        try:
            got, error = migrate_receive(Channel(io.BytesIO(octets), back), hv, **kwargs), ""
        except MigrateError as e:
            got, error = None, str(e)
        left = empty(hv, free)
        state = (got.dom.name, got.dom.paused) if got is not None else None
    return back.getvalue(), state, error, left


def stream_of(wire) -> bytes:
    return wire["to_target"][:-len(MIGRATE_PERMISSION_TO_GO)]


def test_with_p_the_target_leaves_the_domain_paused(wire):
    back, state, error, _ = replay(wire, wire["to_target"], paused=True)
    assert not error and state == ("mig", True)
    assert back == MIGRATE_RECEIVER_BANNER + MIGRATE_RECEIVER_READY + MIGRATE_REPORT + b"\0"


def test_a_sender_gone_before_go_leaves_nothing_at_the_target(wire):
    """No GO: the report says failure (libxl's ERROR_FAIL, 3 on the wire),
    the copy is destroyed and the domain handed back."""
    back, state, error, left = replay(wire, stream_of(wire))
    assert state is None and left
    assert back == (MIGRATE_RECEIVER_BANNER + MIGRATE_RECEIVER_READY + MIGRATE_REPORT + b"\3"
                    + MIGRATE_PERMISSION_TO_GO)
    assert error == "migration target: the domain did not start here; it is handed back"


def test_a_stream_cut_short_leaves_nothing_at_the_target(wire):
    stream = stream_of(wire)
    back, state, error, left = replay(wire, stream[:len(stream) // 2])
    assert state is None and left and back == MIGRATE_RECEIVER_BANNER
    assert error.startswith("migration target: Domain creation failed (code -3): ")
    assert "\n" not in error


# --- the failure matrix: the source's side ------------------------------------------------

class Killer:
    """A real receiver (``pvlab migrate-receive`` on its stdin and stdout)
    behind the sender's channel, killed (SIGKILL) when the wire reaches
    ``phase``: "before banner", "mid stream" (MID_STREAM octets into the
    first round), "after ready" (the ready message read, GO not yet
    written), "after go" (GO written: swallowed, as by a socket whose peer
    just died)."""

    def __init__(self, tmp: Path, phase: str, *args: str) -> None:
        self.tmp, self.phase = tmp, phase
        self.err = open(tmp / "receiver.err", "wb")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen([*RECEIVER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err,
                                     env=checkout_env(TMPDIR=str(tmp)))
        self.sent = 0
        self.heard = b""
        if phase == "before banner":
            self.kill()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        self.heard += data
        if self.phase == "after ready" and self.heard.endswith(MIGRATE_RECEIVER_READY):
            self.kill()
        return data

    def write(self, data: bytes) -> int:
        if self.phase == "mid stream" and self.sent >= MID_STREAM:
            self.kill()
        if self.phase == "after go" and data == MIGRATE_PERMISSION_TO_GO:
            self.kill()
            return len(data)
        self.sent += len(data)
        return self.proc.stdin.write(data)

    def flush(self) -> None:
        self.proc.stdin.flush()

    def channel(self) -> Channel:
        return Channel(self, self, "the test's receiver", lambda _wait: self.close())

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc.wait()
        self.err.close()

    def said(self) -> str:
        return (self.tmp / "receiver.err").read_text()


def migrate_and_run_on(boot, cfg, connect):
    """Migrate the guest at AT_NS over ``connect()``'s channel; run it on
    here if it runs on. Returns (dom, the run's console, outcome, xl's lines)."""
    hv, dom = boot(cfg)
    lines: list[str] = []
    result, out = migrate_at(hv, dom, AT_NS, connect, until_ns=LIMIT_NS, say=lines.append)
    return hv, dom, result, out, lines


def ran_on(result, reference, suspended: bool) -> bool:
    """The source's run ended as the uninterrupted one, THAW if it had suspended."""
    text = result.console.decode()
    thawed = "suspend hypercall returned 1" in text
    return (result.reason == "poweroff" and outcome(text) == reference
            and thawed == suspended and ("suspend hypercall returned 0" not in text))


@pytest.mark.parametrize("phase, suspended, says", [
    ("before banner", False, "file/stream truncated reading banner from migration "
                             "receiver stream"),
    ("mid stream", False, "migration sender: libxl_domain_suspend failed: Broken pipe"),
    ("after ready", True, "migration sender: the target is gone (Broken pipe); it never had "
                          "permission to start"),
])
def test_a_receiver_killed_before_go_leaves_the_guest_running_here(
        booted, cfg, reference, tmp_path, phase, suspended, says):
    killer = Killer(tmp_path, phase)
    hv, dom, result, out, lines = migrate_and_run_on(booted, cfg, killer.channel)
    assert not out.ok and out.runs_on and not out.undefined
    assert says in lines
    assert out.error == ("Migration failed, resuming at sender." if suspended else
                         "Migration failed; the domain never suspended and runs on.")
    assert dom.name == "mig" and ran_on(result, reference, suspended)
    assert killer.proc.returncode == -9
    assert not hv.machine.paging.enabled(dom.domid)  # log-dirty off again
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["receiver.err"]


def test_a_receiver_killed_after_go_leaves_the_source_copy_suspended_and_renamed(
        booted, cfg, tmp_path):
    killer = Killer(tmp_path, "after go")
    hv, dom, result, out, lines = migrate_and_run_on(booted, cfg, killer.channel)
    assert out.undefined and not out.runs_on and out.error == FAILED_BADLY
    assert lines[-3:] == ["file/stream truncated reading success/failure report message "
                          "from migration receiver stream", FAILED_BADLY,
                          "migration sender: the copy here stays suspended as "
                          "mig--migratedaway"]
    assert FAILED_BADLY.startswith("** Migration failed during final handshake ** ")
    assert "\n" not in FAILED_BADLY
    assert dom.domid in hv.domains and dom.name == "mig--migratedaway"
    assert dom.shutdown_reason == SHUTDOWN_suspend


def receiver_rune(tmp: Path, *args: str) -> str:
    """The command a rune runs for a receiver of this checkout, its
    temporary files in ``tmp``."""
    return (f"exec env TMPDIR={tmp} PYTHONPATH={ROOT} {sys.executable} -m hypervisor "
            f"migrate-receive {' '.join(args)}")


def refused(booted, cfg, tmp_path, *args: str):
    """Migrate to a receiver process (over a rune) that refuses the domain;
    returns (the source's result, the outcome, xl's lines, what the receiver
    said, its exit status)."""
    from hypervisor.toolstack.transport import create_migration_child
    err = tmp_path / "receiver.err"
    with open(err, "wb") as f:
        hv, dom, result, out, lines = migrate_and_run_on(
            booted, cfg, lambda: create_migration_child(receiver_rune(tmp_path, *args), f))
    return result, out, lines, err.read_text(), sorted(p.name for p in tmp_path.iterdir())


def refusal(out) -> bool:
    """The outcome of a target that refused the domain: the guest runs on
    here; returns whether it had suspended (the target refused once the
    whole stream was in) or not (it refused as the pages came, and the
    next write failed)."""
    assert out.runs_on and not out.undefined
    assert out.error in ("Migration failed, resuming at sender.",
                         "Migration failed; the domain never suspended and runs on.")
    return out.error == "Migration failed, resuming at sender."


def test_a_target_too_small_refuses_the_domain_and_the_source_runs_on(
        booted, cfg, reference, tmp_path):
    result, out, lines, said, left = refused(booted, cfg, tmp_path, "--memory", "8")
    assert ran_on(result, reference, suspended=refusal(out))
    assert "migration target: Domain creation failed (code -3): " in said
    assert "frames wanted" in said and "Traceback" not in said
    assert left == ["receiver.err"]  # nothing half-written at the target


def test_a_target_without_the_guests_kernel_refuses_it_and_the_source_runs_on(
        booted, reference, tmp_path, monkeypatch):
    """The source runs a kernel module only it has (guestos under another
    name, on its own sys.path): the target cannot bind it."""
    here = tmp_path / "only-here"
    here.mkdir()
    (here / "migkernel_here.py").write_text(
        "from guestos import check_cmdline, native_entries, oops  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(here))
    cfg = make_config(GUEST, vcpus=2, name="mig")
    cfg.kernel = "migkernel_here"
    rx = tmp_path / "rx"
    rx.mkdir()
    result, out, lines, said, left = refused(booted, cfg, rx)
    assert ran_on(result, reference, suspended=refusal(out))
    assert "kernel module 'migkernel_here' cannot be imported" in said
    assert said.count("\n") == len(said.splitlines()) and "Traceback" not in said
    assert left == ["receiver.err"]


def test_a_config_the_target_cannot_parse_is_refused_before_the_guest_suspends(
        booted, cfg, reference, monkeypatch):
    monkeypatch.setattr(save, "live_config", lambda *_a: b"{not json")
    tx, rx = pipes()
    target = Target(rx, booted.bare(64))
    free = physinfo(target.hv).free_pages
    target.start()
    hv, dom, result, out, lines = migrate_and_run_on(booted, cfg, lambda: tx)
    target.join()
    assert target.error.startswith("migration target: Domain creation failed (code -3): "
                                   "the config in the stream's xl header cannot be used")
    assert empty(target.hv, free)
    assert out.error == "Migration failed; the domain never suspended and runs on."
    assert ran_on(result, reference, suspended=False)


def test_a_target_that_cannot_start_its_copy_hands_the_domain_back(booted, cfg, reference):
    """xl's 9b: after GO the target's rename fails (a domain of that name
    runs there); it reports failure, destroys its copy and gives the domain
    back; the source renames its copy back and resumes it."""
    tx, rx = pipes()
    hv_rx = booted.bare(64)
    other = build_domain(hv_rx, make_config(name="mig"))
    target = Target(rx, hv_rx)
    target.start()
    hv, dom, result, out, lines = migrate_and_run_on(booted, cfg, lambda: tx)
    target.join()
    assert target.error == "migration target: the domain did not start here; it is handed back"
    assert list(hv_rx.domains.values()) == [other]
    assert "migration sender: Target reports startup failure (status code 3)." in lines
    assert out.error == "Migration failed due to problems at target." and dom.name == "mig"
    assert ran_on(result, reference, suspended=True)


# --- the command line and TCP ---------------------------------------------------------------

def listening(tmp: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """``pvlab migrate-receive --listen 127.0.0.1:0`` and the port it says."""
    rx = subprocess.Popen([*RECEIVER, "--listen", "127.0.0.1:0", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=checkout_env(TMPDIR=str(tmp)))
    first = rx.stderr.readline()
    assert first.startswith("migration target: listening on 127.0.0.1:"), first
    return rx, int(first.rsplit(":", 1)[1])


def test_pvlab_run_migrates_over_tcp_with_json_progress(reference, tmp_path, capfd):
    rx, port = listening(tmp_path)
    code = main(["run", str(toml(tmp_path / "mig.toml")), "--request",
                 f"3ms migrate 127.0.0.1:{port}", "--json"])
    out, err = rx.communicate(timeout=300)
    sent = capfd.readouterr()
    assert code == 0 and rx.returncode == 0, err
    # the console up to the suspend here, the rest there (on its stdout: TCP)
    assert outcome(sent.out + out) == reference and "returned 0" in out
    lines = [json.loads(x) for x in sent.err.splitlines()]
    progress = [x for x in lines if "status" in x]
    assert progress[-1]["status"] == "completed" and "downtime" in progress[-1]
    assert {"total", "transferred", "remaining", "dirty-pages-rate",
            "dirty-sync-count"} <= set(progress[0]["ram"])
    assert [x["message"] for x in lines if "message" in x][-1] == "Migration successful."
    assert err.splitlines()[-1] == "migration target: Domain started successfully."
    assert os.listdir(tmp_path) == ["mig.toml"]


class Dropping:
    """A TCP connection that drops (both ways) MID_STREAM octets into the stream."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sent = 0

    def channel(self) -> Channel:
        return Channel(self.sock.makefile("rb"), self, None, lambda _wait: self.sock.close())

    def write(self, data: bytes) -> int:
        if self.sent >= MID_STREAM:
            self.sock.shutdown(socket.SHUT_RDWR)  # the connection is gone
        self.sent += len(data)
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_dropped_connection_leaves_the_guest_running_and_nothing_at_the_target(
        booted, cfg, reference, tmp_path):
    rx, port = listening(tmp_path)
    drop = Dropping(port)
    hv, dom, result, out, lines = migrate_and_run_on(booted, cfg, drop.channel)
    _, err = rx.communicate(timeout=300)
    assert out.error == "Migration failed; the domain never suspended and runs on."
    assert ran_on(result, reference, suspended=False)
    assert rx.returncode == 1 and "Traceback" not in err
    assert "migration target: Domain creation failed (code -3): " in err
    assert "truncated" in err
    assert os.listdir(tmp_path) == []


def test_a_bad_banner_is_one_line_and_the_guest_never_suspends(reference, tmp_path, capfd):
    """The rune (-s '': HOST is the whole command) prints something else."""
    code = main(["run", str(toml(tmp_path / "mig.toml")), "--request",
                 "3ms migrate -s '' 'ssh:yes pvlab | head -c 100'"])
    sent = capfd.readouterr()
    assert code == 1
    assert sent.err.splitlines() == [
        "migration receiver stream contained unexpected data instead of banner (command run "
        "was: yes pvlab | head -c 100 )",
        "Migration failed; the domain never suspended and runs on.",
        "pvlab: migration to `yes pvlab | head -c 100` failed; domain mig ran on here"]
    assert outcome(sent.out) == reference and "suspend hypercall" not in sent.out


@pytest.mark.parametrize("argv, says", [
    (["run", "CFG", "--request", "3ms migrate nowhere"],
     "'nowhere' is not HOST:PORT (e.g. 127.0.0.1:7001)"),
    (["run", "CFG", "--request", "3ms migrate -p 127.0.0.1:7001"],
     "-s and -p go with ssh:HOST"),
    (["run", "CFG", "--request", "3ms migrate"], "migrate takes the target"),
    (["run", "CFG", "--request", "3ms migrate ssh:h", "--request", "4ms suspend"],
     "comes after the migrate at 3.000 ms"),
    (["run", "CFG", "--request", "3ms migrate ssh:h", "--console"],
     "--console and a migrate request"),
    (["migrate-receive", "--listen", "127.0.0.1:99999"], "is not HOST:PORT"),
    (["migrate-receive", "--listen", "192.0.2.1:7001"], "cannot listen on 192.0.2.1:7001: "),
])
def test_bad_migration_input_is_one_line(tmp_path, capsys, argv, says):
    argv = [str(toml(tmp_path / "mig.toml")) if a == "CFG" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    # one line (argparse's usage before it for an argument it refuses)
    assert code == 2 and says in err.splitlines()[-1] and "Traceback" not in err


def test_the_ssh_rune_is_xls():
    assert ssh_rune("b") == "exec ssh b pvlab migrate-receive"
    assert ssh_rune("b", "ssh -p 2222", paused=True) == \
        "exec ssh -p 2222 b pvlab migrate-receive -p"
    assert ssh_rune("nc b 7001", "") == "nc b 7001"
    dest = parse_destination("-s 'ssh -i key' -p ssh:host")
    assert dest.rune == "exec ssh -i key host pvlab migrate-receive -p"
    assert parse_destination("10.0.0.2:7001").port == 7001


# --- anywhere, any frames -------------------------------------------------------------------

def _points(n: int) -> list[tuple[int, int]]:
    """(seed, virtual time of the migration in us), drawn once from a fixed
    generator, so that the test ids stay put."""
    rng = random.Random(18)
    return [(rng.randrange(1, 10_000), rng.randrange(500, 15_000)) for _ in range(n)]


POINTS = _points(4)  # each point is two processes' run: four keep the suite's time


@pytest.mark.slow
@pytest.mark.parametrize("seed, at_us", POINTS)
def test_a_migration_at_any_point_to_another_process_ends_as_an_uninterrupted_run(
        booted, reference, tmp_path, seed, at_us):
    """The source on the seed's frames and schedule, the target a
    ``pvlab migrate-receive`` process on its own frames (the seed plus one);
    the results are those of the uninterrupted run on seed 1's."""
    cfg = make_config(GUEST, vcpus=2, name="mig", seed=seed)
    with open(tmp_path / "receiver.err", "wb") as err:
        rx = subprocess.Popen(RECEIVER, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=err, env=checkout_env(TMPDIR=str(tmp_path)))
        hv, dom = booted(cfg)
        result, out = migrate_at(hv, dom, at_us * 1000, lambda: Channel(rx.stdout, rx.stdin))
        assert out.ok, out.lines
        assert rx.wait(timeout=600) == 0
    there = (tmp_path / "receiver.err").read_text()
    assert outcome(result.console.decode() + there) == reference
