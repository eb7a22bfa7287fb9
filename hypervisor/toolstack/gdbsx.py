"""``pvlab run --gdb PORT``: a gdb server for a domain's x86 VCPUs, as QEMU's
gdbstub serves ``make qemu-gdb`` and Xen's gdbsx serves a guest.

It speaks gdb's remote protocol (rsp.py) on 127.0.0.1 and reaches the
domain only through the control interface: registers by gdb's names
(gdbsx_getregs), memory by virtual address through the VCPU's live
pagetables (gdbsx_guestmemio; unmapped is E14), breakpoints and single
steps (the hypervisor's debugger, hypervisor/debugger.py). Each VCPU is a
thread, id vcpu_id + 1. gdb's all-stop mode is the machine's own: one host
thread runs every VCPU, so while one is stopped all are. A step runs the
VCPU's next instruction while the others run on as the schedule says, so a
run under gdb keeps the schedule (and the results) of the run without it.
The register layout comes from hypervisor/public/gdb.py, sent to gdb as
target.xml.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.gdb import (
    FEATURE_CORE,
    FEATURE_SEGMENTS,
    FEATURE_SSE,
    GDB_ARCHITECTURE,
    GDB_REGS,
    STOP_INTERRUPT,
)
from hypervisor.toolstack.rsp import Connection, ConnectionClosed

log = logging.getLogger(__name__)

SIGINT, SIGTRAP, SIGKILL, SIGSEGV = 2, 5, 9, 11
PACKET_SIZE = 0x4000
MEM_ERROR = b"E14"  # EFAULT, as gdbserver answers an unreadable address
BAD_REQUEST = b"E01"


class GdbKill(Exception):
    """gdb asked for the domain to be killed (``k``)."""


def target_xml() -> bytes:
    """gdb's target description of the VCPUs, from the one register list."""
    parts = [f'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
             f"<target><architecture>{GDB_ARCHITECTURE}</architecture>"]
    for feature in (FEATURE_CORE, FEATURE_SSE, FEATURE_SEGMENTS):
        parts.append(f'<feature name="{feature}">')
        parts += [f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{i}"/>'
                  for i, r in enumerate(GDB_REGS) if r.feature == feature]
        parts.append("</feature>")
    parts.append("</target>")
    return "".join(parts).encode()


