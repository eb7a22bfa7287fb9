"""Recovery of a post-copy whose connection dropped (QEMU's postcopy-paused
and migrate-recover; postcopy.py's resume handshake): both sides pause, a
new connection goes through POSTCOPY_RESUME and POSTCOPY_RECV_BITMAP, the
pages lost in flight cross again, and the guest ends as an uninterrupted
run's.

Both ends run in this process over TCP, the source in a thread, through a
relay that cuts each connection after a chosen number of octets in a chosen
direction (octets counted, not time: the stream up to the transition is the
same in every run, and POSTCOPY_PAGE_DATA records have one size)."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
from typing import Any

import numpy as np
import pytest

from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.toolstack import postcopy, stream
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.migrate import (
    FAILED_POSTCOPY,
    MIGRATE_RECEIVER_BANNER,
    MigrateError,
    MigrateOutcome,
    incoming_header,
    migrate_receive,
    postcopy_recovery,
    receive_resume,
    resume_postcopy,
)
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions
from hypervisor.toolstack.savefile import LibxlRecType, read_libxl_header
from hypervisor.toolstack.session import migrate_at, run_domain
from hypervisor.toolstack.stream import PostcopyType, RecType
from hypervisor.toolstack.transport import accept_next, connect_tcp, listen_tcp
from tests.conftest import booting, make_config
from tests.test_migrate import GUEST, LIMIT_NS, listening, outcome, toml

AT_NS = 3_000_000
MID_NS = 12_000_000  # the destination's guest runs to here while its pages come
PURE = PrecopyOptions(postcopy=True, max_iterations=0)
# a full POSTCOPY_PAGE_DATA record: header, count, 64 entries, 64 pages
RECORD = stream.RHDR.size + stream.PAGE_DATA_HDR.size + 64 * (8 + 4096)
TO_TARGET, TO_SOURCE = "to target", "to source"
SOURCE_JOIN_S = 120  # far beyond a run's need, even on a loaded machine


def reset(s: socket.socket) -> None:
    """The connection ended as a failed network ends it, with a reset: a
    shutdown alone lets a peer that only writes go on writing into buffers
    nobody reads, until it blocks for ever."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        s.shutdown(socket.SHUT_RDWR)  # the other direction's pump wakes
    except OSError:
        pass  # shut down already
    s.close()  # the reset


class Relay:
    """A TCP relay to ``port``: each connection made to it is forwarded both
    ways, the n-th cut by ``cuts[n]`` (direction, octets; None: never) once
    that many octets went that way: both sides shut down, as a network
    that fails. ``data`` keeps what each connection carried each way."""

    def __init__(self, port: int, cuts: list[tuple[str, int] | None]) -> None:
        self.target, self.cuts = port, list(cuts)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.data: list[dict[str, bytearray]] = []
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._serve)]
        self.threads[0].start()

    def _serve(self) -> None:
        while True:
            try:
                near, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                far = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                near.close()  # nobody listens there any more: the source hears the end
                continue
            cut = self.cuts[len(self.data)] if len(self.data) < len(self.cuts) else None
            seen = {TO_TARGET: bytearray(), TO_SOURCE: bytearray()}
            self.data.append(seen)
            self.socks += [near, far]
            for way, a, b in ((TO_TARGET, near, far), (TO_SOURCE, far, near)):
                limit = cut[1] if cut is not None and cut[0] == way else None
                t = threading.Thread(target=self._pump, args=(a, b, seen[way], limit, near, far))
                self.threads.append(t)
                t.start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket, seen: bytearray, limit: int | None,
              *both: socket.socket) -> None:
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    b.shutdown(socket.SHUT_WR)
                    return
                if limit is not None and len(seen) + len(data) >= limit:
                    data = data[:limit - len(seen)]
                    seen += data
                    b.sendall(data)
                    near, far = both
                    far.shutdown(socket.SHUT_RDWR)  # the target reads what came, then the end
                    reset(near)  # the source's writes fail, whatever it still sends
                    return
                seen += data
                b.sendall(data)
        except OSError:
            for s in both:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # shut down already

    def cut(self) -> None:
        """Every connection made through it shut down, as a network that fails."""
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # shut down already

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.cut()
        for t in self.threads:
            t.join()
        for s in self.socks:
            s.close()


