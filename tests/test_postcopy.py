"""Post-copy live migration (postcopy.py; Joshua Otto's Xen RFC, its xl
handshake): the guest starts at the destination while its memory follows.

Both ends run in this process on a socketpair, the source in a thread: the
records are on the wire in the documented order with pvlab's numbers, each
page crosses once after the switch, a migration (after pre-copy rounds, or
pure) ends with the results of an uninterrupted run, the destination's
faults are served (demand paging alone) and its frames end holding the
source's pages, a failure before the switch resumes the source, and a drop
after it pauses the destination's domain and leaves the source's copy
suspended as NAME--postcopy-inconsistent."""

from __future__ import annotations

import io
import json
import os
import random
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from hypervisor import domctl
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.public.xen import PAGE_SIZE
from hypervisor.toolstack import pfinfo, postcopy, savefile, stream
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.migrate import (
    FAILED_POSTCOPY,
    MIGRATE_POSTCOPY_SYNC,
    MIGRATE_RECEIVER_BANNER,
    Channel,
    MigrateError,
    incoming_header,
    migrate_receive,
    read_fixed_message,
)
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions
from hypervisor.toolstack.save import canonicalise, start_live_stream
from hypervisor.toolstack.savefile import LibxlRecType
from hypervisor.toolstack.session import LiveRun, migrate_at, run_domain
from hypervisor.toolstack.stream import PostcopyType, RecType
from hypervisor.toolstack.transport import parse_destination
from tests.conftest import booting, make_config
from tests.test_migrate import GUEST, LIMIT_NS, listening, outcome, toml

AT_NS = 3_000_000
HYBRID = PrecopyOptions(postcopy=True)
PURE = PrecopyOptions(postcopy=True, max_iterations=0)
MODES = {"hybrid": HYBRID, "pure": PURE}
# the sweep's guest: shorter, on 8 MiB (its first round 8 ms of virtual time)
SWEEP_GUEST, SWEEP_MIB = "run=dirtier:100:20000:400,counter:3:100000", 8


@pytest.fixture(scope="module")
def reference():
    with booting() as boot:
        r = run_domain(*boot(make_config(GUEST, vcpus=2, name="mig")), LIMIT_NS)
    assert r.reason == "poweroff"
    return outcome(r.console.decode())


class Tap:
    """One direction of a socket, its octets kept; ``cut`` octets in, the
    socket is shut down and the write fails (a connection dropped)."""

    def __init__(self, f, sock: socket.socket, cut: int | None = None) -> None:
        self.f, self.sock, self.cut, self.data = f, sock, cut, bytearray()

    def write(self, data) -> int:
        if self.cut is not None and len(self.data) + len(data) > self.cut:
            self.sock.shutdown(socket.SHUT_RDWR)
            raise BrokenPipeError(32, "Broken pipe")
        self.data += data
        return self.f.write(data)

    def read1(self, n: int) -> bytes:
        data = self.f.read1(n)
        self.data += data or b""
        return data

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.data += data
        return data

    def fileno(self) -> int:
        return self.f.fileno()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        """The source's end closing its side: the other end sees the end."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # shut down already
        self.f.close()


class Wire:
    """A socketpair: the source's channel (both directions tapped) and the
    destination's."""

    def __init__(self, cut: int | None = None) -> None:
        self.a, self.b = socket.socketpair()
        self.to_target = Tap(self.a.makefile("wb"), self.a, cut)
        self.to_source = Tap(self.a.makefile("rb"), self.a)
        self.tx = Channel(self.to_source, self.to_target)
        self.rx = Channel(self.b.makefile("rb"), self.b.makefile("wb"))

    def shutdown(self) -> None:
        """Both ends cut: whatever waits on the wire stops waiting."""
        for sock in (self.a, self.b):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # shut down already

    def close(self) -> None:
        for ch in (self.tx, self.rx):
            ch.close(wait=False)
        self.a.close()
        self.b.close()


