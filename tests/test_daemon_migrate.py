"""Live jobs in the host daemon (livejob.py): a live save and migrations,
run while the daemon goes on serving.

Two daemons, A and B, each in a child process on its own socket, serve the
whole module. A guest that keeps writing (dirtier, with a hash chain and a
counter) is saved live by ``pvlab xl save --live`` and restored; migrated
from A to B over TCP (``pvlab migrate --tcp`` to ``pvlab migrate-receive
--listen`` on B's side, which hands the connection to daemon B with getfd)
and over xl's rune (``pvlab xl migrate -s ''``: the command's stdin and
stdout are the wire, handed to B as two descriptors). Each time the guest's
results, on the two consoles together, are an uninterrupted run's. A
migration that fails (the receiver refuses the domain after the stream, the
receiver dies mid-stream, nobody listens) leaves the domain running in A,
with one line said and exit status 1."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.migrate import MIGRATE_RECEIVER_BANNER
from hypervisor.toolstack.qmp import Client
from hypervisor.toolstack.session import run_domain
from tests.conftest import booting, checkout_env
from tests.test_daemon import WAIT_S, Console, Daemon, workdir, write_config  # noqa: F401 (a fixture)
from tests.test_migrate_ssh import sshd  # noqa: F401 (a fixture: a real sshd on loopback)

WRITER = "run=dirtier:100:20000:3000,hashchain:50:32,counter:5:300000"
# the same with a shell that waits for a line: the guest cannot end before a
# test types ``exit`` (on whichever host it then is), however slow the host
LIVE = WRITER + ",sh"
RESULTS = ("hashchain digest ", "counter ", "dirtier ")


def results(*texts: str) -> list[str]:
    """The programs' result lines, wherever they start (the shell's prompt
    may come first on a line)."""
    return sorted(m.strip() for text in texts
                  for m in re.findall(rf"(?:{'|'.join(RESULTS)})[^\r\n$]*", text))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Iterator[tuple[Daemon, Daemon, Path]]:
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="pvm", dir="/tmp"))  # a short path: sockets
    (d / "a").mkdir()
    (d / "b").mkdir()
    a, b = Daemon(d / "a"), Daemon(d / "b")
    try:
        yield a, b, d
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(hosts) -> list[str]:
    """The guest's results in an uninterrupted scripted run."""
    with booting() as boot:
        cfg = load_config(write_config(hosts[2], "ref", cmdline=WRITER))
        r = run_domain(*boot(cfg))
    assert r.reason == "poweroff"
    return results(r.console.decode())


def guest(daemon: Daemon, d: Path, name: str) -> Console:
    """The writing guest in ``daemon``, its console attached, once it has begun."""
    daemon("domain-create", config=str(write_config(d, name, cmdline=LIVE)))
    con = Console(daemon("domain-console", domain=name)["path"])
    con.until("counter 1")
    return con


