"""Post-copy in the host daemon: a daemon's domain migrated with
``--postcopy`` (Otto's flag), or switched by QMP's migrate-start-postcopy
in the middle of its pre-copy rounds; a post-copy stream handed to a
daemon (``pvlab migrate-receive`` with getfd) runs its domain there while
its pages come; a receiver that cannot take post-copy refuses it before the
guest could run there, and the source resumes its copy.

Two daemons, A and B, serve the module (tests/test_daemon_migrate.py's
fixtures). Each time the guest's results, on the consoles together, are an
uninterrupted run's."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions
from hypervisor.toolstack.qmp import Client, QmpError
from hypervisor.toolstack.session import migrate_at
from hypervisor.toolstack.transport import connect_tcp
from tests import test_daemon_migrate as daemon_migrate
from tests.conftest import booting, checkout_env
from tests.test_daemon import WAIT_S, Console, write_config
from tests.test_daemon_migrate import LIVE, finish, guest, listen_on_b, pvlab

# the two daemons and the uninterrupted run's results, for this module
hosts, reference = daemon_migrate.hosts, daemon_migrate.reference

POLL_S = 0.01
POSTCOPY_FIELDS = {"postcopy-requests", "postcopy-bytes", "precopy-bytes", "downtime-bytes"}


def until(check: Any) -> Any:
    """``check()`` once it is true (a daemon in another process gets there
    in its own time); fails after WAIT_S of polls."""
    for _ in range(int(WAIT_S / POLL_S)):
        if got := check():
            return got
        time.sleep(POLL_S)
    raise AssertionError("never came")


def statuses(client: Client, name: str) -> list[str]:
    return [e["data"]["status"] for e in client.events
            if e["event"] == "MIGRATION" and e["data"]["name"].startswith(name)]


def test_scripted_postcopy_into_the_daemon_lists_it_while_pages_come(hosts, reference):
    """A scripted sender's post-copy into daemon B (-p: the domain waits
    paused there). Once the source has switched, and before it sends a
    page, B lists the domain as NAME--incoming and its query-migrate says
    postcopy-active with every page to come; unpaused, its guest faults on
    a page not yet there (B's loop waits for it), and the source serves the
    fault. At the end the domain is NAME and B's query-migrate completed,
    with the fault counted at both ends."""
    _, b, d = hosts
    rx, port = listen_on_b(b, "-p")
    seen: dict[str, Any] = {}
    wires: list[Any] = []

    def connect() -> Any:
        wires.append(connect_tcp("127.0.0.1", port))
        return wires[-1]

    def report(info: MigrationInfo) -> None:
        if info.status != "postcopy-active" or seen:
            return
        seen["query"] = until(lambda: (q := b("query-migrate", domain="sc"))
                              .get("status") == "postcopy-active" and q)
        seen["list"] = [r for r in b("domain-list") if r["name"] == "sc--incoming"]
        b("domain-unpause", domain="sc--incoming")
        # B's guest asks for a page: the source has sent none yet
        assert select.select([wires[0].reader.fileno()], [], [], WAIT_S)[0]
    with booting() as boot:
        hv, dom = boot(load_config(write_config(d, "sc", cmdline=LIVE)))
        before: list[bytes] = []
        _, out = migrate_at(hv, dom, 3_000_000, connect, PrecopyOptions(postcopy=True),
                            sink=lambda _d, data: before.append(data), report=report)
    assert out.ok, out.lines
    assert rx.wait(WAIT_S) == 0
    assert "p" in seen["list"][0]["state"]
    q = seen["query"]
    assert q["ram"]["remaining"] > 0 and q["ram"]["postcopy-requests"] == 0
    assert out.info is not None and out.info.postcopy_requests > 0
    done = until(lambda: (q := b("query-migrate", domain="sc"))["status"] == "completed"
                 and q)
    assert done["ram"]["remaining"] == 0 and done["ram"]["postcopy-bytes"] > 0
    assert done["ram"]["postcopy-requests"] == out.info.postcopy_requests
    assert [r["name"] for r in b("domain-list")].count("sc") == 1
    con = Console(b("domain-console", domain="sc")["path"])
    assert finish(con, b"".join(before).decode()) == reference


def test_migrate_start_postcopy_switches_mid_precopy(hosts, reference):
    """With postcopy-ram on, QMP's migrate and then migrate-start-postcopy:
    the switch comes at the next round, the guest runs in B while its pages
    come (its faults served), A says postcopy-active then completed, and
    the command is harmless after the end."""
    a, b, d = hosts
    rx, port = listen_on_b(b)
    con = guest(a, d, "ms")
    a("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram",
                                                 "state": True}])
    assert {"capability": "postcopy-ram", "state": True} in a("query-migrate-capabilities")
    a.client.events.clear()
    answer: list[Any] = []

    def migrate() -> None:
        with Client(a.sock, timeout=WAIT_S) as c:
            answer.append(c.execute("migrate", {"domain": "ms",
                                                "uri": f"tcp:127.0.0.1:{port}"}))
    t = threading.Thread(target=migrate)
    t.start()
    a.event("MIGRATION", name="ms", status="setup")
    assert a("migrate-start-postcopy", domain="ms") == {}
    t.join(WAIT_S)
    assert answer == [{}]
    assert rx.wait(WAIT_S) == 0
    a("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram",
                                                 "state": False}])
    src = a("query-migrate", domain="ms")
    assert src["status"] == "completed" and POSTCOPY_FIELDS <= set(src["ram"])
    assert statuses(a.client, "ms")[-2:] == ["postcopy-active", "completed"]
    assert a("migrate-start-postcopy", domain="ms") == {}  # after the end: harmless
    dst = until(lambda: (q := b("query-migrate", domain="ms"))["status"] == "completed"
                and q)
    # every fault B sent came before its COMPLETE: A counted each
    assert dst["ram"]["postcopy-requests"] == src["ram"]["postcopy-requests"]
    assert "postcopy-blocktime" in dst
    b.client.events.clear()
    assert finish(Console(b("domain-console", domain="ms")["path"]), con.to_end()) == \
        reference


def test_xl_migrate_pure_postcopy(capsys, hosts, reference):
    """``pvlab migrate DOM --postcopy --precopy-iterations 0``: no pre-copy
    round, the guest suspends at once; the final JSON line has the
    post-copy's fields."""
    a, b, d = hosts
    rx, port = listen_on_b(b)
    con = guest(a, d, "pure")
    code, out, err = pvlab(capsys, "migrate", "pure", "--tcp", f"127.0.0.1:{port}",
                           "--postcopy", "--precopy-iterations", "0", "--json", "--socket",
                           str(a.sock))
    assert code == 0, err
    assert rx.wait(WAIT_S) == 0
    assert "Migration successful." in err.splitlines()
    final = json.loads(out.splitlines()[-1])
    ram = final["ram"]
    # before the suspend only the headers; most of the 16 MiB after the switch
    assert final["status"] == "completed" and 0 < ram["precopy-bytes"] < 1 << 20
    assert ram["postcopy-bytes"] > 8 << 20 and final["iteration"] == 0
    assert [r["name"] for r in a("domain-list")] == []
    dst = until(lambda: (q := b("query-migrate", domain="pure"))["status"] == "completed"
                and q)
    assert dst["ram"]["postcopy-requests"] == ram["postcopy-requests"]
    assert finish(Console(b("domain-console", domain="pure")["path"]), con.to_end()) == \
        reference


def test_a_receiver_without_postcopy_refuses_before_the_switch(capsys, hosts, reference):
    """``pvlab migrate-receive --no-postcopy``: POSTCOPY_BEGIN is answered
    with a refusal, before the domain could run there; the source resumes
    its copy (not --postcopy-inconsistent), one line says why, exit 1."""
    a, b, d = hosts
    rx, port = listen_on_b(b, "--no-postcopy")
    con = guest(a, d, "nopc")
    code, _, err = pvlab(capsys, "migrate", "nopc", "--tcp", f"127.0.0.1:{port}",
                         "--postcopy", "--socket", str(a.sock))
    assert rx.wait(WAIT_S) == 1
    assert code == 1
    last = err.splitlines()[-1]
    assert "the target refused post-copy: the target does not take post-copy" in last, err
    assert "(its suspend hypercall returned 1)" in last
    assert [r["name"] for r in a("domain-list")] == ["nopc"]
    assert not [r for r in b("domain-list") if r["name"].startswith("nopc")]
    assert a("query-migrate", domain="nopc")["status"] == "failed"
    assert finish(con) == reference


def test_start_postcopy_needs_the_capability(hosts):
    """The capability off: migrate-start-postcopy is refused in one line, as
    QEMU refuses it; so are bad capabilities and a migration that never
    started."""
    a, _, d = hosts
    a("domain-create", config=str(write_config(d, "cap")))
    with pytest.raises(QmpError, match="^Postcopy must be started after migration"):
        a("migrate-start-postcopy", domain="cap")
    banner = "xl migration receiver ready, send binary domain data."
    answer: list[Any] = []

    def migrate() -> None:
        with Client(a.sock, timeout=WAIT_S) as c:
            try:
                c.execute("migrate", {"domain": "cap", "uri":
                                      f"exec:printf '{banner}\\n'; exec cat >/dev/null"})
            except QmpError as e:
                answer.append(e)
    t = threading.Thread(target=migrate)
    t.start()
    a.event("MIGRATION", name="cap", status="setup")
    with pytest.raises(QmpError) as e:
        a("migrate-start-postcopy", domain="cap")
    assert str(e.value.desc).startswith("Enable postcopy with migrate-set-capabilities")
    assert "\n" not in e.value.desc
    with pytest.raises(QmpError, match="in progress"):
        a("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram",
                                                     "state": True}])
    a("migrate_cancel", domain="cap")
    t.join(WAIT_S)
    assert answer
    for caps, what in (([{"capability": "xbzrle", "state": True}], "pvlab has"),
                       ([{"capability": "postcopy-ram"}], "each capability")):
        with pytest.raises(QmpError, match=what):
            a("migrate-set-capabilities", capabilities=caps)
    a("domain-destroy", domain="cap")


