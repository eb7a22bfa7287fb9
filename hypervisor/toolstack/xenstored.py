"""A small xenstore: the tree, watches and transactions, served to each guest
over its store ring (the xenstore_domain_interface page, XS wire protocol).

It does what xenstored does for an unprivileged domain (tools/xenstore/):

* the tree holds nodes by absolute path, each with a value; writing a node
  creates its missing parents; paths without a leading '/' are relative to the
  domain's home, /local/domain/<domid>;
* a domain may touch only its home subtree (EACCES elsewhere: the default
  permissions of everything else are "no access" to it);
* a watch fires for a change at its path or under it (and for the removal of
  an ancestor), once at registration, and reports a relative path if it was
  registered with one;
* a transaction works on its own copy of the tree; committing it fails with
  EAGAIN when the store changed since it started, as the first xenstored did
  (coarse, but always correct); its watches fire at commit.

Requests are served as soon as the guest notifies the store's event channel,
inside that hypercall: replies are in the ring when the guest looks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.io.ring import ring_spans, ring_used
from hypervisor.public.io.xs_wire import (
    CONNECTION_OFF,
    REQ_CONS_OFF,
    REQ_OFF,
    REQ_PROD_OFF,
    RSP_CONS_OFF,
    RSP_OFF,
    RSP_PROD_OFF,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RING_SIZE,
    XSD_SOCKMSG,
    XsType,
    xenstore_domain_interface,
)
from hypervisor.public.xen import PAGE_SHIFT

log = logging.getLogger(__name__)

_VALID = re.compile(r"^[A-Za-z0-9\-/_@]+$")
ERROR_OFF = xenstore_domain_interface.error.offset
XENSTORE_ERROR_PROTO = 3


class XsError(Exception):
    """A request fails with this error name (EINVAL, ENOENT, ...)."""


def home(domid: int) -> str:
    return f"/local/domain/{domid}"


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


@dataclass
class Watch:
    conn: XenstoreConnection
    path: str      # as registered (relative or absolute)
    abs_path: str
    token: str


@dataclass
class Transaction:
    conn: XenstoreConnection
    nodes: dict[str, bytes]
    generation: int
    changed: list[str] = field(default_factory=list)


class Store:
    """The tree and its watches; connections are the guests on their rings."""

    def __init__(self) -> None:
        self.nodes: dict[str, bytes] = {"/": b"", "/local": b"", "/local/domain": b""}
        self.generation = 0
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.next_tx = 1

    # --- the tree, for the toolstack and for requests --------------------------------

    def read(self, path: str, nodes: dict[str, bytes] | None = None) -> bytes:
        nodes = self.nodes if nodes is None else nodes
        if path not in nodes:
            raise XsError("ENOENT")
        return nodes[path]

    def directory(self, path: str, nodes: dict[str, bytes] | None = None) -> list[str]:
        nodes = self.nodes if nodes is None else nodes
        if path not in nodes:
            raise XsError("ENOENT")
        prefix = path.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in nodes
                      if p.startswith(prefix) and "/" not in p[len(prefix):] and p != prefix)

    def write(self, path: str, value: bytes, tx: Transaction | None = None) -> None:
        nodes = self.nodes if tx is None else tx.nodes
        parent = _parent(path)
        missing = []
        while parent not in nodes:
            missing.append(parent)
            parent = _parent(parent)
        for p in missing:
            nodes[p] = b""
        nodes[path] = value
        self._changed(path, tx)

    def mkdir(self, path: str, tx: Transaction | None = None) -> None:
        nodes = self.nodes if tx is None else tx.nodes
        if path not in nodes:
            self.write(path, b"", tx)

    def rm(self, path: str, tx: Transaction | None = None) -> None:
        nodes = self.nodes if tx is None else tx.nodes
        if path == "/":
            raise XsError("EINVAL")
        if path not in nodes:
            if _parent(path) in nodes:
                return  # removing what is not there is fine if its parent is
            raise XsError("ENOENT")
        for p in [p for p in nodes if _under(p, path)]:
            del nodes[p]
        self._changed(path, tx, removed=True)

    def _changed(self, path: str, tx: Transaction | None, removed: bool = False) -> None:
        if tx is not None:
            tx.changed.append(path)
            return
        self.generation += 1
        self.fire(path, removed)

    # --- watches ----------------------------------------------------------------------

    def fire(self, path: str, removed: bool = False) -> None:
        for w in list(self.watches):
            if _under(path, w.abs_path):
                w.conn.watch_event(w, path)
            elif removed and _under(w.abs_path, path):
                w.conn.watch_event(w, w.abs_path)

    def watch(self, conn: XenstoreConnection, path: str, abs_path: str, token: str) -> None:
        if any(w.conn is conn and w.path == path and w.token == token for w in self.watches):
            raise XsError("EEXIST")
        w = Watch(conn, path, abs_path, token)
        self.watches.append(w)
        conn.watch_event(w, abs_path)  # a new watch fires once at once

    def unwatch(self, conn: XenstoreConnection, path: str, token: str) -> None:
        for w in self.watches:
            if w.conn is conn and w.path == path and w.token == token:
                self.watches.remove(w)
                return
        raise XsError("ENOENT")

    # --- transactions -----------------------------------------------------------------

    def transaction_start(self, conn: XenstoreConnection) -> int:
        tid = self.next_tx
        self.next_tx += 1
        self.transactions[tid] = Transaction(conn, dict(self.nodes), self.generation)
        return tid

    def transaction(self, conn: XenstoreConnection, tid: int) -> Transaction | None:
        if tid == 0:
            return None
        tx = self.transactions.get(tid)
        if tx is None or tx.conn is not conn:
            raise XsError("ENOENT")
        return tx

    def transaction_end(self, tx: Transaction, tid: int, commit: bool) -> None:
        del self.transactions[tid]
        if not commit:
            return
        if tx.generation != self.generation:
            raise XsError("EAGAIN")
        self.nodes = tx.nodes
        self.generation += 1
        for path in tx.changed:
            self.fire(path, removed=path not in self.nodes)

    # --- domains ----------------------------------------------------------------------

    def introduce_domain(self, hv: Hypervisor, dom: Domain, ring_mfn: int,
                         port: int) -> XenstoreConnection:
        """XS_INTRODUCE (libxl's xs_introduce_domain): connect a new domain: map
        its ring, bind its port, give it its home."""
        self.write(home(dom.domid), b"")
        self.write(home(dom.domid) + "/name", dom.name.encode())
        self.write(home(dom.domid) + "/domid", str(dom.domid).encode())

        def written() -> None:  # log-dirty must see the backend's writes
            domctl.modified_memory(hv, dom, int(domctl.map_m2p(hv)[ring_mfn]), 1)

        conn = XenstoreConnection(self, dom, ring_mfn, domctl.map_foreign_range(hv, dom, ring_mfn),
                                  port, written)
        domctl.evtchn_bind_backend(dom, port, conn.notify)
        return conn

    def release(self, conn: XenstoreConnection) -> None:
        """The domain is gone (XS_RELEASE): its watches, transactions and home."""
        self.watches = [w for w in self.watches if w.conn is not conn]
        self.transactions = {t: x for t, x in self.transactions.items() if x.conn is not conn}
        if home(conn.domid) in self.nodes:
            self.rm(home(conn.domid))


class XenstoreConnection:
    """One guest's ring: requests in, replies and watch events out."""

    def __init__(self, store: Store, dom: Domain, ring_mfn: int, page: np.ndarray,
                 port: int, written: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.dom = dom
        self.domid = dom.domid
        self.ring = ring_mfn << PAGE_SHIFT  # the ring's machine address
        self.page = page  # the guest's xenstore_domain_interface page, mapped
        self.written = written  # called after each write to the page
        self.port = port
        self.out = bytearray()  # replies and events not yet in the ring
        self.broken = False

    # --- the ring ---------------------------------------------------------------------

    def _read(self, off: int, n: int) -> bytes:
        return self.page[off:off + n].tobytes()

    def _write(self, off: int, data: bytes) -> None:
        self.page[off:off + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.written()

    def _u32(self, off: int) -> int:
        return int.from_bytes(self._read(off, 4), "little")

    def _set_u32(self, off: int, v: int) -> None:
        self._write(off, (v & 0xFFFFFFFF).to_bytes(4, "little"))

    def _ring_read(self, base: int, idx: int, n: int) -> bytes:
        return b"".join(self._read(base + off, chunk)
                        for off, chunk in ring_spans(idx, n, XENSTORE_RING_SIZE))

    def _ring_write(self, base: int, idx: int, data: bytes) -> None:
        for off, chunk in ring_spans(idx, len(data), XENSTORE_RING_SIZE):
            self._write(base + off, data[:chunk])
            data = data[chunk:]

    def notify(self) -> None:
        """The guest kicked the store's port: serve what it asked, send what is due."""
        if self.broken:
            return
        if self._u32(CONNECTION_OFF) != 0:
            # the guest asks to reconnect (XENSTORE_RECONNECT): every index
            # back to 0, whatever was in flight dropped, connected again
            for off in (REQ_CONS_OFF, REQ_PROD_OFF, RSP_CONS_OFF, RSP_PROD_OFF):
                self._set_u32(off, 0)
            self.out.clear()
            self._set_u32(CONNECTION_OFF, 0)
            domctl.evtchn_notify(self.dom, self.port)
            return
        cons, prod = self._u32(REQ_CONS_OFF), self._u32(REQ_PROD_OFF)
        while ring_used(cons, prod) >= XSD_SOCKMSG.size:
            if ring_used(cons, prod) > XENSTORE_RING_SIZE:
                self._protocol_error("request ring indices out of range")
                return
            typ, req_id, tx_id, n = XSD_SOCKMSG.unpack(
                self._ring_read(REQ_OFF, cons, XSD_SOCKMSG.size))
            if n > XENSTORE_PAYLOAD_MAX:
                self._protocol_error(f"a payload of {n} bytes")
                return
            if ring_used(cons, prod) < XSD_SOCKMSG.size + n:
                break  # the rest of this message is not written yet
            payload = self._ring_read(REQ_OFF, cons + XSD_SOCKMSG.size, n)
            cons = (cons + XSD_SOCKMSG.size + n) & 0xFFFFFFFF
            self._set_u32(REQ_CONS_OFF, cons)
            self._reply(typ, req_id, tx_id, payload)
        self.flush()

    def flush(self) -> None:
        """Move queued messages into the reply ring as far as there is room."""
        cons, prod = self._u32(RSP_CONS_OFF), self._u32(RSP_PROD_OFF)
        room = XENSTORE_RING_SIZE - ring_used(cons, prod)
        if room <= 0 or not self.out:
            return
        data = bytes(self.out[:room])
        del self.out[:len(data)]
        self._ring_write(RSP_OFF, prod, data)
        self._set_u32(RSP_PROD_OFF, prod + len(data))
        domctl.evtchn_notify(self.dom, self.port)

    def _protocol_error(self, what: str) -> None:
        log.warning("domain %d: xenstore ring protocol error: %s; connection closed",
                    self.domid, what)
        self._set_u32(ERROR_OFF, XENSTORE_ERROR_PROTO)
        self.broken = True

    def _send(self, typ: int, req_id: int, tx_id: int, payload: bytes) -> None:
        self.out += XSD_SOCKMSG.pack(typ, req_id, tx_id, len(payload)) + payload

    def watch_event(self, w: Watch, abs_path: str) -> None:
        path = abs_path
        if not w.path.startswith("/"):
            path = abs_path[len(home(self.domid)) + 1:]
        self._send(XsType.XS_WATCH_EVENT, 0, 0, path.encode() + b"\0" + w.token.encode() + b"\0")
        if not self.broken:
            self.flush()

    # --- requests ---------------------------------------------------------------------

    def _path(self, raw: bytes) -> str:
        s = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        path = s if s.startswith("/") else home(self.domid) + "/" + s
        if (not _VALID.match(s) or "//" in path or (path.endswith("/") and path != "/")
                or len(path) > XENSTORE_ABS_PATH_MAX):
            raise XsError("EINVAL")
        if not _under(path, home(self.domid)):
            raise XsError("EACCES")
        return path

    def _reply(self, typ: int, req_id: int, tx_id: int, payload: bytes) -> None:
        try:
            rtyp, body = self._serve(typ, tx_id, payload)
        except XsError as e:
            rtyp, body = XsType.XS_ERROR, str(e).encode() + b"\0"
        self._send(rtyp, req_id, tx_id, body)

    def _serve(self, typ: int, tx_id: int, payload: bytes) -> tuple[int, bytes]:
        st = self.store
        ok = (typ, b"OK\0")
        if typ == XsType.XS_TRANSACTION_START:
            if tx_id:
                raise XsError("EBUSY")
            return typ, str(st.transaction_start(self)).encode() + b"\0"
        if typ == XsType.XS_TRANSACTION_END:
            commit = payload.rstrip(b"\0")
            if commit not in (b"T", b"F"):
                raise XsError("EINVAL")
            tx = st.transaction(self, tx_id)
            if tx is None:
                raise XsError("ENOENT")  # xenstored: no transaction on this request
            st.transaction_end(tx, tx_id, commit == b"T")
            return ok
        if typ == XsType.XS_WATCH or typ == XsType.XS_UNWATCH:
            parts = payload.split(b"\0")
            if len(parts) < 2:
                raise XsError("EINVAL")
            raw_path, token = parts[0], parts[1].decode("ascii", "replace")
            abs_path = self._path(raw_path) if not raw_path.startswith(b"@") else raw_path.decode()
            path = raw_path.decode("ascii", "replace")
            if typ == XsType.XS_WATCH:
                st.watch(self, path, abs_path, token)
            else:
                st.unwatch(self, path, token)
            return ok
        if typ == XsType.XS_RESET_WATCHES:
            st.watches = [w for w in st.watches if w.conn is not self]
            return ok
        if typ == XsType.XS_GET_DOMAIN_PATH:
            domid = payload.split(b"\0", 1)[0]
            if not domid.isdigit():
                raise XsError("EINVAL")
            return typ, home(int(domid)).encode() + b"\0"
        tx = st.transaction(self, tx_id)
        nodes = None if tx is None else tx.nodes
        if typ == XsType.XS_READ:
            return typ, st.read(self._path(payload), nodes)
        if typ == XsType.XS_DIRECTORY:
            names = st.directory(self._path(payload), nodes)
            return typ, b"".join(n.encode() + b"\0" for n in names)
        if typ == XsType.XS_WRITE:
            if b"\0" not in payload:
                raise XsError("EINVAL")
            raw_path, value = payload.split(b"\0", 1)
            st.write(self._path(raw_path), value, tx)
            return ok
        if typ == XsType.XS_MKDIR:
            st.mkdir(self._path(payload), tx)
            return ok
        if typ == XsType.XS_RM:
            st.rm(self._path(payload), tx)
            return ok
        raise XsError("ENOSYS")
