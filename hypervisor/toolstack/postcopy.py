"""Post-copy live migration: the guest runs at the destination before its
memory has all arrived (Joshua Otto's Xen RFC, whose stream this is; QEMU's
postcopy-ram; Hines & Gopalan's demand paging with active push).

The stream, after the pre-copy rounds (none in a pure post-copy) and the
guest's suspend at the source, as Otto's xc_sr_save.c writes it:

    PAGE_DATA            what the destination reads before the guest can run:
                         the pagetables, the p2m list's frames, start_info and
                         the two rings, if dirty or never sent
    POSTCOPY_BEGIN       then at once the CPU context records: TSC_INFO,
                         SHARED_INFO, X86_PV_VCPU_BASIC per VCPU
    POSTCOPY_PFNS_BEGIN
    POSTCOPY_PFNS*       every other pfn not sent or dirty since it was sent,
                         with its type
    POSTCOPY_TRANSITION  libxl's records (the xenstore nodes, the devices),
                         then libxl's POSTCOPY_TRANSITION_END: the domain
                         starts at the destination
    POSTCOPY_PAGE_DATA*  the pages, 64 a record; the destination answers with
                         POSTCOPY_FAULT records (pfns it needs now) and, once
                         every page is in, POSTCOPY_COMPLETE
    END, libxl's END

The source (``switch_to_postcopy``, ``push``) sends each page once: a pfn is
sent from ``PostcopySource.pending`` and cleared there, so a fault for a page
already on its way is not answered twice. Between batches it reads the faults
that came, sends those pages first and goes on scanning from the last one's
pfn + 1 (Otto's locality; Hines & Gopalan's pre-paging).

The destination (``Incoming``, ``Pager``) builds the domain as a lazy restore
does: every POSTCOPY_PFNS pfn with data gets its frame, marked absent
(hypervisor/mm/absent.py). The pager's fetch asks for the pfns of the absent
frames touched (one POSTCOPY_FAULT, never for a pfn already asked) and reads
records until they are in, loading every page that arrives meanwhile; between
slices it loads what has arrived without waiting. The per-pfn states are
Otto's: outstanding, requested, ready.

A connection that drops after the transition leaves a guest in two halves:
its memory partly at the source, its state at the destination. Both sides
pause (QEMU's postcopy-paused): the destination pauses its domain and keeps
it; the source keeps its copy suspended, renamed NAME--postcopy-inconsistent,
and never resumes it. Recovery is a new connection and a handshake on it
(QEMU's postcopy recovery, ``loadvm_postcopy_handle_resume`` and
``ram_dirty_bitmap_reload``, in pvlab's two records):

    POSTCOPY_RESUME      source -> destination: the domain's name
    POSTCOPY_RECV_BITMAP destination -> source: a bit per pfn, the pages it
                         still lacks; the source sends again those it had
                         sent (lost in flight: ``resume_source``), the
                         destination asks again for those it had asked for
                         (``Pager.replace_link``), and the push goes on.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.sched import SHUTDOWN_poweroff, SHUTDOWN_reboot
from hypervisor.public.xen import PAGE_SIZE, start_info
from hypervisor.toolstack import balloonctl, libxl, pfinfo, savefile, stream
from hypervisor.toolstack.image import ImageError
from hypervisor.toolstack.precopy import MigrationInfo
from hypervisor.toolstack.restore import RestoreError, populate
from hypervisor.toolstack.save import (
    LiveSave,
    SaveError,
    check_vm_state,
    clean_dirty_bitmap,
    devices_state,
    disable_logdirty,
    end_of_checkpoint,
    live_context,
    page_types,
    send_dirty_pages,
    vcpu_records,
    write_emulator_records,
    write_page_data,
)
from hypervisor.toolstack.savefile import LibxlRecType
from hypervisor.toolstack.stream import PostcopyType, RecType, StreamError

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20  # octets a link reads at a time
# a page the destination waits for that does not come in this long: the
# link is taken as dropped (a peer gone without a word leaves a TCP
# connection half open, and a pager on the daemon's loop must not wait on it
# for ever: the domain pauses, recoverable, and the loop goes on)
PAGE_WAIT_S = 30.0
# pfns a drain asks for at a time, the next piece asked once the one before
# is in: more faults unread would fill the socket while the source is blocked
# writing its pages, and the two would wait on each other's writes
DRAIN_ASK_PFNS = 512
REFUSED_DRAIN_S = 2.0  # a refusing destination reads on until the source hangs up, or this long
# a pfn's state at the destination (Otto's xc_sr_restore.c)
NOT_POSTCOPY, OUTSTANDING, REQUESTED, READY = 0, 1, 2, 3


class Dropped(ConnectionError):
    """The post-copy's connection ended or failed."""


def dropped(doing: str, e: Exception) -> Dropped:
    """An OSError or a closed file met while ``doing`` (reading, writing), as Dropped."""
    return Dropped(f"{doing}: {getattr(e, 'strerror', None) or e}")


class Refused(Exception):
    """The destination refused post-copy at POSTCOPY_BEGIN (POSTCOPY_REFUSED):
    its guest never ran there; the message is its reason."""


class PostcopyPaused(RestoreError):
    """The connection dropped while the destination's guest needed a page:
    its domain is paused and kept, its missing pages still at the source."""


# --- the link: records both ways, read without waiting when asked ---------------------