def test_a_dropped_postcopy_between_daemons_is_recovered(capsys, hosts, reference):
    """A's pure post-copy to B through a relay that cuts it mid-push: both
    pause (postcopy-paused, A's copy kept as NAME--postcopy-inconsistent);
    ``pvlab migrate-recover`` waits for the resume on B's side, ``pvlab
    migrate --resume`` on A's makes it; the migration ends as an
    uninterrupted one (A's copy gone, B's domain named NAME, the results)."""
    from tests.test_postcopy_recover import TO_TARGET, Relay
    a, b, d = hosts
    rx, port = listen_on_b(b)
    relay = Relay(port, [(TO_TARGET, 4 << 20)])
    try:
        con = guest(a, d, "rec")
        code, _, err = pvlab(capsys, "migrate", "rec", "--tcp", f"127.0.0.1:{relay.port}",
                             "--postcopy", "--precopy-iterations", "0", "--socket",
                             str(a.sock))
        assert code == 1 and "the post-copy is paused" in err.splitlines()[-1], err
        assert rx.wait(WAIT_S) == 0
        [src] = a("domain-list")
        assert src["name"] == "rec--postcopy-inconsistent"
        assert a("query-migrate", domain=src["name"])["status"] == "postcopy-paused"
        until(lambda: b("query-migrate", domain="rec--incoming")["status"] == "postcopy-paused")
        rec = subprocess.Popen([sys.executable, "-m", "hypervisor", "migrate-recover",
                                "rec--incoming", "127.0.0.1:0", "--socket", str(b.sock)],
                               env=checkout_env(), stderr=subprocess.PIPE, text=True)
        assert rec.stderr is not None
        waiting = rec.stderr.readline()
        assert "waiting on 127.0.0.1:" in waiting, waiting
        there = int(waiting.split("127.0.0.1:")[1].split()[0])
        code, _, err = pvlab(capsys, "migrate", "--resume", str(src["domid"]),
                             f"127.0.0.1:{there}", "--socket", str(a.sock))
        said = rec.communicate(timeout=WAIT_S)[1]
        assert code == 0 and "Migration successful." in err.splitlines(), err + said
        assert any(line.startswith("migration sender: Post-copy resumed") for line in
                   err.splitlines())
        assert rec.returncode == 0 and "post-copy resumed" in said, said
    finally:
        relay.close()
    assert a("domain-list") == []
    until(lambda: b("query-migrate", domain="rec")["status"] == "completed")
    assert finish(Console(b("domain-console", domain="rec")["path"]), con.to_end()) == \
        reference


def test_a_paused_incoming_postcopy_refuses_a_second_one():
    """The machine has one pager: while a dropped post-copy waits paused for
    its resume, another is refused before its switch."""
    from types import SimpleNamespace

    from hypervisor.toolstack.daemon import Daemon
    d = SimpleNamespace(incoming=None, paused_incoming=(object(), object()), jobs=[])
    assert "one post-copy migration at a time" in Daemon._refuse_postcopy(d, {})
    d.paused_incoming = None
    assert Daemon._refuse_postcopy(d, {}) == ""