def recover_here(cuts: list[tuple[str, int] | None], resume: bool = True,
                 later: Any = None) -> dict:
    """One pure post-copy migration through a Relay with ``cuts``; the
    source resumes on new connections through it (``resume``), the
    destination waits for them on its listening socket. ``later(out,
    relay_port, hv, dom)`` runs in the source's thread once its migration
    returned."""
    listen = listen_tcp("127.0.0.1", 0)
    relay = Relay(listen.getsockname()[1], cuts)
    said: list[str] = []
    heard: list[str] = []
    statuses: list[str] = []
    got: dict = {}
    connect = lambda: connect_tcp("127.0.0.1", relay.port)  # noqa: E731

    def report(info: MigrationInfo) -> None:
        if not statuses or statuses[-1] != info.status:
            statuses.append(info.status)

    try:
        with booting() as boot:
            hv, dom = boot(make_config(GUEST, vcpus=2, name="mig"))
            hv_rx = boot.bare(64, seed=2)

            def source() -> None:
                try:
                    got["source"] = migrate_at(hv, dom, AT_NS, connect, PURE, until_ns=LIMIT_NS,
                                               say=said.append, report=report,
                                               resume=connect if resume else None)
                    if later is not None:
                        later(got["source"][1], relay.port, hv, dom)
                finally:
                    if not got.get("source", (0, MigrateOutcome()))[1].ok:
                        listen.shutdown(socket.SHUT_RDWR)  # no resume comes: stop waiting
            thread = threading.Thread(target=source)
            thread.start()
            try:
                rx = migrate_receive(accept_next(listen), hv_rx, say=heard.append)
                pager = rx.postcopy
                pager.recover = postcopy_recovery(lambda t: accept_next(listen, t),
                                                  "the relay", heard.append)
                # the guest runs here a while, then the drain takes every page in
                # before it goes on: the cuts, in octets, come before the end
                runs = [run_domain(rx.hv, rx.dom, MID_NS)]
                pager.drain()
                runs.append(run_domain(rx.hv, rx.dom, LIMIT_NS))
            finally:
                # a source still writing to a destination that stopped reading
                # (this side failed, or it hangs) must not hold the run: cut
                # every connection and say so
                thread.join(SOURCE_JOIN_S)
                if thread.is_alive():
                    relay.cut()
                    thread.join()
                    raise AssertionError(f"the source was still sending {SOURCE_JOIN_S} s "
                                         "after the destination stopped")
            result, out = got["source"]
            return {"out": out, "said": said, "heard": heard, "pager": pager, "dom": rx.dom,
                    "statuses": statuses, "source": dom, "data": relay.data,
                    "source_alive": dom.domid in hv.domains,
                    "console": result.console.decode()
                    + "".join(r.console.decode() for r in runs)}
    finally:
        listen.close()
        relay.close()


@pytest.fixture(scope="module")
def reference():
    with booting() as boot:
        r = run_domain(*boot(make_config(GUEST, vcpus=2, name="mig")), LIMIT_NS)
    assert r.reason == "poweroff"
    return outcome(r.console.decode())


@pytest.fixture(scope="module")
def plain():
    """The migration through the relay with no drop."""
    return recover_here([])


@pytest.fixture(scope="module")
def transition_end(plain) -> int:
    """The octet to the target after libxl's POSTCOPY_TRANSITION_END (the
    same in every run: the guest and its schedule are)."""
    data = bytes(plain["data"][0][TO_TARGET])
    src = io.BytesIO(data)
    incoming_header(src)
    read_libxl_header(src, src.tell())
    switched = False
    while True:
        rtype, length = stream.RHDR.unpack(src.read(stream.RHDR.size))
        src.read(length + (-length % stream.REC_ALIGN))
        if rtype == LibxlRecType.LIBXC_CONTEXT and not switched:
            src.read(stream.IHDR.size + stream.DHDR.size)
        switched = switched or rtype == PostcopyType.POSTCOPY_TRANSITION
        if switched and rtype == LibxlRecType.POSTCOPY_TRANSITION_END:
            assert stream.RHDR.unpack_from(data, src.tell())[0] == \
                PostcopyType.POSTCOPY_PAGE_DATA
            return src.tell()


def test_the_resume_records_are_numbered_next_to_postcopys():
    assert PostcopyType.POSTCOPY_RESUME == 0x0117
    assert PostcopyType.POSTCOPY_RECV_BITMAP == 0x0118
    assert not {0x0117, 0x0118} & {int(t) for t in RecType}