class Link:
    """One connection as post-copy uses it: records read whole, waiting or
    not (the reader's descriptor is polled; what its buffer holds is taken
    first), records and octets written and flushed. Any failure is Dropped."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO) -> None:
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.offset = 0  # octets taken off the buffer so far

    def _more(self, block: bool, timeout_s: float | None = None) -> bool:
        """Octets from the reader into the buffer: False if none without
        waiting; Dropped at the end of the stream, or when ``timeout_s``
        passes with nothing (a peer gone without a word: a half-open link)."""
        fd = self.reader.fileno()
        try:
            os.set_blocking(fd, False)
            try:
                data = self.reader.read1(READ_CHUNK)  # type: ignore[attr-defined]
            finally:
                os.set_blocking(fd, True)
            if not data:
                if not select.select([fd], [], [], timeout_s if block else 0)[0]:
                    if not block:
                        return False  # nothing buffered, nothing on the wire yet
                    raise Dropped(f"nothing from the peer in {timeout_s:g} s")
                data = self.reader.read1(READ_CHUNK)  # type: ignore[attr-defined]
        except (OSError, ValueError) as e:
            raise dropped("reading", e) from None
        if not data:
            raise Dropped("the connection ended")
        self.buf += data
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.offset += n
        return data

    def read_record(self, block: bool, timeout_s: float | None = None) -> stream.Record | None:
        """The next record, or None if it has not all come and ``block`` is
        False; waiting, Dropped if nothing comes for ``timeout_s``."""
        while True:
            if len(self.buf) >= stream.RHDR.size:
                rtype, length = stream.RHDR.unpack_from(self.buf)
                if length > stream.REC_LENGTH_MAX:
                    raise StreamError(f"offset {self.offset}: {stream.rec_name(rtype)} "
                                      f"claims {length} octets")
                whole = stream.RHDR.size + length + (-length % stream.REC_ALIGN)
                if len(self.buf) >= whole:
                    offset = self.offset
                    body = self._take(whole)[stream.RHDR.size:stream.RHDR.size + length]
                    return stream.Record(rtype, body, offset, length)
            if not self._more(block, timeout_s):
                return None

    def read_exactly(self, n: int) -> bytes:
        """``n`` octets (xl's messages after the stream), waiting for them."""
        while len(self.buf) < n:
            self._more(True)
        return self._take(n)

    @contextmanager
    def writing(self) -> Iterator[BinaryIO]:
        """The writer, flushed after; any failure of either is Dropped."""
        try:
            yield self.writer
            self.writer.flush()
        except Dropped:
            raise
        except (OSError, ValueError) as e:
            raise dropped("writing", e) from None

    def write(self, data: bytes) -> None:
        with self.writing() as w:
            w.write(data)

    def write_record(self, rtype: int, body: bytes = b"") -> None:
        with self.writing() as w:
            stream.write_record(w, rtype, body)

    def cut(self) -> None:
        """The connection shut down both ways, as a network that fails: the
        peer's reads end and its writes fail, whoever else holds the
        descriptor (a pipe is only left as it is)."""
        for f in (self.reader, self.writer):
            try:
                fd = os.dup(f.fileno())
            except (OSError, ValueError):
                continue  # closed already
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)  # a pipe
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not a socket, or not connected any more
            finally:
                s.close()
            return

    def close(self) -> None:
        """Both directions closed (a writer that cannot flush any more too)."""
        for f in (self.writer, self.reader):
            try:
                f.close()
            except (OSError, ValueError):
                pass


def pfn_record(pfns: np.ndarray) -> bytes:
    """A POSTCOPY_FAULT's body: the count, then the pfns without type bits."""
    return stream.PAGE_DATA_HDR.pack(pfns.size) + pfns.astype(np.uint64).tobytes()


def read_pfn_record(rec: stream.Record, nr_pfns: int) -> np.ndarray:
    """A POSTCOPY_FAULT's pfns, checked: at least one, each below ``nr_pfns``."""
    if len(rec.body) < stream.PAGE_DATA_HDR.size:
        raise StreamError(f"offset {rec.offset}: {rec.name} shorter than its header")
    (count,) = stream.PAGE_DATA_HDR.unpack_from(rec.body)
    if not 0 < count <= stream.MAX_PFN_BATCH_SIZE or \
            len(rec.body) != stream.PAGE_DATA_HDR.size + 8 * count:
        raise StreamError(f"offset {rec.offset}: {rec.name} of {count} pfns is "
                          f"{len(rec.body)} octets long")
    pfns = np.frombuffer(rec.body, np.uint64, count, stream.PAGE_DATA_HDR.size)
    if (pfns >= np.uint64(nr_pfns)).any():
        raise StreamError(f"offset {rec.offset}: {rec.name} names a pfn beyond the "
                          f"domain's {nr_pfns}")
    return pfns.astype(np.int64)


def bitmap_record(lacks: np.ndarray) -> bytes:
    """A POSTCOPY_RECV_BITMAP's body: the number of pfns, then a bit per pfn
    (least significant first), set for each page still lacked."""
    bits = np.packbits(lacks.astype(bool), bitorder="little").tobytes()
    return stream.RECV_BITMAP_HDR.pack(lacks.size) + bits


def read_bitmap_record(rec: stream.Record, nr_pfns: int) -> np.ndarray:
    """A POSTCOPY_RECV_BITMAP's bits as bool per pfn, checked against ``nr_pfns``."""
    if len(rec.body) < stream.RECV_BITMAP_HDR.size:
        raise StreamError(f"offset {rec.offset}: {rec.name} shorter than its header")
    (count,) = stream.RECV_BITMAP_HDR.unpack_from(rec.body)
    if count != nr_pfns or len(rec.body) != stream.RECV_BITMAP_HDR.size + (count + 7) // 8:
        raise StreamError(f"offset {rec.offset}: {rec.name} of {count} pfns, "
                          f"{len(rec.body)} octets long, for a domain of {nr_pfns}")
    bits = np.frombuffer(rec.body, np.uint8, offset=stream.RECV_BITMAP_HDR.size)
    return np.unpackbits(bits, count=count, bitorder="little").astype(bool)


