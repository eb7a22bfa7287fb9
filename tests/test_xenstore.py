"""The toolstack's xenstore and console backends: the store's semantics
(xenstored's, for an unprivileged domain), the XS wire protocol over a real
guest's ring page, and the console ring."""

from __future__ import annotations

import pytest

from hypervisor import domctl
from hypervisor.public.errno import EEXIST
from hypervisor.public.io.console import OUT_CONS_OFF, OUT_OFF, OUT_PROD_OFF, XENCONS_OUT_SIZE
from hypervisor.public.io.xs_wire import (
    CONNECTION_OFF,
    REQ_OFF,
    REQ_PROD_OFF,
    RSP_CONS_OFF,
    RSP_OFF,
    RSP_PROD_OFF,
    XENSTORE_RING_SIZE,
    XSD_SOCKMSG,
    XsType,
    xenstore_domain_interface,
)
from hypervisor.public.xen import Hypercall
from hypervisor.toolstack.context import context_of, domain_of
from hypervisor.toolstack.session import run_domain
from hypervisor.toolstack.xenstored import Store, XsError, home
from tests.conftest import make_config


class FakeConn:
    """Collects watch events, for the store's own tests."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def watch_event(self, w, abs_path: str) -> None:
        self.events.append((abs_path, w.token))


def test_write_creates_parents_read_directory_mkdir_rm():
    st = Store()
    st.write("/local/domain/1/a/b/c", b"x")
    assert st.read("/local/domain/1/a/b") == b""
    assert st.read("/local/domain/1/a/b/c") == b"x"
    st.write("/local/domain/1/a/z", b"")
    assert st.directory("/local/domain/1/a") == ["b", "z"]
    st.mkdir("/local/domain/1/a/b")  # exists: fine, value kept
    assert st.read("/local/domain/1/a/b/c") == b"x"
    st.rm("/local/domain/1/a/b")
    assert st.directory("/local/domain/1/a") == ["z"]
    with pytest.raises(XsError, match="ENOENT"):
        st.read("/local/domain/1/a/b/c")
    st.rm("/local/domain/1/a/nothing")  # its parent exists: fine
    with pytest.raises(XsError, match="ENOENT"):
        st.rm("/local/domain/1/nothing/deeper")
    with pytest.raises(XsError, match="EINVAL"):
        st.rm("/")


def test_watches_fire_at_registration_on_changes_under_them_and_on_removal_above():
    st, c = Store(), FakeConn()
    st.write("/local/domain/1/control", b"")
    st.watch(c, "control/shutdown", "/local/domain/1/control/shutdown", "0")
    assert c.events == [("/local/domain/1/control/shutdown", "0")]  # at once
    st.write("/local/domain/1/control/shutdown", b"suspend")
    st.write("/local/domain/1/control/shutdown/deeper", b"")
    st.write("/local/domain/1/control/other", b"")  # not under the watch
    st.rm("/local/domain/1/control")  # an ancestor goes
    # the event names the node that changed; a removal above, the watched path
    assert [p for p, _ in c.events[1:]] == ["/local/domain/1/control/shutdown",
                                            "/local/domain/1/control/shutdown/deeper",
                                            "/local/domain/1/control/shutdown"]
    with pytest.raises(XsError, match="EEXIST"):
        st.watch(c, "control/shutdown", "/local/domain/1/control/shutdown", "0")
    st.unwatch(c, "control/shutdown", "0")
    with pytest.raises(XsError, match="ENOENT"):
        st.unwatch(c, "control/shutdown", "0")


def test_a_transaction_sees_its_own_writes_commits_them_or_fails_with_eagain():
    st, c = Store(), FakeConn()
    st.watch(c, "/local/domain/1", "/local/domain/1", "t")
    c.events.clear()
    tid = st.transaction_start(c)
    tx = st.transaction(c, tid)
    st.write("/local/domain/1/x", b"1", tx)
    assert st.read("/local/domain/1/x", tx.nodes) == b"1"
    with pytest.raises(XsError):
        st.read("/local/domain/1/x")  # not visible outside before the commit
    assert c.events == []
    st.transaction_end(tx, tid, commit=True)
    assert st.read("/local/domain/1/x") == b"1"
    assert c.events == [("/local/domain/1/x", "t")]  # watches fire at the commit
    # a conflicting change in between: EAGAIN, nothing applied
    tid = st.transaction_start(c)
    tx = st.transaction(c, tid)
    st.write("/local/domain/1/x", b"2", tx)
    st.write("/local/domain/1/y", b"other")
    with pytest.raises(XsError, match="EAGAIN"):
        st.transaction_end(tx, tid, commit=True)
    assert st.read("/local/domain/1/x") == b"1"
    # an abort discards
    tid = st.transaction_start(c)
    tx = st.transaction(c, tid)
    st.write("/local/domain/1/x", b"3", tx)
    st.transaction_end(tx, tid, commit=False)
    assert st.read("/local/domain/1/x") == b"1"


# --- the wire protocol, on a real guest's ring --------------------------------------

@pytest.fixture
def guest(booted):
    """A booted guest whose kernel has connected to the store; the test then
    plays the guest's part on the ring page itself."""
    hv, dom = booted(make_config("run=spawner:1:1:50"))
    run_domain(hv, dom, until_ns=1_000_000)
    return hv, dom