def test_the_recv_bitmap_round_trips_and_is_checked():
    lacks = np.zeros(77, bool)
    lacks[[0, 9, 76]] = True
    body = postcopy.bitmap_record(lacks)
    assert len(body) == 8 + 10
    rec = stream.Record(PostcopyType.POSTCOPY_RECV_BITMAP, body, 0, len(body))
    assert np.array_equal(postcopy.read_bitmap_record(rec, 77), lacks)
    with pytest.raises(stream.StreamError, match="for a domain of 78"):
        postcopy.read_bitmap_record(rec, 78)


def test_the_source_sends_again_only_what_was_lost_in_flight():
    """resume_source: the pages lacked that were sent go back to send;
    those never sent stay to send; those in stay sent."""
    src = postcopy.PostcopySource.of(np.ones(8, bool), MigrationInfo())
    src.next_batch(4)  # 0..3 sent
    a, b = socket.socketpair()
    here, there = (postcopy.Link(s.makefile("rb"), s.makefile("wb")) for s in (a, b))
    lacks = np.zeros(8, bool)
    lacks[[2, 3, 5, 6, 7, 4]] = True  # 0 and 1 came; 2 and 3 were lost
    there.write_record(PostcopyType.POSTCOPY_RECV_BITMAP, postcopy.bitmap_record(lacks))
    try:
        assert postcopy.resume_source(here, src, "mig") == (6, 2)
    finally:
        a.close()
        b.close()
    assert np.flatnonzero(src.pending).tolist() == [2, 3, 4, 5, 6, 7]
    assert np.flatnonzero(src.sent).tolist() == [0, 1]


def test_a_migration_through_the_relay_ends_as_an_uninterrupted_run(plain, reference):
    assert plain["out"].ok and outcome(plain["console"]) == reference
    assert plain["pager"].drops == 0 and len(plain["data"]) == 1


def _check_recovered(m: dict, reference: list[str], drops: int) -> None:
    out, pager = m["out"], m["pager"]
    assert out.ok and not out.undefined, m["said"]
    assert outcome(m["console"]) == reference
    assert m["said"][-1] == "Migration successful." and not m["source_alive"]
    assert pager.done and not pager.left and pager.drops == drops
    assert m["dom"].name == "mig" and not m["dom"].paused
    assert m["heard"][-1] == "migration target: Domain started successfully."
    assert sum(FAILED_POSTCOPY == line for line in m["said"]) == drops
    assert sum(line.startswith("migration sender: Post-copy resumed") for line in m["said"]) \
        == drops
    statuses = m["statuses"]
    switch = statuses.index("postcopy-active")
    assert statuses[switch:] == ["postcopy-active"] + [
        "postcopy-paused", "postcopy-recover-setup", "postcopy-recover",
        "postcopy-active"] * drops + ["completed"]
    assert len(m["data"]) == drops + 1
    for seen in m["data"][1:]:  # each resume: the banner, then POSTCOPY_RESUME
        assert seen[TO_SOURCE].startswith(MIGRATE_RECEIVER_BANNER)
        assert stream.RHDR.unpack_from(seen[TO_TARGET])[0] == PostcopyType.POSTCOPY_RESUME
        back = seen[TO_SOURCE][len(MIGRATE_RECEIVER_BANNER):]
        assert stream.RHDR.unpack_from(back)[0] == PostcopyType.POSTCOPY_RECV_BITMAP


