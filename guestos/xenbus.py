"""The xenstore client (Linux's drivers/xen/xenbus/xenbus_comms.c and
xenbus_xs.c, much reduced): requests go into the ``req`` half of the store
ring as XS wire messages, replies and watch events come back in ``rsp``.

The store answers inside the notify hypercall, so a request's reply is in the
ring when the hypercall returns; watch events may come before it (a write can
fire the writer's own watch) and are queued, in kernel data, for the store
port's event handler, which runs each watch's handler on cpu0, as Linux's
xenwatch thread does.

Everything lives in guest memory: the ring, the last request id, a reply
half read, the watches (callback's symbol number and path) and the queued
events. A watch is registered with ``register_xenbus_watch(cpu, path,
callback)``; the callback is an exported ``callback(cpu, path)``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from guestos.evtchn import bind_evtchn_to_irqhandler, notify_remote_via_evtchn, rebind_evtchn_irq
from guestos.kdata import AREAS
from guestos.layout import Layout, Ref
from guestos.mm import mfn_to_pfn, read_u32, va
from guestos.printk import printk
from guestos.symbols import NO_SYMBOL, export, symbol, symbol_number
from hypervisor.public.io.ring import ring_spans, ring_used
from hypervisor.public.io.xs_wire import (
    REQ_CONS_OFF,
    REQ_OFF,
    REQ_PROD_OFF,
    RSP_CONS_OFF,
    RSP_OFF,
    RSP_PROD_OFF,
    XENSTORE_RING_SIZE,
    XSD_ERRORS,
    XSD_SOCKMSG,
    XsType,
)
from hypervisor.public.native import NativeCpu
from hypervisor.public.xen import start_info

# the client's globals
XS = Layout("xenstore", [
    ("store_pfn", "u64"),      # the ring's page (start_info)
    ("store_port", "u64"),     #   its event channel
    ("store_irq", "u64"),      #   and the irq that is bound to
    ("req_id", "u64"),         # the last request id
    ("in_len", "u64"),         # bytes of a reply read from the ring, not yet whole
    ("suspended", "u64"),      # xs_suspend .. xs_resume: no requests
])
MAX_WATCHES = 8
WATCH_SIZE = 128               # u64 callback, path
MAX_XS_EVENTS = 8
XS_EVENT_SIZE = 256            # u64 length, the event's payload
XS_IN_SIZE = 16 + 4096         # one message: header and the largest payload
WATCHES_OFFSET = XS.size
XS_EVENTS_OFFSET = WATCHES_OFFSET + MAX_WATCHES * WATCH_SIZE
XS_IN_OFFSET = XS_EVENTS_OFFSET + MAX_XS_EVENTS * XS_EVENT_SIZE
assert XS_IN_OFFSET + XS_IN_SIZE <= AREAS["xenbus"].size


def xs(cpu: NativeCpu) -> Ref:
    return XS.at(cpu, AREAS["xenbus"].va(cpu))


WatchCallback = Callable[[NativeCpu, str], None]

HDR = XSD_SOCKMSG.size


class XenbusError(Exception):
    """A request failed: ``errno`` is the store's error name (ENOENT, EAGAIN...)."""

    def __init__(self, errno: str, what: str = "") -> None:
        super().__init__(f"{errno}{': ' + what if what else ''}")
        self.errno = errno


# --- the ring -----------------------------------------------------------------------

def _ring(cpu: NativeCpu) -> int:
    return va(xs(cpu).store_pfn)


def _put(cpu: NativeCpu, msg: bytes) -> None:
    ring = _ring(cpu)
    x = xs(cpu)
    sent = 0
    for _ in range(4):
        cons, prod = read_u32(cpu, ring + REQ_CONS_OFF), read_u32(cpu, ring + REQ_PROD_OFF)
        n = min(XENSTORE_RING_SIZE - ring_used(cons, prod), len(msg) - sent)
        for off, chunk in ring_spans(prod, n, XENSTORE_RING_SIZE):
            cpu.write(ring + REQ_OFF + off, msg[sent:sent + chunk])
            sent += chunk
        cpu.write(ring + REQ_PROD_OFF, struct.pack("<I", (prod + n) & 0xFFFFFFFF))
        notify_remote_via_evtchn(cpu, x.store_port)
        if sent == len(msg):
            return
    raise XenbusError("EIO", "the store does not take requests")