class Ring:
    def __init__(self, hv, dom) -> None:
        self.conn = domain_of(hv, dom).xenstore
        self.mem = hv.machine.memory
        self.base = self.conn.ring
        self.req_id = 100

    def u32(self, off: int) -> int:
        return int.from_bytes(self.mem.read(self.base + off, 4), "little")

    def put(self, data: bytes) -> None:
        prod = self.u32(REQ_PROD_OFF)
        for i, b in enumerate(data):
            self.mem.write(self.base + REQ_OFF + (prod + i) % XENSTORE_RING_SIZE, bytes([b]))
        new_prod = (prod + len(data)) & 0xFFFFFFFF
        self.mem.write(self.base + REQ_PROD_OFF, new_prod.to_bytes(4, "little"))

    def take(self) -> list[tuple[int, int, int, bytes]]:
        cons, prod = self.u32(RSP_CONS_OFF), self.u32(RSP_PROD_OFF)
        data = bytes(self.mem.read(self.base + RSP_OFF + (cons + i) % XENSTORE_RING_SIZE, 1)[0]
                     for i in range((prod - cons) & 0xFFFFFFFF))
        self.mem.write(self.base + RSP_CONS_OFF, prod.to_bytes(4, "little"))
        out = []
        while data:
            typ, rid, tx, n = XSD_SOCKMSG.unpack(data[:16])
            out.append((typ, rid, tx, data[16:16 + n]))
            data = data[16 + n:]
        return out

    def ask(self, typ: int, payload: bytes, tx: int = 0) -> list[tuple[int, int, int, bytes]]:
        self.req_id += 1
        self.put(XSD_SOCKMSG.pack(typ, self.req_id, tx, len(payload)) + payload)
        self.conn.notify()
        return self.take()


def test_requests_over_the_ring_get_their_replies_and_errors(guest):
    hv, dom = guest
    ring = Ring(hv, dom)
    ring.take()  # whatever the kernel left
    (r,) = ring.ask(XsType.XS_WRITE, b"data/k\0v1")
    assert r == (XsType.XS_WRITE, ring.req_id, 0, b"OK\0")
    (r,) = ring.ask(XsType.XS_READ, b"data/k\0")
    assert r[0] == XsType.XS_READ and r[3] == b"v1"
    (r,) = ring.ask(XsType.XS_READ, b"data/none\0")
    assert r[0] == XsType.XS_ERROR and r[3] == b"ENOENT\0"
    (r,) = ring.ask(XsType.XS_READ, b"/local/domain/0/name\0")  # not its home
    assert r[3] == b"EACCES\0"
    (r,) = ring.ask(XsType.XS_READ, b"bad//path\0")
    assert r[3] == b"EINVAL\0"
    (r,) = ring.ask(XsType.XS_DIRECTORY, b"data\0")
    assert r[3] == b"k\0"
    (r,) = ring.ask(XsType.XS_GET_DOMAIN_PATH, b"%d\0" % dom.domid)
    assert r[3] == home(dom.domid).encode() + b"\0"
    (r,) = ring.ask(XsType.XS_INTRODUCE, b"")
    assert r[3] == b"ENOSYS\0"
    # ending a transaction: the argument is checked first, then that there is one
    (r,) = ring.ask(XsType.XS_TRANSACTION_END, b"X\0")
    assert r[3] == b"EINVAL\0"
    (r,) = ring.ask(XsType.XS_TRANSACTION_END, b"T\0")
    assert r[3] == b"ENOENT\0"
    # a transaction: its id, its replies carry it, the commit
    (r,) = ring.ask(XsType.XS_TRANSACTION_START, b"\0")
    tid = int(r[3].rstrip(b"\0"))
    (r,) = ring.ask(XsType.XS_WRITE, b"data/t\0in-tx", tx=tid)
    assert r[2] == tid and r[3] == b"OK\0"
    assert "data/t" not in str(context_of(hv).store.directory(home(dom.domid) + "/data"))
    (r,) = ring.ask(XsType.XS_TRANSACTION_END, b"T\0", tx=tid)
    assert r[3] == b"OK\0"
    assert context_of(hv).store.read(home(dom.domid) + "/data/t") == b"in-tx"


def test_a_watch_event_comes_before_the_reply_of_the_write_that_fired_it(guest):
    hv, dom = guest
    ring = Ring(hv, dom)
    ring.take()
    first = ring.ask(XsType.XS_WATCH, b"data\0tok\0")
    assert [m[0] for m in first] == [XsType.XS_WATCH_EVENT, XsType.XS_WATCH]  # fires at once
    msgs = ring.ask(XsType.XS_WRITE, b"data/y\0")
    assert [m[0] for m in msgs] == [XsType.XS_WATCH_EVENT, XsType.XS_WRITE]
    assert msgs[0][3] == b"data/y\0tok\0"  # relative, as the watch was