def migrate_here(opts: PrecopyOptions, seed: int = 1, at_ns: int = AT_NS, paused: bool = False,
                 cut: int | None = None, guest: str = GUEST, mib: int = 16,
                 then: Callable[[Any, Any], bytes] | None = None, cfg: Any = None,
                 requests: tuple = (), started: Callable[[Any], None] | None = None) -> dict:
    """One post-copy migration, the source (``seed``'s frames and schedule,
    or ``cfg``, making ``requests`` before the migration) in a thread, the
    destination here run to its end (``started`` sees it before it runs);
    what each side said and did, the octets both ways, the guest's console."""
    wire = Wire(cut)
    said: list[str] = []
    heard: list[str] = []
    got: dict = {}
    with booting() as boot:
        hv, dom = boot(cfg or make_config(guest, vcpus=2, name="mig", seed=seed, memory=mib))
        hv_rx = boot.bare(64, seed=seed + 1)

        def source() -> None:
            try:
                got["source"] = migrate_at(hv, dom, at_ns, lambda: wire.tx, opts,
                                           until_ns=LIMIT_NS, say=said.append,
                                           requests=requests)
            except BaseException:
                wire.shutdown()  # the destination must not wait for ever
                raise
        thread = threading.Thread(target=source)
        thread.start()
        try:
            rx = migrate_receive(wire.rx, hv_rx, paused=paused, say=heard.append)
            pager = rx.postcopy
            assert pager is not None
            if started is not None:
                started(rx)
            try:
                after = run_domain(rx.hv, rx.dom, None if paused else LIMIT_NS)
            except postcopy.PostcopyPaused:
                after = None
            stats = (domctl.mem_paging_stats(hv_rx), dict(hv_rx.machine.memory.absent.faults))
            pager.drain()
        except BaseException:
            wire.shutdown()  # a failure here must not leave the source waiting
            raise
        finally:
            thread.join()
        result, out = got["source"]
        wire.close()
        later = then(rx, out) if then is not None else b""
        return {"out": out, "said": said, "heard": heard, "pager": pager, "stats": stats,
                "hv": hv_rx, "dom": rx.dom, "paused": rx.dom.paused,
                "alive": rx.dom.domid in hv_rx.domains,
                "source": dom, "source_alive": dom.domid in hv.domains,
                "console": result.console.decode() + (after.console.decode() if after else "")
                + later.decode(),
                "to_target": bytes(wire.to_target.data),
                "to_source": bytes(wire.to_source.data)}


@pytest.fixture(scope="module", params=list(MODES))
def migrated(request):
    return request.param, migrate_here(MODES[request.param])


# --- the octets ------------------------------------------------------------------------

def records(data: bytes) -> list[tuple[str, int, bytes]]:
    """The stream to the target as (layer, type, body): xl's header, libxl's
    records, the libxc stream inside LIBXC_CONTEXT, with libxl's records
    inside it from POSTCOPY_TRANSITION to POSTCOPY_TRANSITION_END."""
    src = io.BytesIO(data)
    incoming_header(src)
    savefile.read_libxl_header(src, src.tell())
    out, layer = [], "libxl"
    while src.tell() < len(data):
        rtype, length = stream.RHDR.unpack(src.read(stream.RHDR.size))
        body = src.read(length + (-length % stream.REC_ALIGN))[:length]
        out.append((layer, rtype, body))
        if layer == "libxl" and rtype == LibxlRecType.LIBXC_CONTEXT:
            src.read(stream.IHDR.size + stream.DHDR.size)
            layer = "libxc"
        elif (layer, rtype) == ("libxc", PostcopyType.POSTCOPY_TRANSITION):
            layer = "libxl"
        elif (layer, rtype) == ("libxl", LibxlRecType.POSTCOPY_TRANSITION_END):
            layer = "libxc"
        elif (layer, rtype) == ("libxc", RecType.END):
            layer = "libxl"
    return out