def pvlab(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def finish(con: Console, before: str = "") -> list[str]:
    """The shell told to exit; the results on the console (and ``before``)."""
    con.type("exit\n")
    return results(before, con.to_end())


def events_of(client: Client, domid: int) -> list[tuple[str, dict[str, Any]]]:
    """The events about ``domid`` that wait in the client."""
    return [(e["event"], e["data"]) for e in client.events if e["data"].get("domid") == domid]


def test_live_save_events_query_migrate_and_restore(capsys, hosts, reference):
    a, _, d = hosts
    con = guest(a, d, "sv")
    domid = a("domain-info", domain="sv")["domid"]
    a.client.events.clear()
    code, out, err = pvlab(capsys, "xl", "save", "--live", "--json", "sv", str(d / "sv.img"),
                           "--socket", str(a.sock))
    assert code == 0, err
    assert re.search(r"Saved domain \d+ \(sv\) to .* pages in \d+ rounds", err)
    lines = [__import__("json").loads(line) for line in out.splitlines()]
    # a JSON line per round, active, then the final query-migrate, completed
    assert [x["status"] for x in lines[:-1]] == ["active"] * (len(lines) - 1)
    final = lines[-1]
    assert final["status"] == "completed" and final["ram"]["remaining"] == 0
    assert final["ram"]["total"] == 16 << 20 and final["ram"]["transferred"] > 16 << 20
    assert final["ram"]["dirty-sync-count"] == len(lines) - 2  # a CLEAN after each live round
    assert {"downtime", "setup-time", "total-time", "iteration"} <= set(final)
    a("query-version")  # the events that came meanwhile
    seen = events_of(a.client, domid)
    names = [e for e, _ in seen]
    rounds = len(lines) - 1
    assert names[:2] == ["MIGRATION", "MIGRATION"]
    assert [data["status"] for e, data in seen if e == "MIGRATION"] == \
        ["setup", "active", "completed"]
    passes = [data["pass"] for e, data in seen if e == "MIGRATION_PASS"]
    assert passes == list(range(1, rounds + 1))
    # each pass is followed by its round's fields; the guest suspends before the last
    body = [e for e in names if e in ("MIGRATION_PASS", "MIGRATION_ROUND", "SUSPEND")]
    assert body == ["MIGRATION_PASS", "MIGRATION_ROUND"] * (rounds - 1) + \
        ["SUSPEND", "MIGRATION_PASS", "MIGRATION_ROUND"]
    assert names[-2:] == ["MIGRATION", "DOMAIN_DESTROYED"]
    assert a("query-migrate", domain="sv") == final
    before = con.to_end()
    a("domain-restore", file=str(d / "sv.img"), paused=True)
    con2 = Console(a("domain-console", domain="sv")["path"])
    a("domain-unpause", domain="sv")
    assert finish(con2, before) == reference


def listen_on_b(b: Daemon, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
    """``pvlab migrate-receive --listen`` on B's side, handing to daemon B
    (with ``flags``, e.g. -p)."""
    rx = subprocess.Popen([sys.executable, "-m", "hypervisor", "migrate-receive", *flags,
                           "--listen", "127.0.0.1:0", "--socket", str(b.sock)],
                          env=checkout_env(), stderr=subprocess.PIPE)
    assert rx.stderr is not None
    line = rx.stderr.readline().decode()
    port = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert port, line
    return rx, int(port.group(1))


def arrive(b: Daemon, name: str, before: str, reference: list[str]) -> None:
    """The migrated guest, paused in B: its console attached, then unpaused;
    the two consoles' results are the uninterrupted run's."""
    con = Console(b("domain-console", domain=name)["path"])
    b("domain-unpause", domain=name)
    assert finish(con, before) == reference


def test_migrate_daemon_to_daemon_over_tcp(capsys, hosts, reference):
    a, b, d = hosts
    rx, port = listen_on_b(b, "-p")
    con = guest(a, d, "tcp")
    code, out, err = pvlab(capsys, "migrate", "tcp", "--tcp", f"127.0.0.1:{port}", "--json",
                           "--socket", str(a.sock))
    assert code == 0, err
    assert rx.wait(WAIT_S) == 0
    assert "migration sender: Target reports successful startup." in err
    assert "Migration successful." in err.splitlines()
    assert [r["name"] for r in a("domain-list")] == []  # gone from the source
    assert '"status": "completed"' in out.splitlines()[-1]
    assert a("query-migrate", domain="tcp")["status"] == "completed"
    assert b("query-migrate", domain="tcp")["status"] == "completed"
    arrive(b, "tcp", con.to_end(), reference)


def test_migrate_daemon_to_daemon_over_xl_rune(capsys, hosts, reference):
    """xl's -s with an empty command: HOST is the whole command, its stdin
    and stdout the wire (what ssh gives); the receiver's lines come back
    through its stderr, as ssh relays them."""
    a, b, d = hosts
    con = guest(a, d, "rune")
    rune = f"{sys.executable} -m hypervisor migrate-receive -p --socket {b.sock}"
    code, _, err = pvlab(capsys, "xl", "migrate", "-s", "", "rune", rune, "--socket",
                         str(a.sock))
    assert code == 0, err
    assert "migration target: Ready to receive domain." in err.splitlines()
    assert [r["name"] for r in a("domain-list")] == []
    arrive(b, "rune", con.to_end(), reference)


def test_migrate_daemon_to_daemon_over_ssh(capsys, hosts, reference, sshd):  # noqa: F811
    """xl's way for real: ``ssh HOST pvlab migrate-receive -p`` through a real
    sshd (-s names a wrapper with the test's port and key); the receiver on
    the far side hands ssh's pipes to daemon B, where the domain lives."""
    a, b, d = hosts
    wrap, _ = sshd
    to_b = d / "ssh-to-b"
    to_b.write_text(f'#!/bin/sh\nhost=$1; shift\nexec {wrap} "$host" "$@" --socket {b.sock}\n')
    to_b.chmod(0o755)
    con = guest(a, d, "ssh")
    code, _, err = pvlab(capsys, "xl", "migrate", "-s", str(to_b), "-p", "ssh", "127.0.0.1",
                         "--socket", str(a.sock))
    assert code == 0, err
    assert "migration target: Ready to receive domain." in err.splitlines()
    assert "Migration successful." in err.splitlines()
    assert [r["name"] for r in a("domain-list")] == []
    arrive(b, "ssh", con.to_end(), reference)


def runs_on(a: Daemon, con: Console, name: str, reference: list[str]) -> None:
    """After a failed migration: the domain is A's, running, and ends with
    the uninterrupted run's results."""
    (row,) = [r for r in a("domain-list") if r["name"] == name]
    assert "p" not in row["state"] and "s" not in row["state"]
    assert a("query-migrate", domain=name)["status"] == "failed"
    assert finish(con) == reference


def test_failed_migration_receiver_refuses(capsys, hosts, reference):
    """B has a domain of the name already: after the stream and GO its copy
    cannot take the name, it destroys it and hands the domain back; A resumes
    it (the suspend returns 1)."""
    a, b, d = hosts
    b("domain-create", config=str(write_config(d, "clash")), paused=True)
    rx, port = listen_on_b(b, "-p")
    con = guest(a, d, "clash")
    code, _, err = pvlab(capsys, "xl", "migrate", "clash", "--tcp", f"127.0.0.1:{port}",
                         "--socket", str(a.sock))
    rx.wait(WAIT_S)
    assert code == 1
    assert err.splitlines()[-1].startswith("pvlab: migrating domain ")
    last = err.splitlines()[-1]
    assert "Target reports startup failure" in last and "problems at target" in last
    assert "(its suspend hypercall returned 1)" in last
    assert [r["name"] for r in b("domain-list")] == ["clash"]  # only its own
    runs_on(a, con, "clash", reference)
    b("domain-destroy", domain="clash")


@pytest.mark.parametrize("rune, why", [
    # the receiver says its banner, takes some of the stream and dies
    (f"printf '{MIGRATE_RECEIVER_BANNER.decode().strip()}\\n'; head -c 100000 >/dev/null",
     "libxl_domain_suspend failed"),
    ("yes nonsense | head -c 300", "unexpected data instead of banner"),
])
def test_failed_migration_receiver_gone(capsys, hosts, reference, rune, why):
    a, _, d = hosts
    con = guest(a, d, "gone")
    code, _, err = pvlab(capsys, "xl", "migrate", "-s", "", "gone", rune, "--socket",
                         str(a.sock))
    assert code == 1
    last = err.splitlines()[-1]
    assert why in last and "runs on" in last, err
    runs_on(a, con, "gone", reference)


def test_nobody_listens_and_bad_flags(capsys, hosts):
    a, _, d = hosts
    a("domain-create", config=str(write_config(d, "idle")), paused=True)
    a("domain-unpause", domain="idle")
    code, _, err = pvlab(capsys, "xl", "migrate", "idle", "--tcp", "127.0.0.1:1", "--socket",
                         str(a.sock))
    assert code == 1 and len(err.splitlines()) == 1 and "Connection refused" in err
    assert [r["name"] for r in a("domain-list")] == ["idle"]
    for argv, what in ((["-C", "x.cfg", "idle", "h"], "-C:"), (["--debug", "idle", "h"],
                                                               "--debug:"),
                       (["idle"], "give the HOST")):
        code, _, err = pvlab(capsys, "xl", "migrate", *argv, "--socket", str(a.sock))
        assert code == 2 and err.startswith(f"pvlab: {what}") and len(err.splitlines()) == 1
    a("domain-destroy", domain="idle")


def test_daemon_serves_while_the_receiver_is_waited_for(capsys, hosts, reference):
    """The receiver takes the whole stream and then says nothing: the guest
    waits suspended for the ready message while the daemon serves (another
    domain runs and prints, the domain is listed, commands that would change
    it are refused, query-migrate answers); the receiver killed, the
    migration fails and the guest runs on, resumed (its suspend returns 1)."""
    import os
    import signal
    import threading
    a, _, d = hosts
    con = guest(a, d, "wait")
    pidfile = d / "rx.pid"
    banner = MIGRATE_RECEIVER_BANNER.decode().strip()
    # cat takes the stream; its descriptor 3 keeps the wire back open, unsaid
    rune = f"echo $$ > {pidfile}; printf '{banner}\\n'; exec cat 3>&1 >/dev/null"
    answer: list[Any] = []

    def migrate() -> None:
        with Client(a.sock, timeout=WAIT_S) as c:
            try:
                answer.append(c.execute("migrate", {"domain": "wait", "uri": f"exec:{rune}"}))
            except Exception as e:  # the answer the test looks at
                answer.append(e)
    t = threading.Thread(target=migrate)
    t.start()
    while True:
        ev = a.client.next_event(WAIT_S)
        assert ev is not None, "the guest never suspended"
        if ev["event"] == "SUSPEND" and ev["data"]["name"] == "wait":
            break
    (row,) = [r for r in a("domain-list") if r["name"] == "wait"]
    assert row["state"][3] == "s"  # suspended for the final round, the stream sent
    for command in ("domain-destroy", "domain-pause", "domain-unpause"):
        with pytest.raises(Exception, match="is being migrated"):
            a(command, domain="wait")
    assert a("query-migrate", domain="wait")["status"] == "active"
    # paused until its console is attached: it ends so soon that a connection
    # still in the console's backlog when the domain goes would be reset
    a("domain-create", config=str(write_config(d, "other", cmdline="run=counter:2:1000")),
      paused=True)
    other = Console(a("domain-console", domain="other")["path"])
    a("domain-unpause", domain="other")
    assert "counter 2" in other.to_end()  # it ran to its end meanwhile
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    t.join(WAIT_S)
    (err,) = answer
    assert "ready message" in str(err) and "suspend hypercall returned 1" in str(err)
    runs_on(a, con, "wait", reference)


# a receiver that takes the stream, says it is ready, reads GO and dies
# without its report: the sender cannot know whether the target started
AFTER_GO = """\
import sys
from hypervisor.toolstack import migrate, restore
out = sys.stdout.buffer
out.write(migrate.MIGRATE_RECEIVER_BANNER)
out.flush()
restore.restore_stream(sys.stdin.buffer)  # the stream received whole, then no GO taken
out.write(migrate.MIGRATE_RECEIVER_READY)
out.flush()
sys.stdin.buffer.read(len(migrate.MIGRATE_PERMISSION_TO_GO))
"""


def test_failed_after_go_keeps_the_domain_suspended(capsys, hosts):
    """xl's failed_badly: past the point of no return the daemon neither
    resumes nor destroys its copy; it stays suspended as NAME--migratedaway
    (looked at turn after turn, it is not resumed) until a person acts."""
    a, _, d = hosts
    guest(a, d, "late")
    script = d / "after_go.py"
    script.write_text(AFTER_GO)
    code, _, err = pvlab(capsys, "xl", "migrate", "-s", "", "late",
                         f"{sys.executable} {script}", "--socket", str(a.sock))
    assert code == 1
    last = err.splitlines()[-1]
    assert "Migration failed during final handshake" in last and "check both hosts" in last
    for _ in range(3):  # the daemon's turns go on; the copy stays as it is
        # (an earlier test's domain may still be going: only this guest's rows)
        (row,) = [r for r in a("domain-list") if r["name"].startswith("late")]
        assert row["name"] == "late--migratedaway" and row["state"][3] == "s"
        a("domain-vcpu-list")
    assert a("query-migrate", domain="late")["status"] == "failed"
    a("domain-destroy", domain="late--migratedaway")


def test_quit_while_a_migration_waits(workdir):  # noqa: F811 (the fixture)
    """quit while a migration waits for a receiver that never answers: the
    job is cancelled (its wire cut), the guest resumed and its client told
    why; then the daemon ends."""
    import threading
    dmn = Daemon(workdir)
    banner = MIGRATE_RECEIVER_BANNER.decode().strip()
    rune = f"printf '{banner}\\n'; exec cat 3>&1 >/dev/null"
    try:
        dmn("domain-create", config=str(write_config(workdir, "q", cmdline=LIVE)))
        Console(dmn("domain-console", domain="q")["path"]).until("counter 1")
        answer: list[Any] = []

        def migrate() -> None:
            with Client(dmn.sock, timeout=WAIT_S) as c:
                try:
                    answer.append(c.execute("migrate", {"domain": "q", "uri": f"exec:{rune}"}))
                except Exception as e:  # the answer the test looks at
                    answer.append(e)
        t = threading.Thread(target=migrate)
        t.start()
        dmn.event("SUSPEND", name="q")
        dmn("quit")
        t.join(WAIT_S)
        assert dmn.proc.wait(WAIT_S) == 0
    finally:
        dmn.stop()
    (err,) = answer
    # cut in the final round's write or in the wait for the ready message
    assert "resuming at sender" in str(err) and "suspend hypercall returned 1" in str(err)


def test_scripted_run_migrates_into_the_daemon(hosts, reference):
    """``pvlab run --request '3ms migrate HOST:PORT'`` (the scripted sender,
    virtual time) to ``pvlab migrate-receive --listen`` handing to daemon B:
    the two ends of pvlab's migration meet whichever loop drives each."""
    _, b, d = hosts
    rx, port = listen_on_b(b, "-p")
    config = write_config(d, "scripted", cmdline=WRITER)
    run = subprocess.run([sys.executable, "-m", "hypervisor", "run", str(config), "--request",
                          f"3ms migrate 127.0.0.1:{port}"], capture_output=True, text=True,
                         env=checkout_env(), timeout=WAIT_S * 5)
    assert run.returncode == 0, run.stderr[-2000:]
    assert rx.wait(WAIT_S) == 0
    con = Console(b("domain-console", domain="scripted")["path"])
    b("domain-unpause", domain="scripted")
    assert results(run.stdout, con.to_end()) == reference


def test_migrate_cancel(hosts, reference):
    """QEMU's migrate_cancel while the receiver keeps the sender waiting:
    the wire cut, the migration's own answer says it failed, its status is
    cancelled, and the guest runs on (resumed: its suspend returns 1)."""
    import threading
    a, _, d = hosts
    con = guest(a, d, "cx")
    banner = MIGRATE_RECEIVER_BANNER.decode().strip()
    rune = f"printf '{banner}\\n'; exec cat 3>&1 >/dev/null"
    answer: list[Any] = []

    def migrate() -> None:
        with Client(a.sock, timeout=WAIT_S) as c:
            try:
                answer.append(c.execute("migrate", {"domain": "cx", "uri": f"exec:{rune}"}))
            except Exception as e:  # the answer the test looks at
                answer.append(e)
    t = threading.Thread(target=migrate)
    t.start()
    a.event("SUSPEND", name="cx")
    assert a("migrate_cancel", domain="cx") == {}
    t.join(WAIT_S)
    (err,) = answer
    assert "suspend hypercall returned 1" in str(err)
    a("query-version")  # the events sent before its answer are read
    assert [e["data"]["status"] for e in a.client.events if e["event"] == "MIGRATION"
            and e["data"]["name"] == "cx"][-2:] == ["cancelling", "cancelled"]
    with pytest.raises(Exception, match="is not being saved live or migrated"):
        a("migrate_cancel", domain="cx")
    (row,) = [r for r in a("domain-list") if r["name"] == "cx"]
    assert "s" not in row["state"]
    assert a("query-migrate", domain="cx")["status"] == "cancelled"
    assert finish(con) == reference


def test_migrate_resume_without_a_paused_postcopy_is_one_line(capsys, hosts):
    """``pvlab migrate --resume`` of a domain whose migration is not a
    paused post-copy: one line, exit 1, the domain untouched."""
    a, _, d = hosts
    a("domain-create", config=str(write_config(d, "nr", cmdline=LIVE)), paused=True)
    try:
        code, out, err = pvlab(capsys, "migrate", "--resume", "nr", "127.0.0.1:9",
                               "--socket", str(a.sock))
        bad, _, usage = pvlab(capsys, "migrate", "--resume", "nr", "--socket", str(a.sock))
        assert a("domain-info", domain="nr")["name"] == "nr"
    finally:
        a("domain-destroy", domain="nr")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "domain nr has no paused post-copy migration to resume" in err
    assert bad == 2 and "--resume: give the HOST:PORT" in usage