def test_an_oversized_message_breaks_the_connection_with_a_protocol_error(guest):
    hv, dom = guest
    ring = Ring(hv, dom)
    ring.take()
    ring.put(XSD_SOCKMSG.pack(XsType.XS_READ, 1, 0, 5000))
    domain_of(hv, dom).xenstore.notify()
    err = xenstore_domain_interface.error.offset
    assert ring.u32(err) == 3  # XENSTORE_ERROR_PROTO
    assert domain_of(hv, dom).xenstore.broken


def test_a_reconnect_request_resets_the_ring(guest):
    hv, dom = guest
    ring = Ring(hv, dom)
    ring.take()
    ring.put(b"half a message")
    hv.machine.memory.write(ring.base + CONNECTION_OFF, (1).to_bytes(4, "little"))  # RECONNECT
    domain_of(hv, dom).xenstore.notify()
    assert ring.u32(CONNECTION_OFF) == 0
    assert [ring.u32(off) for off in (REQ_PROD_OFF, RSP_CONS_OFF, RSP_PROD_OFF)] == [0, 0, 0]
    (r,) = ring.ask(XsType.XS_READ, b"name\0")
    assert r[3] == dom.name.encode()


# --- the console ring ---------------------------------------------------------------

def test_the_kernel_prints_through_the_ring_not_console_io(booted):
    hv, dom = booted(make_config("run=counter:500:1000,hello", vcpus=2))
    calls = []
    hv.after_hypercall = lambda v, nr, args, rc: calls.append(nr)
    r = run_domain(hv, dom)
    assert r.reason == "poweroff"
    assert Hypercall.console_io not in calls
    assert len(r.console) > 2 * XENCONS_OUT_SIZE  # the ring wrapped
    assert b"hello from user space" in r.console


def test_the_console_backend_takes_what_wraps_around_the_ring(booted):
    hv, dom = booted(make_config("run=hello"))
    be = domain_of(hv, dom).console
    mem = hv.machine.memory
    start = 0xFFFFFFFF - 9  # indices run free and wrap at 2**32
    for off in (OUT_CONS_OFF, OUT_PROD_OFF):
        mem.write(be.ring + off, start.to_bytes(4, "little"))
    data = b"0123456789abcdefghij"
    for i, b in enumerate(data):
        mem.write(be.ring + OUT_OFF + (start + i) % XENCONS_OUT_SIZE, bytes([b]))
    mem.write(be.ring + OUT_PROD_OFF, ((start + len(data)) & 0xFFFFFFFF).to_bytes(4, "little"))
    before = len(dom.console_out)
    be.notify()
    assert bytes(dom.console_out[before:]) == data


# --- the toolstack keeps its own state -----------------------------------------------

def test_a_booted_domain_and_its_machine_carry_none_of_the_toolstacks_state(booted):
    hv, dom = booted(make_config("run=hello"))
    run_domain(hv, dom, until_ns=500_000)
    tdom = domain_of(hv, dom)
    assert tdom.xenstore is not None and tdom.console is not None and tdom.image is not None
    assert tdom.p2m_size == 16 << 8 and len(tdom.p2m_frames) == 8  # 16 MiB, 512 a frame
    assert context_of(hv).store is tdom.xenstore.store
    state = {"xenstore", "store", "console_backend", "console_sink", "image", "p2m_frames",
             "p2m_size"}
    assert sorted(state & set(vars(dom))) == []
    assert sorted(state & set(vars(hv))) == []


def test_destroying_a_domain_releases_its_xenstore_connection(booted):
    """The hypervisor tells the toolstack through its VIRQ_DOM_EXC binding;
    the toolstack releases the domain's connection itself: its watches and
    home are gone, and so is its record."""
    hv, dom = booted(make_config("run=spawner:1:1:50"))
    run_domain(hv, dom, until_ns=1_000_000)
    ctx = context_of(hv)
    conn = domain_of(hv, dom).xenstore
    assert [w.path for w in ctx.store.watches if w.conn is conn] == ["control/shutdown"]
    assert home(dom.domid) in ctx.store.nodes
    domctl.destroydomain(hv, dom)
    assert [w for w in ctx.store.watches if w.conn is conn] == []
    assert [p for p in ctx.store.nodes if p.startswith(home(dom.domid))] == []
    assert dom.domid not in ctx.domains


def test_the_hypervisor_calls_what_the_toolstack_bound_to_its_global_virqs(booted):
    hv = booted.bare(32)
    gone: list[int] = []
    said: list[tuple[int, bytes]] = []
    domctl.bind_virq_dom_exc(hv, gone.append)
    domctl.bind_virq_con_ring(hv, lambda d, data: said.append((d.domid, data)))
    with pytest.raises(domctl.DomctlError) as e:
        domctl.bind_virq_dom_exc(hv, gone.append)
    assert e.value.errno == EEXIST
    dom = domctl.createdomain(hv, "d", 1, 16)
    domctl.console_write(dom, b"from the ring\n")
    assert said == [(dom.domid, b"from the ring\n")]
    assert bytes(dom.console_out) == b"from the ring\n"
    domctl.destroydomain(hv, dom)
    assert gone == [dom.domid]