def read_typed_pfns(rec: stream.Record, with_pages: bool) -> tuple[np.ndarray, np.ndarray]:
    """POSTCOPY_PFNS or POSTCOPY_PAGE_DATA (PAGE_DATA's layout, the pages
    only in the second): (pfns, type nibbles), the framing checked."""
    body = rec.body
    if len(body) < stream.PAGE_DATA_HDR.size:
        raise StreamError(f"offset {rec.offset}: {rec.name} shorter than its header")
    (count,) = stream.PAGE_DATA_HDR.unpack_from(body)
    limit = stream.MAX_BATCH_SIZE if with_pages else stream.MAX_PFN_BATCH_SIZE
    want = stream.PAGE_DATA_HDR.size + 8 * count + (PAGE_SIZE * count if with_pages else 0)
    if not 0 < count <= limit or len(body) != want:
        raise StreamError(f"offset {rec.offset}: {rec.name} of {count} pfns is "
                          f"{len(body)} octets long, expected {want}")
    entries = np.frombuffer(body, np.uint64, count, stream.PAGE_DATA_HDR.size)
    pfns = (entries & np.uint64(stream.PAGE_DATA_PFN_MASK)).astype(np.int64)
    return pfns, (entries >> np.uint64(60)).astype(np.uint8)


# --- the source ------------------------------------------------------------------------