def entries(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    (count,) = stream.PAGE_DATA_HDR.unpack_from(body)
    e = np.frombuffer(body, np.uint64, count, stream.PAGE_DATA_HDR.size)
    return (e & np.uint64(stream.PAGE_DATA_PFN_MASK)).astype(np.int64), \
        (e >> np.uint64(60)).astype(np.uint8)


def test_the_records_have_pvlabs_numbers_and_are_mandatory():
    # Otto's seven, then pvlab's two of a resume and its refusal
    assert [int(t) for t in PostcopyType] == list(range(0x0110, 0x011A))
    assert [t.name for t in PostcopyType] == [
        "POSTCOPY_BEGIN", "POSTCOPY_PFNS_BEGIN", "POSTCOPY_PFNS", "POSTCOPY_TRANSITION",
        "POSTCOPY_PAGE_DATA", "POSTCOPY_FAULT", "POSTCOPY_COMPLETE", "POSTCOPY_RESUME",
        "POSTCOPY_RECV_BITMAP", "POSTCOPY_REFUSED"]
    assert not any(t & stream.REC_TYPE_OPTIONAL for t in PostcopyType)
    assert not {int(t) for t in PostcopyType} & {int(t) for t in RecType}
    assert LibxlRecType.POSTCOPY_TRANSITION_END == 6
    assert MIGRATE_POSTCOPY_SYNC == b"postcopy migration completed successfully\0"


def test_the_records_come_in_the_documented_order(migrated):
    mode, m = migrated
    seq = [(layer, t) for layer, t, _ in records(m["to_target"])]
    names = [stream.rec_name(t) if layer == "libxc" else f"libxl {savefile.libxl_rec_name(t)}"
             for layer, t in seq]
    squeezed = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    begin = squeezed.index("POSTCOPY_BEGIN")
    assert squeezed[:4] == ["libxl LIBXC_CONTEXT", "X86_PV_INFO", "STATIC_DATA_END",
                            "X86_PV_P2M_FRAMES"]
    assert set(squeezed[4:begin]) == {"PAGE_DATA"}
    assert squeezed[begin:] == [
        "POSTCOPY_BEGIN", "X86_TSC_INFO", "SHARED_INFO", "X86_PV_VCPU_BASIC",
        "POSTCOPY_PFNS_BEGIN", "POSTCOPY_PFNS", "POSTCOPY_TRANSITION",
        "libxl EMULATOR_XENSTORE_DATA", "libxl POSTCOPY_TRANSITION_END", "POSTCOPY_PAGE_DATA",
        "END", "libxl END"]
    assert names.count("X86_PV_VCPU_BASIC") == 2
    # the other way: faults, then COMPLETE, then xl's word
    back = m["to_source"][len(MIGRATE_RECEIVER_BANNER):]
    assert m["to_source"].startswith(MIGRATE_RECEIVER_BANNER)
    assert back.endswith(MIGRATE_POSTCOPY_SYNC)
    kinds, asked = [], []
    src = io.BytesIO(back[:-len(MIGRATE_POSTCOPY_SYNC)])
    while src.tell() < len(back) - len(MIGRATE_POSTCOPY_SYNC):
        rtype, length = stream.RHDR.unpack(src.read(stream.RHDR.size))
        body = src.read(length)
        kinds.append(rtype)
        if rtype == PostcopyType.POSTCOPY_FAULT:
            (count,) = stream.PAGE_DATA_HDR.unpack_from(body)
            asked += np.frombuffer(body, np.uint64, count, 8).tolist()
    assert kinds[-1] == PostcopyType.POSTCOPY_COMPLETE
    assert set(kinds[:-1]) <= {PostcopyType.POSTCOPY_FAULT}
    assert len(set(asked)) == len(asked)  # no pfn asked for twice


def test_each_page_crosses_once_after_the_switch(migrated):
    """The final PAGE_DATA (what must be there first) and the
    POSTCOPY_PAGE_DATA records name no pfn twice, and the latter exactly
    the POSTCOPY_PFNS with data; with the pre-copy rounds' copies every
    pfn is accounted for."""
    mode, m = migrated
    recs = records(m["to_target"])
    begin = next(i for i, r in enumerate(recs) if r[1] == PostcopyType.POSTCOPY_BEGIN)
    final_pfns = m["out"].info.rounds[-1].pfns
    before = [entries(b)[0] for layer, t, b in recs[:begin]
              if (layer, t) == ("libxc", RecType.PAGE_DATA)]
    eager = np.concatenate(before)[-final_pfns:] if final_pfns else np.zeros(0, np.int64)
    pushed = np.concatenate([entries(b)[0] for _, t, b in recs
                             if t == PostcopyType.POSTCOPY_PAGE_DATA])
    pfn_recs = [entries(b) for _, t, b in recs if t == PostcopyType.POSTCOPY_PFNS]
    later = np.concatenate([p for p, _ in pfn_recs])
    with_data = np.concatenate([p[~np.isin(n, list(pfinfo.NO_DATA))] for p, n in pfn_recs])
    after = np.concatenate([eager, pushed])
    assert np.unique(after).size == after.size
    assert np.array_equal(np.sort(pushed), np.sort(with_data))
    assert not np.intersect1d(eager, later).size
    every = np.concatenate(before + [later])
    assert np.array_equal(np.unique(every), np.arange(4096))
    if mode == "pure":
        assert len(before) == 1 and np.unique(after).size >= 4000


def test_a_postcopy_migration_ends_as_an_uninterrupted_run(migrated, reference):
    mode, m = migrated
    assert m["out"].ok, m["said"]
    assert outcome(m["console"]) == reference
    assert "suspend hypercall returned 0" in m["console"]
    assert m["said"][-1] == "Migration successful." and not m["source_alive"]
    assert m["heard"][-1] == "migration target: Domain started successfully."
    assert m["dom"].name == "mig" and m["pager"].done and not m["pager"].left
    info = m["out"].info.query_migrate()
    assert info["status"] == "completed"
    ram = info["ram"]
    assert ram["postcopy-bytes"] > 0 and ram["downtime-bytes"] > 0
    assert ram["postcopy-requests"] == m["pager"].requests
    assert (ram["precopy-bytes"] > 16 << 20) == (mode == "hybrid")


def test_a_fault_for_a_page_sent_is_not_answered_and_the_scan_follows_the_fault():
    """handle_postcopy_faults: the asked pages first, one already sent not
    again; the scan goes on after the last faulted pfn, round the end."""
    src = postcopy.PostcopySource.of(np.ones(16, bool), MigrationInfo())
    first, _ = src.next_batch(4)
    assert first.tolist() == [0, 1, 2, 3]
    src.fault(np.array([2, 10]))
    batch, asked = src.next_batch(4)
    assert (batch.tolist(), asked) == ([10, 11, 12, 13], 1)
    src.fault(np.array([15]))
    batch, asked = src.next_batch(4)
    assert (batch.tolist(), asked) == ([15, 4, 5, 6], 1)
    rest = []
    while src.remaining():
        rest += src.next_batch(4)[0].tolist()
    assert sorted(rest + [0, 1, 2, 3, 10, 11, 12, 13, 15, 4, 5, 6]) == list(range(16))
    assert src.sent.all() and src.info.postcopy_requests == 2


class Zeros:
    """A PageSource of zeroed pages (no domain)."""

    def read(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(pfns.size, np.uint32), np.zeros((pfns.size, PAGE_SIZE // 8), np.uint64)


class Counting(postcopy.Pager):
    """A pager of no domain: its pages counted in, not loaded."""

    def __init__(self, link: postcopy.Link, n: int) -> None:
        super().__init__(None, None, np.arange(n), np.arange(n), link)  # type: ignore[arg-type]

    def wants_pages(self) -> bool:
        return True

    def _load(self, rec: stream.Record) -> None:
        pfns, _ = postcopy.read_typed_pfns(rec, with_pages=True)
        self.state[pfns] = postcopy.READY
        self.left -= pfns.size


def test_a_drain_of_a_big_guest_asks_while_the_pages_come():
    """A drain's faults for 2^16 pfns (512 KiB, more than the socket holds)
    while the source pushes: written in pieces with the pages taken between,
    neither side waits in a write for ever (the drop below only ends a hang)."""
    n = 1 << 16
    a, b = socket.socketpair()
    src = postcopy.PostcopySource.of(np.ones(n, bool), MigrationInfo())
    pager = Counting(postcopy.Link(b.makefile("rb"), b.makefile("wb")), n)
    failed: list[BaseException] = []

    def source() -> None:
        try:
            postcopy.push(Zeros(), postcopy.Link(a.makefile("rb"), a.makefile("wb")), src)
        except BaseException as e:
            failed.append(e)
    thread = threading.Thread(target=source)
    thread.start()
    try:
        pager._take(block=True)  # the push under way
        drained = threading.Thread(target=pager._drain)
        drained.start()
        drained.join(60)
        hung = drained.is_alive()
    finally:
        for sock in (a, b):
            sock.shutdown(socket.SHUT_RDWR)
        thread.join()
        drained.join()
        a.close()
        b.close()
    assert not hung and pager.left == 0 and pager.requests > 1


# --- faults served, pages as the source's --------------------------------------------------

def demand_only(wire: Wire, hv, dom, at_ns: int, snapshot: dict) -> None:
    """The source's side with no background push: only the pages asked for
    (the push loop run on its own state object), after a pure switch;
    ``snapshot`` gets the suspended source's p2m, types and pages."""
    read_fixed_message(wire.tx, MIGRATE_RECEIVER_BANNER, "banner")
    live = LiveRun(hv, dom, at_ns, None, None)
    ls = start_live_stream(hv, dom, wire.tx.writer, live, PURE)
    src = postcopy.switch_to_postcopy(ls)
    p2m = ls.p2m.astype(np.int64)
    si = int(domctl.map_m2p(hv)[int(domctl.getvcpucontext(dom, 0).user_regs.rdx)])
    snapshot.update(p2m=p2m, types=domctl.getpageframeinfo3(hv, dom, p2m),
                    rewritten=np.append(ls.frame_pfns, si),
                    pages=np.asarray(domctl.map_foreign_bulk(hv, dom, p2m)).copy(),
                    m2p=domctl.map_m2p(hv).copy())
    link = postcopy.Link(wire.tx.reader, wire.tx.writer)
    postcopy.push(postcopy.DomainPages(hv, dom, ls.p2m), link, src, background=False)
    postcopy.end_stream(link)
    assert link.read_exactly(len(MIGRATE_POSTCOPY_SYNC)) == MIGRATE_POSTCOPY_SYNC
    snapshot["ended"] = src.remaining()  # the pages never sent


def demand_migration(paused: bool, at_ns: int = AT_NS) -> dict:
    wire = Wire()
    snap: dict = {}
    with booting() as boot:
        hv, dom = boot(make_config(GUEST, vcpus=2, name="mig"))
        run_domain(hv, dom, at_ns)
        hv_rx = boot.bare(64, seed=7)
        def source() -> None:
            try:
                demand_only(wire, hv, dom, at_ns, snap)
            except BaseException:
                wire.shutdown()  # the destination must not wait for ever
                raise
        thread = threading.Thread(target=source)
        thread.start()
        try:
            rx = migrate_receive(wire.rx, hv_rx, paused=paused)
            pager = rx.postcopy
            after = None if paused else run_domain(rx.hv, rx.dom, LIMIT_NS)
            stats = (domctl.mem_paging_stats(hv_rx), dict(hv_rx.machine.memory.absent.faults),
                     pager.faulted, pager.pushed, pager.requests)
            pager.drain()
        except BaseException:
            wire.shutdown()  # a failure here must not leave the source waiting
            raise
        finally:
            thread.join()
        wire.close()
        p2m = pager.p2m.astype(np.int64)
        here = np.asarray(domctl.map_foreign_bulk(hv_rx, rx.dom, p2m[p2m >= 0])).copy()
        return {"stats": stats, "after": after, "snap": snap, "p2m": p2m, "here": here,
                "unfetched": pager.unfetched, "done": pager.done,
                "m2p": domctl.map_m2p(hv_rx).copy(), "source": bytes(dom.console_out)}


def test_a_guest_whose_pages_are_all_absent_has_its_faults_served(reference):
    """Demand paging alone: every page the guest touches is asked for, and
    the guest ends as the uninterrupted run. It powers off with pages it
    never touched: the drain asks for none of them (COMPLETE at once), and
    the source ends cleanly with them unsent."""
    m = demand_migration(paused=False)
    (absent, fetched, calls), faults, faulted, pushed, requests = m["stats"]
    assert m["after"].reason == "poweroff"
    assert outcome(m["source"].decode() + m["after"].console.decode()) == reference
    assert pushed == 0 and faulted > 0 and requests > 0
    assert fetched >= faulted and calls >= requests and sum(faults.values()) > 0
    assert absent > 0  # pages it never touched
    assert m["done"] and m["unfetched"] == m["snap"]["ended"] > 0


def test_the_frames_hold_the_sources_pages():
    """A paused destination drained: every page with data as the suspended
    source had it (pagetables compared canonical: their frames differ);
    but start_info and the p2m list, which the restore rewrites."""
    m = demand_migration(paused=True)
    snap = m["snap"]
    nib = pfinfo.nibble(snap["types"])
    level = pfinfo.level(nib)
    data = ~np.isin(nib, list(pfinfo.NO_DATA))
    tables = np.flatnonzero(level)
    src_canon = canonicalise(snap["pages"][tables], level[tables], tables,
                             snap["p2m"].astype(np.uint64), snap["m2p"])
    dst_canon = canonicalise(m["here"][tables], level[tables], tables,
                             m["p2m"].astype(np.uint64), m["m2p"])
    assert np.array_equal(src_canon, dst_canon)
    plain = np.flatnonzero(data & (level == 0))
    differ = plain[(snap["pages"][plain] != m["here"][plain]).any(axis=1)]
    assert set(differ.tolist()) <= set(snap["rewritten"].tolist())


# --- failures ------------------------------------------------------------------------------

def test_a_failure_before_the_switch_resumes_the_source(reference):
    """The connection cut while the source writes what must go before the
    switch, its guest already suspended: it is resumed cancelled and ends
    here as the uninterrupted run."""
    wire = Wire(cut=64 << 10)
    said: list[str] = []
    with booting() as boot:
        hv, dom = boot(make_config(GUEST, vcpus=2, name="mig"))
        drained = threading.Thread(target=lambda: wire.rx.reader.read())
        wire.rx.writer.write(MIGRATE_RECEIVER_BANNER)
        wire.rx.writer.flush()
        drained.start()
        result, out = migrate_at(hv, dom, AT_NS, lambda: wire.tx, PURE, until_ns=LIMIT_NS,
                                 say=said.append)
        drained.join()
        wire.close()
    assert not out.ok and out.runs_on and not out.undefined
    assert out.error == "Migration failed, resuming at sender."
    assert dom.name == "mig" and result.reason == "poweroff"
    assert outcome(result.console.decode()) == reference


def test_a_target_that_refuses_postcopy_before_the_transition_resumes_the_source(reference):
    """A receiver that cannot take post-copy answers POSTCOPY_BEGIN with
    POSTCOPY_REFUSED and builds nothing: the source, which would otherwise
    have kept its copy as NAME--postcopy-inconsistent, resumes it, and it
    ends here as the uninterrupted run."""
    wire = Wire()
    said: list[str] = []
    refused: list[Exception] = []
    with booting() as boot:
        hv, dom = boot(make_config(GUEST, vcpus=2, name="mig"))
        hv_rx = boot.bare(64, seed=2)

        def target() -> None:
            try:
                migrate_receive(wire.rx, hv_rx, refuse_postcopy="no post-copy here")
            except MigrateError as e:
                refused.append(e)
        thread = threading.Thread(target=target)
        thread.start()
        try:
            result, out = migrate_at(hv, dom, AT_NS, lambda: wire.tx, PURE, until_ns=LIMIT_NS,
                                     say=said.append)
        finally:
            wire.shutdown()
            thread.join()
        wire.close()
        assert not hv_rx.domains  # nothing built at the target
    assert "post-copy refused: no post-copy here" in str(refused[0])
    assert "migration sender: the target refused post-copy: no post-copy here" in said
    assert not out.ok and out.runs_on and not out.undefined
    assert out.error == "Migration failed, resuming at sender."
    assert dom.name == "mig" and result.reason == "poweroff"
    assert out.info is not None and out.info.status == "failed"
    assert outcome(result.console.decode()) == reference


def test_a_drop_after_the_switch_pauses_the_target_and_keeps_the_source_suspended():
    m = migrate_here(PURE, cut=1 << 20)
    out = m["out"]
    assert not out.ok and out.undefined and not out.runs_on
    assert out.error == FAILED_POSTCOPY and FAILED_POSTCOPY in m["said"]
    src = m["source"]
    assert m["source_alive"] and src.name == "mig--postcopy-inconsistent"
    assert src.shutdown_reason == SHUTDOWN_suspend
    pager = m["pager"]
    assert m["alive"] and m["paused"] and pager.paused and pager.left > 0
    assert m["dom"].name == "mig--incoming"
    assert m["stats"][0][0] > 0  # absent frames kept
    assert sum("dropped during post-copy" in line for line in m["heard"]) == 1


def test_any_failure_after_the_switch_keeps_the_source_suspended(monkeypatch):
    """A page the source cannot read (any exception, not only a drop) after
    the switch: the guest runs at the target, so the copy here is kept
    suspended, never resumed (two running instances)."""
    def unreadable(self, pfns):
        raise RuntimeError("a page unreadable here")
    monkeypatch.setattr(postcopy.DomainPages, "read", unreadable)
    m = migrate_here(PURE)
    out = m["out"]
    assert not out.ok and out.undefined and not out.runs_on
    assert out.error == FAILED_POSTCOPY
    assert "migration sender: post-copy failed: a page unreadable here" in m["said"]
    assert m["source_alive"] and m["source"].name == "mig--postcopy-inconsistent"
    assert m["source"].shutdown_reason == SHUTDOWN_suspend
    assert m["pager"].paused


# --- the command line -------------------------------------------------------------------------

def test_pvlab_run_migrates_with_postcopy_over_tcp(reference, tmp_path, capfd):
    """``migrate --postcopy --precopy-iterations 0`` to a ``pvlab migrate-receive``
    process: QEMU's post-copy fields in the JSON lines, Otto's messages."""
    rx, port = listening(tmp_path)
    code = main(["run", str(toml(tmp_path / "mig.toml")), "--request",
                 f"3ms migrate --postcopy --precopy-iterations 0 127.0.0.1:{port}", "--json"])
    out, err = rx.communicate(timeout=300)
    sent = capfd.readouterr()
    assert code == 0 and rx.returncode == 0, err
    assert outcome(sent.out + out) == reference and "returned 0" in out
    lines = [json.loads(x) for x in sent.err.splitlines()]
    status = [x["status"] for x in lines if "status" in x]
    assert "postcopy-active" in status and status[-1] == "completed"
    ram = [x for x in lines if "status" in x][-1]["ram"]
    assert {"postcopy-requests", "postcopy-bytes", "precopy-bytes", "downtime-bytes"} <= set(ram)
    assert [x["message"] for x in lines if "message" in x][-1] == "Migration successful."
    said = err.splitlines()
    assert "migration target: Domain started successfully." in said
    assert not any("ready to unpause" in line or "permission" in line for line in said)
    assert os.listdir(tmp_path) == ["mig.toml"]


@pytest.mark.parametrize("text, want", [
    ("--postcopy 10.0.0.2:7001", (True, None)),
    ("--postcopy --precopy-iterations 0 ssh:host", (True, 0)),
    ("--precopy-iterations 2 10.0.0.2:7001", (False, 2)),
])
def test_the_postcopy_flags_are_read(text, want):
    dest = parse_destination(text)
    assert (dest.postcopy, dest.precopy_iterations) == want


@pytest.mark.parametrize("text", ["--precopy-iterations 0 10.0.0.2:7001",
                                  "--postcopy --precopy-iterations x 10.0.0.2:7001"])
def test_bad_postcopy_flags_are_one_line(text):
    with pytest.raises(ValueError, match="precopy-iterations"):
        parse_destination(text)


def test_the_pieces_a_recovery_stands_on_finish_a_dropped_postcopy(reference):
    """After a drop: the source's push state (kept in its outcome) made to
    send again what the destination never got, the push run on a new
    connection, the pager given it (``replace_link``: its lost requests
    asked again, the domain unpaused); the guest ends as the uninterrupted run."""
    def recover(rx, out) -> bytes:
        pager, src = rx.postcopy, out.postcopy
        ready = pager.state == postcopy.READY
        lost = src.sent & ~ready & (pager.state != postcopy.NOT_POSTCOPY)
        src.pending |= lost
        src.sent &= ~lost
        a, b = socket.socketpair()
        link = postcopy.Link(a.makefile("rb"), a.makefile("wb"))

        def source() -> None:
            postcopy.push(out.pages, link, src)
            postcopy.end_stream(link)
        thread = threading.Thread(target=source)
        thread.start()
        pager.replace_link(postcopy.Link(b.makefile("rb"), b.makefile("wb")))
        try:
            after = run_domain(rx.hv, rx.dom, LIMIT_NS)
            pager.drain()
        finally:
            thread.join()
            a.close()
            b.close()
        assert pager.done and not pager.left and rx.dom.name == "mig"
        return after.console

    m = migrate_here(PURE, cut=1 << 20, then=recover)
    assert m["out"].undefined and m["pager"].done
    assert outcome(m["console"]) == reference


# --- anywhere --------------------------------------------------------------------------------

def _points(n: int) -> list[tuple[int, int, str]]:
    """(seed, virtual time of the migration in us, mode), drawn once from a
    fixed generator, so that the test ids stay put."""
    rng = random.Random(110)
    return [(rng.randrange(1, 10_000), rng.randrange(500, 7_000), rng.choice(list(MODES)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def sweep_reference():
    with booting() as boot:
        r = run_domain(*boot(make_config(SWEEP_GUEST, vcpus=2, name="mig", memory=SWEEP_MIB)),
                       LIMIT_NS)
    assert r.reason == "poweroff"
    return outcome(r.console.decode())


@pytest.mark.slow
@pytest.mark.parametrize("seed, at_us, mode", _points(20))
def test_a_postcopy_migration_at_any_point_ends_as_an_uninterrupted_run(
        sweep_reference, seed, at_us, mode):
    """The source on the seed's frames and schedule, the switch after its
    rounds or at once; the results are the uninterrupted run's."""
    m = migrate_here(MODES[mode], seed, at_us * 1000, guest=SWEEP_GUEST, mib=SWEEP_MIB)
    assert m["out"].ok, m["said"]
    assert outcome(m["console"]) == sweep_reference