# the drop points: where the first connection (and the second) is cut
POINTS = {
    "right after the transition": lambda t: [(TO_TARGET, t)],
    "between two records of the push": lambda t: [(TO_TARGET, t + 5 * RECORD)],
    "in the middle of a record": lambda t: [(TO_TARGET, t + 20 * RECORD + RECORD // 2)],
    "while a fault waits": lambda t: [(TO_SOURCE, len(MIGRATE_RECEIVER_BANNER) + 12)],
    "twice in one migration": lambda t: [(TO_TARGET, t + 3 * RECORD + 100),
                                         (TO_TARGET, 16 + 10 * RECORD + RECORD // 3)],
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_drop_resumed_ends_as_an_uninterrupted_run(point, transition_end, reference):
    cuts = POINTS[point](transition_end)
    m = recover_here(cuts)
    _check_recovered(m, reference, len(cuts))
    first = m["data"][0]
    way, octets = cuts[0]
    assert len(first[way]) == octets  # the cut was where it was meant
    if way == TO_SOURCE:  # in the destination's first fault, which then waits
        assert stream.RHDR.unpack_from(first[way], len(MIGRATE_RECEIVER_BANNER))[0] == \
            PostcopyType.POSTCOPY_FAULT


def test_a_drop_in_the_streams_end_is_resumed_to_end_both_sides(plain, reference):
    """Cut in the source's END, after every page: the target, whose END did
    not come, waits for a resume; the source, which had COMPLETE, makes one
    to end the stream there; both end as an uninterrupted migration."""
    total = len(plain["data"][0][TO_TARGET])
    m = recover_here([(TO_TARGET, total - 12)])
    out, pager = m["out"], m["pager"]
    assert out.ok and outcome(m["console"]) == reference
    assert m["said"][-1] == "Migration successful." and not m["source_alive"]
    assert any(line.startswith("migration sender: after post-copy") for line in m["said"])
    assert any(line.startswith("migration sender: Post-copy resumed: the target lacks 0 pages")
               for line in m["said"])
    assert any("has all it needs; waiting on the relay" in line for line in m["heard"])
    assert pager.done and pager.drops == 0 and m["dom"].name == "mig"
    assert len(m["data"]) == 2 and len(m["data"][0][TO_TARGET]) == total - 12


def test_an_end_lost_after_complete_never_pauses_a_whole_domain():
    """A pager with no ``recover`` (the daemon's) whose END is lost after
    its COMPLETE: its domain has every page, so it is done at once (the
    source, which had COMPLETE, may have destroyed its copy already) and
    runs on; the loop's next poll reads nothing."""
    with booting() as boot:
        hv, dom = boot(make_config("run=hashchain", memory=16, name="x"))
        run_domain(hv, dom, 1_000_000)
        a, b = socket.socketpair()
        pager = postcopy.Pager(hv, dom, np.arange(4096), np.zeros(0, np.int64),
                               postcopy.Link(b.makefile("rb"), b.makefile("wb")))
        completed: list[postcopy.Pager] = []
        pager.on_complete = completed.append
        a.close()  # the source gone before END
        try:
            pager.poll(16)  # the last page is in: COMPLETE, END lost
            pager.poll(16)  # the loop's next slice
        finally:
            b.close()
        assert pager.done and not pager.paused and not pager.unfinished
        assert completed == [pager] and not dom.paused and pager.drops == 0


def test_a_resumed_link_closes_the_dropped_one_but_not_its_owners():
    """Each resume's link replaces the one before, which is closed; the
    first is the receiver's channel, closed by its owner."""
    links = [postcopy.Link(io.BytesIO(), io.BytesIO()) for _ in range(3)]
    pager = postcopy.Pager.__new__(postcopy.Pager)
    pager.link = pager.first_link = links[0]
    pager._swap_link(links[1])
    pager._swap_link(links[2])
    assert [link.reader.closed for link in links] == [False, True, False]
    assert pager.link is links[2]


def test_a_source_that_cannot_resume_keeps_its_copy_paused_for_a_later_resume(
        transition_end, reference):
    """The source without a way to reconnect: postcopy-paused, its copy
    kept suspended with its push state; ``resume_postcopy`` on a new
    connection later (the daemon's migrate --resume) ends the migration."""
    def later(out, port, hv, dom) -> None:
        assert not out.ok and out.undefined and out.postcopy is not None
        assert dom.name == "mig--postcopy-inconsistent"
        assert dom.shutdown_reason == SHUTDOWN_suspend
        assert out.info.query_migrate()["status"] == "postcopy-paused"
        done = resume_postcopy(hv, dom, out, connect_tcp("127.0.0.1", port))
        assert done is out and out.ok and out.postcopy is None

    m = recover_here([(TO_TARGET, transition_end + 7 * RECORD)], resume=False, later=later)
    assert outcome(m["console"]) == reference
    assert m["pager"].done and m["pager"].drops == 1 and not m["source_alive"]


def test_a_resume_of_another_domain_is_refused_and_the_wait_goes_on():
    """The target answers a resume for a name not its own by closing the
    connection (the source's sign of a refusal) and keeps its domain paused."""
    pager = _paused_pager("mig--incoming")
    a, b = socket.socketpair()
    from hypervisor.toolstack.migrate import Channel
    ch = Channel(b.makefile("rb"), b.makefile("wb"))
    link = postcopy.Link(a.makefile("rb"), a.makefile("wb"))
    link.write_record(PostcopyType.POSTCOPY_RESUME, b"other")
    try:
        with pytest.raises(MigrateError, match="a resume of domain 'other', not 'mig'"):
            receive_resume(ch, pager)
    finally:
        a.close()
        b.close()
    assert pager.paused


def test_resume_postcopy_without_a_paused_postcopy_is_one_line():
    with pytest.raises(MigrateError, match="no paused post-copy to resume"):
        resume_postcopy(None, _Named("mig"), MigrateOutcome(), None)  # type: ignore[arg-type]


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def _paused_pager(name: str) -> postcopy.Pager:
    pager = postcopy.Pager.__new__(postcopy.Pager)
    pager.dom, pager.paused, pager.done = _Named(name), True, False  # type: ignore[assignment]
    pager.state = np.zeros(4, np.int8)
    return pager


# --- the command line -------------------------------------------------------------------------

def test_migrate_receive_waits_paused_for_the_resume_of_a_scripted_postcopy(
        tmp_path, capfd, transition_end):
    """``pvlab run ... migrate --postcopy`` to a ``pvlab migrate-receive
    -p --listen`` through a relay that cuts the first connection: the
    receiver says it waits, the scripted source resumes at the same address,
    and both end as an uninterrupted migration. (The domain left paused
    there takes every page before its process ends, so the cut always
    comes; the guest's results are the in-process tests'.)"""
    rx, port = listening(tmp_path, "-p")
    relay = Relay(port, [(TO_TARGET, transition_end + 9 * RECORD)])
    try:
        code = main(["run", str(toml(tmp_path / "mig.toml")), "--request",
                     f"3ms migrate --postcopy --precopy-iterations 0 127.0.0.1:{relay.port}",
                     "--json"])
        out, err = rx.communicate(timeout=300)
    finally:
        relay.close()
    sent = capfd.readouterr()
    assert code == 0 and rx.returncode == 0, err
    assert "suspend hypercall returned" not in sent.out  # it runs on there
    lines = [json.loads(x) for x in sent.err.splitlines()]
    status = [x["status"] for x in lines if "status" in x]
    assert "postcopy-paused" in status and "postcopy-recover" in status
    assert status[-1] == "completed"
    said = err.splitlines()
    assert sum("paused; waiting on 127.0.0.1:" in line for line in said) == 1
    assert any(line.startswith("migration target: Post-copy resumed") for line in said)
    assert "migration target: Domain started successfully." in said
    assert "post-copy: resumed after 1 dropped connection(s)" in out
    assert os.listdir(tmp_path) == ["mig.toml"]


# --- a peer gone without a word ----------------------------------------------------------------

def _silent_link() -> tuple[postcopy.Link, socket.socket, socket.socket]:
    a, b = socket.socketpair()  # b is the peer: open, and it never writes
    return postcopy.Link(a.makefile("rb"), a.makefile("wb")), a, b


def test_a_link_whose_peer_says_nothing_is_dropped_after_the_wait():
    link, a, b = _silent_link()
    try:
        assert link.read_record(block=False) is None
        with pytest.raises(postcopy.Dropped, match="nothing from the peer in 0.05 s"):
            link.read_record(block=True, timeout_s=0.05)
    finally:
        a.close()
        b.close()


def test_the_pager_waits_for_a_page_no_longer_than_page_wait(monkeypatch):
    """A half-open connection (the source's host gone without a FIN) must not
    hold the pager, which at a daemon destination holds the daemon's loop:
    its wait ends as a drop, which pauses the domain, recoverable."""
    monkeypatch.setattr(postcopy, "PAGE_WAIT_S", 0.05)
    link, a, b = _silent_link()
    pager = _paused_pager("mig")
    pager.link = link
    try:
        with pytest.raises(postcopy.Dropped, match="nothing from the peer"):
            pager._take(block=True)
    finally:
        a.close()
        b.close()


def test_a_pager_that_pauses_cuts_its_link_so_the_source_hears_it():
    """A drop the destination decided (a page waited for too long) leaves a
    link that still works: cut, the source's reads end and its writes fail,
    instead of it sending into a destination that no longer reads."""
    from types import SimpleNamespace
    link, a, b = _silent_link()
    pager = postcopy.Pager.__new__(postcopy.Pager)
    pager.hv = SimpleNamespace(domains={})
    pager.dom = SimpleNamespace(domid=7, name="mig", paused=False)
    pager.link, pager.paused, pager.drops, pager.left = link, False, 0, 3
    pager._say = None
    try:
        pager._paused("nothing from the peer in 30 s")
        b.settimeout(5)
        assert b.recv(1) == b""  # the source's read ends
    finally:
        a.close()
        b.close()