def _pull(cpu: NativeCpu) -> bytes | None:
    """One whole message from the reply ring, or None if there is none yet.
    Bytes are moved into a kernel buffer first, so a message longer than the
    ring arrives in parts."""
    x = xs(cpu)
    ring = _ring(cpu)
    buf = AREAS["xenbus"].va(cpu) + XS_IN_OFFSET
    while True:
        have = x.in_len
        if have >= HDR:
            n = XSD_SOCKMSG.unpack(cpu.read(buf, HDR))[3]
            if have >= HDR + n:
                msg = cpu.read(buf, HDR + n)
                rest = cpu.read(buf + HDR + n, have - HDR - n)
                cpu.write(buf, rest)
                x.in_len = len(rest)
                return msg
        cons, prod = read_u32(cpu, ring + RSP_CONS_OFF), read_u32(cpu, ring + RSP_PROD_OFF)
        avail = min(ring_used(cons, prod), XS_IN_SIZE - have)
        if avail == 0:
            return None
        data = b"".join(cpu.read(ring + RSP_OFF + off, chunk)
                        for off, chunk in ring_spans(cons, avail, XENSTORE_RING_SIZE))
        cpu.write(buf + have, data)
        x.in_len = have + avail
        cpu.write(ring + RSP_CONS_OFF, struct.pack("<I", (cons + avail) & 0xFFFFFFFF))
        notify_remote_via_evtchn(cpu, x.store_port)  # room: the store may have more


def xenstore_init(cpu: NativeCpu, si: start_info) -> None:
    """The store's ring and port, from start_info: at boot, and in a new
    domain (where the restorer wrote the new ones)."""
    x = xs(cpu)
    x.store_pfn = mfn_to_pfn(cpu, si.store_mfn)
    x.store_port = si.store_evtchn


def xs_init(cpu: NativeCpu) -> None:
    """At boot, on cpu0: the store's events run the watches on cpu0."""
    x = xs(cpu)
    x.store_irq = bind_evtchn_to_irqhandler(cpu, x.store_port, xenbus_interrupt)


def xb_init_comms(cpu: NativeCpu) -> None:
    """The ring in a new domain (Linux's xb_init_comms on resume): replies of
    the old store are of no use; skip them, and what was half read. The
    store's irq gets the new port."""
    x = xs(cpu)
    ring = _ring(cpu)
    cpu.write(ring + RSP_CONS_OFF, cpu.read(ring + RSP_PROD_OFF, 4))
    x.in_len = 0
    rebind_evtchn_irq(cpu, x.store_port, x.store_irq)


def _queue_event(cpu: NativeCpu, payload: bytes) -> None:
    base = AREAS["xenbus"].va(cpu) + XS_EVENTS_OFFSET
    for i in range(MAX_XS_EVENTS):
        slot = base + i * XS_EVENT_SIZE
        if cpu.read_u64(slot) == 0:
            payload = payload[:XS_EVENT_SIZE - 8]
            cpu.write_u64(slot, len(payload))
            cpu.write(slot + 8, payload)
            return
    printk(cpu, "xenbus: watch event queue full, event dropped")


def talk(cpu: NativeCpu, typ: int, payload: bytes, tx: int = 0) -> bytes:
    """Send one request, return its reply's payload; XenbusError on an error."""
    x = xs(cpu)
    req_id = (x.req_id + 1) & 0xFFFFFFFF
    x.req_id = req_id
    _put(cpu, XSD_SOCKMSG.pack(typ, req_id, tx, len(payload)) + payload)
    while True:
        msg = _pull(cpu)
        if msg is None:
            raise XenbusError("EIO", "the store did not answer")
        rtyp, rid, _tx, n = XSD_SOCKMSG.unpack(msg[:HDR])
        body = msg[HDR:HDR + n]
        if rtyp == XsType.XS_WATCH_EVENT:
            _queue_event(cpu, body)
            continue
        if rid != req_id:
            continue  # a stale reply (say, from before a reconnect)
        if rtyp == XsType.XS_ERROR:
            name = body.rstrip(b"\0").decode(errors="replace")
            raise XenbusError(name if name in XSD_ERRORS else "EINVAL")
        return body


# --- the operations -----------------------------------------------------------------

def _z(s: str) -> bytes:
    return s.encode() + b"\0"


def read(cpu: NativeCpu, path: str, tx: int = 0) -> str:
    return talk(cpu, XsType.XS_READ, _z(path), tx).decode(errors="replace")


def write(cpu: NativeCpu, path: str, value: str, tx: int = 0) -> None:
    talk(cpu, XsType.XS_WRITE, _z(path) + value.encode(), tx)