class PageSource(Protocol):
    """Where the source's pages come from: (PFINFO types, pages) of pfns."""

    def read(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class DomainPages:
    """The suspended domain's own memory, through foreign mappings."""

    hv: Hypervisor
    dom: Domain
    p2m: np.ndarray

    def read(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mfns = self.p2m[pfns].astype(np.int64)
        types = domctl.getpageframeinfo3(self.hv, self.dom, mfns)
        if pfinfo.is_table(pfinfo.nibble(types)).any():
            raise SaveError("a pagetable left for post-copy: tables go before the switch")
        return types, np.asarray(domctl.map_foreign_bulk(self.hv, self.dom, mfns)).copy()


@dataclass
class PostcopySource:
    """The source's post-copy, all of it here and none in a loop's locals,
    so that the loop can run beside another or go on on a new connection:
    which pfns are still to send (each once), which were sent, the pfns the
    destination asked for and not yet sent, where the scan goes on."""

    pending: np.ndarray                # bool per pfn: to send, not sent yet
    sent: np.ndarray                   # bool per pfn: sent after the switch
    info: MigrationInfo
    asked: list[int] = field(default_factory=list)
    cursor: int = 0
    complete: bool = False             # the destination's POSTCOPY_COMPLETE came

    @classmethod
    def of(cls, pending: np.ndarray, info: MigrationInfo) -> PostcopySource:
        return cls(pending.copy(), np.zeros(pending.size, bool), info)

    def remaining(self) -> int:
        return int(self.pending.sum())

    def fault(self, pfns: np.ndarray) -> None:
        """A POSTCOPY_FAULT: its pfns first (those still to send); the scan
        goes on after the last one (handle_postcopy_faults)."""
        self.info.postcopy_requests += 1
        self.asked += [p for p in pfns.tolist() if self.pending[p]]
        self.cursor = (int(pfns[-1]) + 1) % self.pending.size

    def next_batch(self, size: int = stream.MAX_POSTCOPY_BATCH_SIZE,
                   scan: bool = True) -> tuple[np.ndarray, int]:
        """Up to ``size`` pfns to send now, asked ones first, then (with
        ``scan``) the scan's; each is marked sent. Returns them and how many
        of them were asked for."""
        asked = list(dict.fromkeys(p for p in self.asked if self.pending[p]))[:size]
        taken = set(asked)
        self.asked = [p for p in self.asked if p not in taken and self.pending[p]]
        self.pending[asked] = False
        batch = np.array(asked + (self._scan(size - len(asked)) if scan else []), np.int64)
        self.pending[batch] = False
        self.sent[batch] = True
        return batch, len(asked)

    def _scan(self, n: int) -> list[int]:
        """The next ``n`` pending pfns from the cursor, round the end."""
        if n <= 0:
            return []
        p = self.pending
        ahead = np.flatnonzero(p[self.cursor:])[:n] + self.cursor
        if ahead.size < n:
            ahead = np.concatenate([ahead, np.flatnonzero(p[:self.cursor])[:n - ahead.size]])
        if ahead.size:
            self.cursor = (int(ahead[-1]) + 1) % p.size
        return ahead.tolist()


def eager_pfns(ls: LiveSave, types: np.ndarray) -> np.ndarray:
    """What the destination reads before its guest can run, so goes in the
    final PAGE_DATA: every pagetable (localised there at once), the p2m
    list's frames, start_info (vcpu0's rdx) and the store and console rings
    it names (pfns once the guest has suspended)."""
    want = pfinfo.is_table(pfinfo.nibble(types)).copy()
    want[ls.frame_pfns] = True
    m2p = domctl.map_m2p(ls.hv)
    si_mfn = int(domctl.getvcpucontext(ls.dom, 0).user_regs.rdx)
    if 0 <= si_mfn < m2p.size and int(m2p[si_mfn]) < ls.p2m.size:
        want[int(m2p[si_mfn])] = True
        si = domctl.map_struct(ls.hv, ls.dom, si_mfn, start_info)
        for pfn in (int(si.store_mfn), int(si.console.domU.mfn)):
            if pfn < ls.p2m.size:
                want[pfn] = True
    return want


def switch_to_postcopy(ls: LiveSave) -> PostcopySource:
    """The guest suspended (the save's request), the records up to the
    transition (see the module's doc), flushed. Log-dirty is off at the end
    and on any failure; the guest is left suspended either way (a failure
    here is before the transition: the caller resumes it)."""
    try:
        ls.callbacks.suspend()
        precopy = ls.out.tell()
        ls.paused = True
        check_vm_state(ls)
        todo = clean_dirty_bitmap(ls, final=True) | ls.deferred
        if ls.opts.pure_postcopy:
            todo[:] = True
        ls.deferred[:] = False
        src = _write_switch(ls, todo)
        ls.out.flush()
    finally:
        disable_logdirty(ls)
    info = ls.info
    info.precopy_bytes = precopy
    info.downtime_bytes = ls.out.tell() - precopy
    info.transferred = ls.out.tell()
    info.downtime_ns += ls.opts.wire_ns(info.downtime_bytes - info.rounds[-1].octets)
    info.postcopy, info.status = True, "postcopy-active"
    info.remaining = src.remaining() * PAGE_SIZE
    if ls.report is not None:
        ls.report(info)
    return src


def _write_switch(ls: LiveSave, todo: np.ndarray) -> PostcopySource:
    """The final PAGE_DATA of what must be there first, POSTCOPY_BEGIN, the
    CPU context records, the POSTCOPY_PFNS of the rest, POSTCOPY_TRANSITION,
    libxl's records and its POSTCOPY_TRANSITION_END."""
    hv, dom, out = ls.hv, ls.dom, ls.out
    types = page_types(hv, dom, ls.p2m)
    eager = todo & eager_pfns(ls, types)
    r = send_dirty_pages(ls, eager, len(ls.info.rounds))
    ls.info.downtime_ns += r.wire_ns
    rest = np.flatnonzero(todo & ~eager)
    sc = live_context(ls, vcpu_records(hv, dom, ls.p2m), devices_state(dom))
    stream.write_record(out, PostcopyType.POSTCOPY_BEGIN)
    end_of_checkpoint(hv, dom, out, sc)
    stream.write_record(out, PostcopyType.POSTCOPY_PFNS_BEGIN)
    none = np.zeros((0, PAGE_SIZE // 8), np.uint64)
    for first in range(0, rest.size, stream.MAX_PFN_BATCH_SIZE):
        pfns = rest[first:first + stream.MAX_PFN_BATCH_SIZE]
        write_page_data(out, pfns, types[pfns], none, PostcopyType.POSTCOPY_PFNS)
    stream.write_record(out, PostcopyType.POSTCOPY_TRANSITION)
    write_emulator_records(hv, dom, out, sc)
    savefile.write_libxl_record(out, LibxlRecType.POSTCOPY_TRANSITION_END)
    pending = np.zeros(ls.p2m.size, bool)
    pending[rest] = ~np.isin(pfinfo.nibble(types[rest]), list(pfinfo.NO_DATA))
    return PostcopySource.of(pending, ls.info)


def resume_source(link: Link, src: PostcopySource, name: str) -> tuple[int, int]:
    """The source's side of a resume on a new connection: POSTCOPY_RESUME
    for ``name``, then the destination's POSTCOPY_RECV_BITMAP. The pages it
    lacks that were sent are to send again (lost in flight, QEMU's
    ram_dirty_bitmap_reload), and only the pages it lacks are still to
    send; faults asked for and lost it asks for again.
    Returns (pages lacked, of them sent before). StreamError or Dropped if
    the destination does not answer so."""
    link.write_record(PostcopyType.POSTCOPY_RESUME, name.encode())
    rec = link.read_record(block=True)
    assert rec is not None
    if rec.type != PostcopyType.POSTCOPY_RECV_BITMAP:
        raise StreamError(f"{rec.name} from the destination, expected POSTCOPY_RECV_BITMAP")
    lacks = read_bitmap_record(rec, src.pending.size)
    if (lacks & ~src.sent & ~src.pending).any():
        raise StreamError("the destination lacks pages that are none of the post-copy's")
    lost = src.sent & lacks
    src.pending = lacks.copy()  # what is in, or no longer wanted, is not sent
    src.sent &= ~lost
    src.asked, src.complete = [], False
    src.info.remaining = src.remaining() * PAGE_SIZE
    return int(lacks.sum()), int(lost.sum())


def serve_requests(link: Link, src: PostcopySource, block: bool) -> None:
    """The destination's records that have come (all of them, or with
    ``block`` the next one): FAULTs queued, COMPLETE noted."""
    while not src.complete:
        rec = link.read_record(block)
        if rec is None:
            return
        if rec.type == PostcopyType.POSTCOPY_COMPLETE:
            src.complete = True
        elif rec.type == PostcopyType.POSTCOPY_REFUSED:
            raise Refused(rec.body.decode(errors="replace") or "no reason given")
        elif rec.type == PostcopyType.POSTCOPY_FAULT:
            src.fault(read_pfn_record(rec, src.pending.size))
        else:
            raise StreamError(f"{rec.name} from the destination during post-copy")
        if block:
            return


def push(pages: PageSource, link: Link, src: PostcopySource,
         report: Callable[[MigrationInfo], None] | None = None,
         background: bool = True) -> None:
    """postcopy_domain_memory: batches of MAX_POSTCOPY_BATCH_SIZE pages, the
    requests that came served first before each, until every page is sent
    or the destination says it has all it needs; then its COMPLETE awaited
    (faults in flight meanwhile are for pages already sent: dropped).
    ``background`` False: only the pages asked for (demand paging alone,
    Hines & Gopalan's baseline; the destination asks for the rest when its
    run ends)."""
    info = src.info
    while src.remaining() and not src.complete:
        serve_requests(link, src, block=not background and not src.asked)
        if src.complete:
            break
        batch, asked = src.next_batch(scan=background)
        if not batch.size:
            continue
        types, data = pages.read(batch)
        with link.writing() as w:
            write_page_data(w, batch, types, data, PostcopyType.POSTCOPY_PAGE_DATA)
        octets = stream.RHDR.size + stream.PAGE_DATA_HDR.size + batch.size * (8 + PAGE_SIZE)
        info.postcopy_bytes += octets
        info.transferred += octets
        info.postcopy_faulted += asked
        info.postcopy_pushed += batch.size - asked
        info.remaining = src.remaining() * PAGE_SIZE
    while not src.complete:
        serve_requests(link, src, block=True)
    if report is not None:
        report(info)


def refusal(link: Link) -> str:
    """After a drop: the destination's refusal if it came before (what is
    left to read, read without waiting), else ""."""
    try:
        while (rec := link.read_record(block=False)) is not None:
            if rec.type == PostcopyType.POSTCOPY_REFUSED:
                return rec.body.decode(errors="replace") or "no reason given"
    except (Dropped, StreamError):
        pass
    return ""


def refuse(link: Link, why: str) -> None:
    """The destination cannot take post-copy: POSTCOPY_REFUSED with ``why``,
    then the source's octets read and dropped until it hangs up (or
    REFUSED_DRAIN_S pass with nothing), so that closing this end does not
    reset the connection before the source has read the refusal."""
    link.write_record(PostcopyType.POSTCOPY_REFUSED, why.encode())
    fd = link.reader.fileno()
    deadline = time.monotonic() + REFUSED_DRAIN_S
    try:
        while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if not link.reader.read1(READ_CHUNK):  # type: ignore[attr-defined]
                return
            deadline = time.monotonic() + REFUSED_DRAIN_S
    except (OSError, ValueError):
        pass


def end_stream(link: Link) -> None:
    """libxc's END, then libxl's (the stream's end after post-copy)."""
    with link.writing() as w:
        stream.write_record(w, RecType.END)
        savefile.write_libxl_record(w, LibxlRecType.END)


# --- the destination ---------------------------------------------------------------------

class Incoming:
    """The destination's side of the switch, given the post-copy records as
    the restore meets them (restore.Receiver's hook): POSTCOPY_BEGIN to
    POSTCOPY_TRANSITION in the libxc stream, libxl's
    POSTCOPY_TRANSITION_END after libxl's records; then ``prepare`` makes
    the domain's absent part and its pager, before the restore completes
    it (the pins, the VCPUs). With ``refuse`` (why this side cannot take
    post-copy) POSTCOPY_BEGIN is answered with POSTCOPY_REFUSED and the
    restore fails there, before the transition."""

    def __init__(self, link: Link, say: Callable[[str], None] | None = None,
                 refuse: str = "") -> None:
        self.link, self.say, self.refuse = link, say, refuse
        self.begun = self.transitioned = False
        self.pfns: list[np.ndarray] = []
        self.pager: Pager | None = None

    def record(self, rx: Any, rec: stream.Record) -> bool:
        """One post-copy record of the libxc stream; True at the transition."""
        t, info = rec.type, rx.ctx.info
        if t in (PostcopyType.POSTCOPY_BEGIN, PostcopyType.POSTCOPY_PFNS_BEGIN,
                 PostcopyType.POSTCOPY_TRANSITION) and rec.body:
            raise ImageError(f"offset {rec.offset}: {rec.name} has a body")
        if t == PostcopyType.POSTCOPY_BEGIN and self.refuse:
            # before the transition: the source may still resume its copy
            refuse(self.link, self.refuse)
            raise ImageError(f"offset {rec.offset}: post-copy refused: {self.refuse}")
        if t == PostcopyType.POSTCOPY_BEGIN and not self.begun and info.max_pfn >= 0:
            self.begun = True
        elif t == PostcopyType.POSTCOPY_PFNS_BEGIN and self.begun and 0 in info.vcpus:
            pass
        elif t == PostcopyType.POSTCOPY_PFNS and self.begun:
            self._pfns(info, rec)
        elif t == PostcopyType.POSTCOPY_TRANSITION and self.begun:
            self.transitioned = True
            return True
        else:
            raise ImageError(f"offset {rec.offset}: {rec.name} out of its place in the "
                             "post-copy stream")
        return False

    def _pfns(self, info: Any, rec: stream.Record) -> None:
        """POSTCOPY_PFNS: the pfns' last types; those with data will come."""
        pfns, nib = read_typed_pfns(rec, with_pages=False)
        if (pfns > info.max_pfn).any() or not np.isin(nib, list(pfinfo.KNOWN)).all():
            raise ImageError(f"offset {rec.offset}: a pfn beyond the domain's maximum, or "
                             "of an unknown type")
        if pfinfo.is_table(nib).any():
            raise ImageError(f"offset {rec.offset}: a pagetable among the post-copy pfns "
                             "(tables go before the switch)")
        info.nibbles[pfns] = nib
        info.ever_populated[pfns[~np.isin(nib, list(pfinfo.NOT_POPULATED))]] = True
        data = ~np.isin(nib, list(pfinfo.NO_DATA))
        info.ever_data[pfns[data]] = True
        self.pfns.append(pfns[data])

    def transition_end(self, rx: Any, rec: savefile.LibxlRecord) -> bool:
        """libxl's POSTCOPY_TRANSITION_END: its records are whole (True)."""
        if rec.type != LibxlRecType.POSTCOPY_TRANSITION_END:
            return False
        if not self.transitioned or rec.body:
            raise ImageError(f"offset {rec.offset}: {rec.name} not after libxc's "
                             "POSTCOPY_TRANSITION, or with a body")
        rx.parser.transition_end(rec)
        return True

    def prepare(self, rx: Any) -> None:
        """Every post-copy pfn with data given a frame and marked absent,
        the pager registered."""
        ctx = rx.ctx
        pfns = np.unique(np.concatenate(self.pfns)) if self.pfns else np.zeros(0, np.int64)
        populate(ctx, pfns)
        self.pager = Pager(ctx.hv, ctx.dom, ctx.p2m, pfns, self.link, self.say)
        domctl.mem_paging_setup(ctx.hv, self.pager.fetch, 0, self.pager.poll)
        domctl.mem_paging_evict(ctx.hv, ctx.dom, ctx.p2m[pfns].astype(np.int64))

    def abandon(self) -> None:
        """The restore failed after ``prepare``: the pager goes."""
        if self.pager is not None:
            self.pager.done = True
            domctl.mem_paging_setup(self.pager.hv, None)


class Pager:
    """The destination's pager of a post-copy (Otto's restore side, QEMU's
    fault thread and listen thread in one): each post-copy pfn outstanding,
    then requested when a fetch asks for it, then ready. After a drop the
    domain is paused and ``recover`` (if set) is asked for a new link, one
    that has been through the resume handshake (``accept_resume``); the
    pager takes it (``replace_link``) and whatever waited goes on: a
    fetch, the loads between slices, the drain. ``on_complete`` is called
    once every page is in and the stream ended."""

    def __init__(self, hv: Hypervisor, dom: Domain, p2m: np.ndarray, pfns: np.ndarray,
                 link: Link, say: Callable[[str], None] | None = None) -> None:
        self.hv, self.dom, self.p2m, self.link, self._say = hv, dom, p2m, link, say
        self.first_link = link  # its owner's (the receiver's channel) to close
        self.state = np.zeros(p2m.size, np.int8)
        self.state[pfns] = OUTSTANDING
        self.left = int(pfns.size)
        self.fetching = np.zeros(0, np.int64)
        self.requests = self.faulted = self.pushed = self.dropped = self.unfetched = 0
        self.blocked_ns = 0   # host time fetches waited (QEMU's postcopy-blocktime)
        self.paused = self.done = False
        self.held = False  # the drop paused a running domain: a resume unpauses it
        self.unfinished = False  # every page in, the stream's end interrupted
        self.source_ended = False  # the source's END read: it had our COMPLETE
        self.why = ""
        self.drops = 0
        self.on_complete: Callable[[Pager], None] | None = None
        # a drop while a fetch waits: a new link to go on with, or None
        self.recover: Callable[[Pager], Link | None] | None = None

    def say(self, line: str) -> None:
        log.info("%s", line)
        if self._say is not None:
            self._say(line)

    def fetch(self, mfns: np.ndarray) -> None:
        """Absent frames touched: one POSTCOPY_FAULT for their pfns not yet
        asked for, then records until all are in. If the connection drops
        meanwhile the domain is paused; ``recover`` (if set) may give a new
        link, on which the wait goes on, else PostcopyPaused (the domain
        kept)."""
        pfns = domctl.map_m2p(self.hv)[mfns].astype(np.int64)
        if (self.state[pfns] == NOT_POSTCOPY).any():
            raise RuntimeError("an absent frame that is none of the post-copy's")
        self.fetching = np.asarray(mfns, np.int64)
        t0 = time.monotonic_ns()
        try:
            while True:
                try:
                    self._wait(pfns)
                    return
                except (Dropped, StreamError) as e:
                    if not self._recovered(str(e)):
                        raise PostcopyPaused(self.why) from None
        finally:
            self.fetching = np.zeros(0, np.int64)
            self.blocked_ns += time.monotonic_ns() - t0

    def _wait(self, pfns: np.ndarray) -> None:
        ask = pfns[self.state[pfns] == OUTSTANDING]
        if ask.size:
            self._ask(ask)
        while (self.state[pfns] != READY).any():
            self._take(block=True)

    def _ask(self, pfns: np.ndarray) -> None:
        self.state[pfns] = REQUESTED
        self.requests += 1
        self.link.write_record(PostcopyType.POSTCOPY_FAULT, pfn_record(pfns))

    def poll(self, limit: int | None = None) -> None:
        """Between slices: the pages that have come (at most ``limit``
        records, so that a loop's guest runs between), loaded without
        waiting; the end once the last is in. Nothing once the end is
        interrupted (``unfinished``: what the link holds is no page)."""
        if self.paused or self.done or self.unfinished:
            return
        try:
            taken = 0
            while (limit is None or taken < limit) and self._take(block=False):
                taken += 1
        except (Dropped, StreamError) as e:
            if self.left:  # a domain with every page needs no source: only its end
                self._recovered(str(e))
                return
        if not self.left:
            self.finish()

    def _take(self, block: bool) -> bool:
        """One record off the link, applied; False if none has come."""
        rec = self.link.read_record(block, PAGE_WAIT_S)
        if rec is None:
            return False
        if rec.type != PostcopyType.POSTCOPY_PAGE_DATA:
            raise StreamError(f"offset {rec.offset}: {rec.name} during post-copy")
        self._load(rec)
        return True

    def _load(self, rec: stream.Record) -> None:
        """POSTCOPY_PAGE_DATA: each page into its absent frame (one no
        longer absent, overwritten whole meanwhile, is dropped)."""
        pfns, nib = read_typed_pfns(rec, with_pages=True)
        if np.isin(nib, list(pfinfo.NO_DATA)).any() or pfinfo.is_table(nib).any():
            raise StreamError(f"offset {rec.offset}: a page without data or a pagetable")
        if (pfns >= self.state.size).any() or \
                not np.isin(self.state[pfns], (OUTSTANDING, REQUESTED)).all():
            raise StreamError(f"offset {rec.offset}: a page not asked for by POSTCOPY_PFNS, "
                              "or sent twice")
        count = pfns.size
        pages = np.frombuffer(rec.body, np.uint64, offset=stream.PAGE_DATA_HDR.size + 8 * count
                              ).reshape(count, PAGE_SIZE // 8)
        mfns = self.p2m[pfns].astype(np.int64)
        waited = np.isin(mfns, self.fetching)
        domctl.write_absent(self.hv, mfns[waited], pages[waited])
        domctl.mem_paging_load(self.hv, mfns[~waited], pages[~waited])
        self.faulted += int((self.state[pfns] == REQUESTED).sum())
        self.pushed += int((self.state[pfns] == OUTSTANDING).sum())
        self.state[pfns] = READY
        self.left -= int(count)

    def _paused(self, why: str) -> None:
        """The connection dropped: the domain paused and kept (postcopy-paused)."""
        if self.paused:
            return
        self.paused = True
        self.drops += 1
        self.link.cut()  # a link dropped by a wait that timed out is cut, so the source hears it
        self.why = (f"migration target: the connection to the source dropped during "
                    f"post-copy ({why}); domain {self.dom.name} paused with {self.left} "
                    "pages still at the source")
        # a domain with every page runs on: nothing it reads is at the source
        alive = self.dom.domid in self.hv.domains and self.left > 0
        self.held = alive and not self.dom.paused
        if alive:
            libxl.pause(self.dom)
        self.say(self.why)

    def _recovered(self, why: str) -> bool:
        """After a drop: paused, then a new link from ``recover`` taken (a
        drop on it at once asks for another). False if none came: the
        domain stays paused."""
        self._paused(why)
        while self.recover is not None:
            link = self.recover(self)
            if link is None:
                return False
            try:
                self.replace_link(link)
                return True
            except Dropped as e:
                self.say(f"migration target: the resumed connection dropped at once ({e})")
        return False

    def lacks(self) -> np.ndarray:
        """Bool per pfn: the post-copy's pages not in yet (QEMU's RECV_BITMAP, negated)."""
        return (self.state == OUTSTANDING) | (self.state == REQUESTED)

    def accept_resume(self, link: Link, name: str) -> None:
        """The destination's side of the resume handshake on a new
        connection: the source's POSTCOPY_RESUME for ``name``, answered with
        POSTCOPY_RECV_BITMAP of the pages still lacked. StreamError (or
        Dropped) if it is not that; the caller then closes the connection,
        the source's sign of a refusal."""
        rec = link.read_record(block=True)
        assert rec is not None
        if rec.type != PostcopyType.POSTCOPY_RESUME:
            raise StreamError(f"offset {rec.offset}: {rec.name}, expected POSTCOPY_RESUME")
        if rec.body != name.encode():
            raise StreamError(f"a resume of domain {rec.body.decode(errors='replace')!r}, "
                              f"not {name!r}")
        if not (self.paused or self.unfinished) or self.done:
            raise StreamError(f"the post-copy of {name} is not paused")
        link.write_record(PostcopyType.POSTCOPY_RECV_BITMAP, bitmap_record(self.lacks()))

    def replace_link(self, link: Link) -> None:
        """A new connection to the source (recovery, after ``accept_resume``
        on it): the pfns asked for and not come are asked again, the domain
        unpaused (if the drop paused it), the wait goes on. Dropped if the
        new connection fails at once: still paused."""
        self._swap_link(link)
        lost = np.flatnonzero(self.state == REQUESTED)
        if lost.size:
            self.state[lost] = OUTSTANDING
            self._ask(lost)
        self.paused, self.why = False, ""
        if self.held and self.dom.domid in self.hv.domains:
            libxl.unpause(self.dom)
        self.held = False

    def wants_pages(self) -> bool:
        """Whether the domain still needs its memory: not once it is gone,
        powered off or rebooting (nothing reads its old memory again); a
        suspended or crashed one does (a save, a core dump reads it)."""
        return self.dom.domid in self.hv.domains and \
            self.dom.shutdown_reason not in (SHUTDOWN_poweroff, SHUTDOWN_reboot)

    def drain(self) -> None:
        """The caller's run has ended: if the domain still wants its
        memory (``wants_pages``), every page not yet asked for is asked for
        now and all are waited for; then the end (COMPLETE: the source
        stops pushing). A drop meanwhile is recovered as a fetch's is, or
        leaves the domain paused."""
        if self.done or self.paused:
            return
        while not self.unfinished:
            try:
                self._drain()
                break
            except (Dropped, StreamError) as e:
                if not self._recovered(str(e)):
                    return
        if not self.unfinished:
            self.finish()
        self._end_again()

    def _drain(self) -> None:
        """Every outstanding pfn asked for, DRAIN_ASK_PFNS at a time, each
        piece once the one before it is in (the source reads faults only
        between its batches: at most two pieces wait unread, never enough
        to block a write), then all waited for."""
        if self.wants_pages():
            rest = np.flatnonzero(self.state == OUTSTANDING)
            before = np.zeros(0, np.int64)
            for first in range(0, rest.size, DRAIN_ASK_PFNS):
                piece = rest[first:first + DRAIN_ASK_PFNS]
                piece = piece[self.state[piece] == OUTSTANDING]  # not pushed meanwhile
                if piece.size:
                    self._ask(piece)
                while (self.state[before] != READY).any() and self.wants_pages():
                    self._take(block=True)
                before = piece
        while self.left and self.wants_pages():
            self._take(block=True)

    def finish(self) -> None:
        """The last page is in (or no longer wanted): the frames never fetched
        made present (zeroed), the balloon's inhibit released, the pager let
        go, then the stream's end (``_end``, and ``_end_again`` if it was
        interrupted: with no ``recover`` the pager is done at once)."""
        alive = self.dom.domid in self.hv.domains
        if self.left:  # before the release: reconcile must find no frame absent
            self._give_up_lacking(alive)
        if alive:
            line = balloonctl.postcopy_release(self.dom)
            if line:
                self.say(f"migration target: {line}")
        domctl.mem_paging_setup(self.hv, None)
        self._end()
        self._end_again()

    def _end(self) -> None:
        """POSTCOPY_COMPLETE sent, the source's END and libxl's END read
        (pages still in flight dropped); then ``on_complete``. A drop here
        leaves the domain whole but the source unaware: ``unfinished``, and
        the drain waits for a resume to end it (``_end_again``)."""
        try:
            self.link.write_record(PostcopyType.POSTCOPY_COMPLETE)
            self._read_end()
        except (Dropped, StreamError) as e:
            # the source's END means it had COMPLETE: it knows, nothing to wait for
            self.unfinished = not self.source_ended
            self.say(f"migration target: the stream's end did not come ({e}); the domain "
                     "has all it needs" + (", the source must resume to end its side"
                                          if self.unfinished else ""))
            if self.unfinished:
                return
        self.unfinished, self.done = False, True
        if self.on_complete is not None:
            self.on_complete(self)

    def _end_again(self) -> None:
        """``unfinished``: the source's resumes (``recover``) until one ends
        the stream; with none, the end all the same (the source stays
        paused, for a person to destroy its copy)."""
        while self.unfinished:
            link = self.recover(self) if self.recover is not None else None
            if link is None:
                self.unfinished, self.done = False, True
                if self.on_complete is not None:
                    self.on_complete(self)
                return
            self._swap_link(link)
            self._end()

    def _swap_link(self, link: Link) -> None:
        """A resume's link in place of the dropped one, which is closed
        (unless it is the first, its owner's)."""
        old, self.link = self.link, link
        if old is not link and old is not self.first_link:
            old.close()

    def abandon(self) -> None:
        """The domain is gone while paused: the pager let go, its link
        closed (the first one too: nothing else will close it)."""
        self.done, self.paused, self.unfinished = True, False, False
        domctl.mem_paging_setup(self.hv, None)
        self.link.close()
        if self.first_link is not self.link:
            self.first_link.close()

    def _give_up_lacking(self, alive: bool) -> None:
        """A domain that wants no more pages (powered off, gone): those that
        never came are ready as they are, their frames (if still the
        domain's) zeroed and present, so that none is left absent with no
        pager to fill it (a reader would fail) and a resume finds none lacking."""
        pfns = np.flatnonzero(self.lacks())
        for first in range(0, pfns.size if alive else 0, stream.MAX_PFN_BATCH_SIZE):
            mfns = self.p2m[pfns[first:first + stream.MAX_PFN_BATCH_SIZE]].astype(np.int64)
            domctl.mem_paging_load(self.hv, mfns,
                                   np.zeros((mfns.size, PAGE_SIZE // 8), np.uint64))
        self.state[pfns] = READY
        self.left, self.unfetched = 0, int(pfns.size)
        self.say(f"migration target: domain {self.dom.name} has ended: {pfns.size} pages it "
                 "will not read again were not fetched")

    def _read_end(self) -> None:
        while True:
            rec = self.link.read_record(block=True, timeout_s=PAGE_WAIT_S)
            assert rec is not None
            if rec.type == RecType.END:
                self.source_ended = True
                break
            if rec.type != PostcopyType.POSTCOPY_PAGE_DATA:
                raise StreamError(f"offset {rec.offset}: {rec.name} at the post-copy's end")
            self.dropped += 1
        rtype, length = stream.RHDR.unpack(self.link.read_exactly(stream.RHDR.size))
        if rtype != LibxlRecType.END or length:
            raise StreamError(f"{savefile.libxl_rec_name(rtype)} after libxc's END, "
                              "expected libxl's END")


__all__ = ["DomainPages", "Dropped", "Incoming", "Link", "PageSource", "Pager",
           "PostcopyPaused", "PostcopySource", "Refused", "bitmap_record", "end_stream",
           "push", "read_bitmap_record", "refusal", "refuse", "resume_source",
           "switch_to_postcopy"]