def encode_registers(values: dict[str, int]) -> bytes:
    """The ``g`` packet: every register, in gdb's order, little-endian hex."""
    return b"".join(values.get(r.name, 0).to_bytes(r.bits // 8, "little").hex().encode()
                    for r in GDB_REGS)


def decode_registers(data: bytes) -> dict[str, int]:
    """A ``G`` packet's registers by name (those it carries whole)."""
    raw = bytes.fromhex(data.decode())
    out, pos = {}, 0
    for r in GDB_REGS:
        n = r.bits // 8
        if pos + n > len(raw):
            break
        out[r.name] = int.from_bytes(raw[pos:pos + n], "little")
        pos += n
    return out


def exit_reply(reason: str) -> bytes:
    """What gdb is told when the run ends: W (exited, with a status) for a
    shutdown, X (killed by a signal) for a crash or a run the toolstack
    stopped (its time limit, or no progress possible)."""
    if reason == "poweroff":
        return b"W00"
    if reason == "crash":
        return b"X%02x" % SIGSEGV
    if reason in ("running", "hung"):
        return b"X%02x" % SIGKILL
    return b"W01"


class GdbServer:
    """One gdb connection to one domain. ``serve`` answers gdb's packets
    while the guest is stopped and returns when gdb resumes it."""

    def __init__(self, hv: Hypervisor, dom: Domain, conn: Connection) -> None:
        self.hv, self.dom, self.conn = hv, dom, conn
        self.nr_vcpus = domctl.max_vcpus(dom)
        self.thread = 1  # the thread g, m, s... act on (Hg)
        self.stopped = (1, SIGTRAP)  # the thread that last stopped, and its signal
        self.attached = True
        self.running = False  # gdb waits for a stop reply
        self.handlers: dict[str, Callable[[bytes], bytes | None]] = {
            "?": self._why, "g": self._read_all, "G": self._write_all, "p": self._read_one,
            "P": self._write_one, "m": self._read_mem, "M": self._write_mem,
            "Z": self._insert, "z": self._remove, "H": self._select, "T": self._alive,
            "c": self._continue, "s": self._step, "v": self._v, "q": self._query,
            "Q": self._set, "D": self._detach, "k": self._kill,
        }

    # --- the session ------------------------------------------------------------------

    def attach(self) -> None:
        """Attach to the domain and serve gdb until it lets the guest run."""
        domctl.debug_attach(self.hv, self.dom, self.on_stop, self.interrupted)
        self.serve()

    def on_stop(self, vcpu_id: int, why: str) -> None:
        """A VCPU stopped (the hypervisor's debugger calls this)."""
        self.stopped = (vcpu_id + 1, SIGINT if why == STOP_INTERRUPT else SIGTRAP)
        self.thread = vcpu_id + 1
        self._reply(self._stop_reply())
        self.serve()

    def interrupted(self) -> bool:
        try:
            return self.attached and self.conn.poll_interrupt()
        except OSError:
            return False

    def serve(self) -> None:
        self.running = False
        try:
            while self.attached and not self.running:
                packet = self.conn.read_packet()
                reply = self._handle(packet)
                if reply is not None:
                    self._reply(reply)
        except (ConnectionClosed, OSError):
            log.info("gdb went away: the guest runs on")
            self._drop()

    def _handle(self, packet: bytes) -> bytes | None:
        """The reply to one packet: "" for one the server does not know, E01
        for one it cannot parse."""
        handler = self.handlers.get(chr(packet[0])) if packet else None
        if handler is None:
            return b""
        try:
            return handler(packet[1:])
        except (ValueError, IndexError):
            return BAD_REQUEST

    def finish(self, reason: str) -> None:
        """The run is over: tell gdb, if it waits for the guest, and hang up."""
        if self.attached and self.running:
            try:
                self.conn.send(exit_reply(reason))
            except OSError:
                pass
        self.conn.close()

    def _reply(self, payload: bytes) -> None:
        try:
            self.conn.send(payload)
        except OSError:
            self._drop()

    def _drop(self) -> None:
        if self.attached:
            self.attached = False
            domctl.debug_detach(self.dom)
        self.running = True

    def _stop_reply(self) -> bytes:
        tid, sig = self.stopped
        return b"T%02xthread:%x;" % (sig, tid)

    def _vcpu(self) -> int:
        return self.thread - 1

    # --- registers and memory ---------------------------------------------------------

    def _why(self, _: bytes) -> bytes:
        return self._stop_reply()

    def _read_all(self, _: bytes) -> bytes:
        return encode_registers(domctl.gdbsx_getregs(self.dom, self._vcpu()))

    def _write_all(self, data: bytes) -> bytes:
        try:
            values = decode_registers(data)
        except ValueError:
            return BAD_REQUEST
        old = domctl.gdbsx_getregs(self.dom, self._vcpu())
        for name, value in values.items():
            if value != old[name]:
                domctl.gdbsx_setreg(self.dom, self._vcpu(), name, value)
        return b"OK"

    def _read_one(self, data: bytes) -> bytes:
        n = int(data, 16)
        if n >= len(GDB_REGS):
            return BAD_REQUEST
        values = domctl.gdbsx_getregs(self.dom, self._vcpu())
        return encode_registers(values)[self._offset(n):self._offset(n + 1)]

    @staticmethod
    def _offset(n: int) -> int:
        return sum(r.bits // 4 for r in GDB_REGS[:n])

    def _write_one(self, data: bytes) -> bytes:
        num, _, value = data.partition(b"=")
        n = int(num, 16)
        if n >= len(GDB_REGS) or len(value) != GDB_REGS[n].bits // 4:
            return BAD_REQUEST
        ok = domctl.gdbsx_setreg(self.dom, self._vcpu(), GDB_REGS[n].name,
                                 int.from_bytes(bytes.fromhex(value.decode()), "little"))
        return b"OK" if ok else BAD_REQUEST

    def _read_mem(self, data: bytes) -> bytes:
        addr, _, length = data.partition(b",")
        size = min(int(length, 16), PACKET_SIZE // 2)
        got = domctl.gdbsx_guestmemio(self.hv, self.dom, self._vcpu(), int(addr, 16), size)
        return got.hex().encode() if got is not None else MEM_ERROR

    def _write_mem(self, data: bytes) -> bytes:
        where, _, hexdata = data.partition(b":")
        addr, _, length = where.partition(b",")
        payload = bytes.fromhex(hexdata.decode())
        if len(payload) != int(length, 16):
            return BAD_REQUEST
        ok = domctl.gdbsx_guestmemio_write(self.hv, self.dom, self._vcpu(), int(addr, 16),
                                           payload)
        return b"OK" if ok else MEM_ERROR

    # --- breakpoints and threads ------------------------------------------------------

    def _breakpoint(self, data: bytes, insert: bool) -> bytes:
        kind, addr, _ = data.split(b",", 2)
        if kind not in (b"0", b"1"):  # software and hardware breakpoints; no watchpoints
            return b""
        domctl.debug_breakpoint(self.dom, int(addr, 16), insert)
        return b"OK"

    def _insert(self, data: bytes) -> bytes:
        return self._breakpoint(data, True)

    def _remove(self, data: bytes) -> bytes:
        return self._breakpoint(data, False)

    def _thread_id(self, text: bytes) -> int | None:
        """A thread id gdb sent: a VCPU's, or None (0 and -1: any)."""
        tid = int(text, 16) if text not in (b"", b"-1") else 0
        if tid == 0:
            return self.thread
        return tid if 1 <= tid <= self.nr_vcpus else None

    def _select(self, data: bytes) -> bytes:
        tid = self._thread_id(data[1:])
        if tid is None:
            return BAD_REQUEST
        if data[:1] == b"g":
            self.thread = tid
        return b"OK"

    def _alive(self, data: bytes) -> bytes:
        return b"OK" if self._thread_id(data) is not None else BAD_REQUEST

    # --- running ------------------------------------------------------------------------

    def _continue(self, data: bytes) -> None:
        self._resume(data, None)

    def _step(self, data: bytes) -> None:
        self._resume(data, self.thread)

    def _resume(self, addr: bytes, step: int | None) -> None:
        if addr:
            domctl.gdbsx_setreg(self.dom, self._vcpu(), "rip", int(addr, 16))
        if step is not None:
            domctl.debug_op_single_step(self.dom, step - 1)
        self.running = True

    def _v(self, data: bytes) -> bytes | None:
        if data == b"Cont?":
            return b"vCont;c;C;s;S"
        if data.startswith(b"Cont;"):
            step = None
            for action in data[5:].split(b";"):
                verb, _, tid = action.partition(b":")
                if verb[:1] in (b"s", b"S"):
                    step = self._thread_id(tid) or self.thread
            self._resume(b"", step)
            return None
        return b""

    def _detach(self, _: bytes) -> None:
        self._reply(b"OK")
        self._drop()

    def _kill(self, _: bytes) -> None:
        self._drop()
        raise GdbKill

    # --- queries -----------------------------------------------------------------------

    def _query(self, data: bytes) -> bytes:
        if data.startswith(b"Supported"):
            return (b"PacketSize=%x;qXfer:features:read+;vContSupported+;QStartNoAckMode+"
                    % PACKET_SIZE)
        if data.startswith(b"Xfer:features:read:target.xml:"):
            return self._xfer(data.rsplit(b":", 1)[1])
        if data == b"C":
            return b"QC%x" % self.thread
        if data == b"fThreadInfo":
            return b"m" + b",".join(b"%x" % (i + 1) for i in range(self.nr_vcpus))
        if data == b"sThreadInfo":
            return b"l"
        if data.startswith(b"ThreadExtraInfo,"):
            return self._thread_info(data.split(b",", 1)[1])
        if data == b"Attached":
            return b"1"  # gdb detaches when it quits: the guest runs on
        if data.startswith(b"Symbol"):
            return b"OK"
        return b""

    def _xfer(self, span: bytes) -> bytes:
        off, _, length = span.partition(b",")
        doc, start = target_xml(), int(off, 16)
        chunk = doc[start:start + int(length, 16)]
        return (b"m" if start + len(chunk) < len(doc) else b"l") + chunk

    def _thread_info(self, text: bytes) -> bytes:
        tid = self._thread_id(text)
        if tid is None:
            return BAD_REQUEST
        info = domctl.getvcpuinfo(self.dom, tid - 1)
        state = "offline" if not info.online else "blocked" if info.blocked else "runnable"
        return f"vcpu{tid - 1} {state}".encode().hex().encode()

    def _set(self, data: bytes) -> bytes | None:
        if data == b"StartNoAckMode":
            self._reply(b"OK")
            self.conn.acks = False
            return None
        return b""


def listen(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:port (0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1)
    return sock


def accept(sock: socket.socket) -> Connection:
    """Wait for gdb; one connection, then the socket stops listening."""
    conn, _ = sock.accept()
    sock.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(conn)