def mkdir(cpu: NativeCpu, path: str, tx: int = 0) -> None:
    talk(cpu, XsType.XS_MKDIR, _z(path), tx)


def rm(cpu: NativeCpu, path: str, tx: int = 0) -> None:
    talk(cpu, XsType.XS_RM, _z(path), tx)


def directory(cpu: NativeCpu, path: str, tx: int = 0) -> list[str]:
    body = talk(cpu, XsType.XS_DIRECTORY, _z(path), tx)
    return [n.decode() for n in body.split(b"\0") if n]


def transaction_start(cpu: NativeCpu) -> int:
    return int(talk(cpu, XsType.XS_TRANSACTION_START, b"\0").rstrip(b"\0"))


def transaction_end(cpu: NativeCpu, tx: int, abort: bool = False) -> None:
    talk(cpu, XsType.XS_TRANSACTION_END, b"F\0" if abort else b"T\0", tx)


# --- watches ------------------------------------------------------------------------

def _watch_slot(cpu: NativeCpu, i: int) -> int:
    return AREAS["xenbus"].va(cpu) + WATCHES_OFFSET + i * WATCH_SIZE


def _watch_path(cpu: NativeCpu, i: int) -> str:
    return cpu.read(_watch_slot(cpu, i) + 8, WATCH_SIZE - 8).split(b"\0")[0].decode()


def register_xenbus_watch(cpu: NativeCpu, path: str, callback: WatchCallback) -> int:
    """Watch ``path``: ``callback(cpu, path)`` runs on cpu0 on each event. The
    token sent to the store is the watch's slot number."""
    for i in range(MAX_WATCHES):
        slot = _watch_slot(cpu, i)
        if cpu.read_u64(slot) == NO_SYMBOL:
            cpu.write_u64(slot, symbol_number(callback))
            cpu.write(slot + 8, _z(path)[:WATCH_SIZE - 8])
            talk(cpu, XsType.XS_WATCH, _z(path) + _z(str(i)))
            return i
    raise XenbusError("ENOSPC", "no free watch slot")


def unregister_xenbus_watch(cpu: NativeCpu, i: int) -> None:
    talk(cpu, XsType.XS_UNWATCH, _z(_watch_path(cpu, i)) + _z(str(i)))
    cpu.write_u64(_watch_slot(cpu, i), NO_SYMBOL)


def reregister_watches(cpu: NativeCpu) -> int:
    """After a resume in a new domain the store knows none of them (xs_resume)."""
    n = 0
    for i in range(MAX_WATCHES):
        if cpu.read_u64(_watch_slot(cpu, i)) != NO_SYMBOL:
            talk(cpu, XsType.XS_WATCH, _z(_watch_path(cpu, i)) + _z(str(i)))
            n += 1
    return n


def process_events(cpu: NativeCpu) -> None:
    """The store port's handler (cpu0): take watch events from the ring and
    the queue and run their handlers, in order. Not between xs_suspend and
    xs_resume: the events wait in the ring."""
    if xs(cpu).suspended:
        return
    while True:
        msg = _pull(cpu)
        if msg is None:
            break
        rtyp, _rid, _tx, n = XSD_SOCKMSG.unpack(msg[:HDR])
        if rtyp == XsType.XS_WATCH_EVENT:
            _queue_event(cpu, msg[HDR:HDR + n])
    base = AREAS["xenbus"].va(cpu) + XS_EVENTS_OFFSET
    for _ in range(4 * MAX_XS_EVENTS):  # handlers may queue more
        n = cpu.read_u64(base)
        if n == 0:
            return
        payload = cpu.read(base + 8, n)
        # pop the head: the queue stays packed from slot 0, in arrival order
        rest = cpu.read(base + XS_EVENT_SIZE, (MAX_XS_EVENTS - 1) * XS_EVENT_SIZE)
        cpu.write(base, rest + bytes(XS_EVENT_SIZE))
        parts = payload.split(b"\0")
        path, token = parts[0].decode(errors="replace"), parts[1] if len(parts) > 1 else b""
        if not token.isdigit() or int(token) >= MAX_WATCHES:
            continue
        number = cpu.read_u64(_watch_slot(cpu, int(token)))
        if number != NO_SYMBOL:
            callback: WatchCallback = symbol(number)  # type: ignore[assignment]
            callback(cpu, path)


@export
def xenbus_interrupt(cpu: NativeCpu, irq: int, dev_id: int) -> None:
    process_events(cpu)
