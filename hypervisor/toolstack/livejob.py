"""The daemon's live jobs: a live save or a migration of one of its domains,
run while the daemon goes on serving (its other domains run, its clients are
answered, ``xl list`` shows the domain being moved).

How. A job runs the live save loop (save.write_image_live, and a
migration's handshake around it) in a thread of its own, and the daemon's
machine, with everything else of the daemon's, is held by one thread at a
time (``Machine``). The daemon's loop holds it and, after each of its turns,
hands it to a job that asks. The job gives it back whenever it waits: while
its octets are on the wire (every write and read of its file or channel goes
through ``Unheld``) and while the guest is given time between rounds
(``DaemonLive.run_for``). So a round's pages are copied out synchronously,
with the guest stopped, and written while the loop runs.

Why not the other way round, the loop run from the callbacks: the loop would
then nest inside one command (a second migration would nest inside the
first, and unwind only in the reverse order), and a write to a slow receiver,
or a handshake waiting for the receiver's answer, would stop the whole
machine. A thread that holds the machine only while it copies keeps one loop,
which no wire can block.

Xen's libxl does the same in its way: the save helper is a process of its
own, and libxl's event loop goes on serving while it writes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.toolstack import libxl
from hypervisor.toolstack.control import Request, cancel_shutdown
from hypervisor.toolstack.precopy import MigrationInfo
from hypervisor.toolstack.save import SaveError

log = logging.getLogger(__name__)

WIRE_CHUNK = 4 << 20   # octets a job gathers before it gives the machine back to write them


class Machine:
    """The machine, held by one thread at a time: the daemon's loop from the
    start; a job's thread between ``take`` and ``give``. The loop offers it
    at the end of each turn (``turn``) to the jobs that asked for it, and to
    those that waited for that turn to pass (``let_run``); a job asking for
    it wakes the loop's poll (``wake``) so that the offer comes soon."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._cond = threading.Condition()
        self._held = True
        self._wanted = 0
        self._after: list[int] = []   # the turns jobs wait for, to take it again
        self._turns = 0
        self._wake = wake

    def _due(self) -> bool:
        return self._wanted > 0 or any(t <= self._turns for t in self._after)

    def take(self) -> None:
        """A job's thread: wait until the loop offers the machine, and hold it."""
        with self._cond:
            self._wanted += 1
            self._wake()
            while self._held:
                self._cond.wait()
            self._wanted -= 1
            self._held = True

    def give(self) -> None:
        """A job's thread: the machine back to the loop."""
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def turn(self) -> None:
        """The loop, after each turn: the jobs due have the machine, one
        after the other, before the loop takes it back."""
        with self._cond:
            self._turns += 1
            if not self._due():
                return
            self._held = False
            self._cond.notify_all()
            while self._due() or self._held:
                self._cond.wait()
            self._held = True

    def let_run(self) -> None:
        """A job's thread holding the machine: give it for one turn of the loop."""
        with self._cond:
            target = self._turns + 1
            self._after.append(target)
            self._held = False
            self._cond.notify_all()
            while self._turns < target or self._held:
                self._cond.wait()
            self._after.remove(target)
            self._held = True


def unheld(machine: Machine, call: Callable[[], Any]) -> Any:
    """``call()`` in a job's thread with the machine given back meanwhile."""
    machine.give()
    try:
        return call()
    finally:
        machine.take()


class Unheld:
    """A file, pipe or socket that a job writes and reads with the machine
    given back meanwhile. Writes are gathered up to WIRE_CHUNK octets (a
    batch of pages), so that the machine changes hands once a batch, not
    once a record; a read, ``flush``, ``tell`` or ``seek`` sends what is
    gathered first."""

    def __init__(self, f: Any, machine: Machine) -> None:
        self.f = f
        self.machine = machine
        self.buf = bytearray()

    def _unheld(self, call: Callable[[], Any]) -> Any:
        return unheld(self.machine, call)

    def write(self, data: bytes) -> int:
        self.buf += data
        if len(self.buf) >= WIRE_CHUNK:
            self._send()
        return len(data)

    def _send(self) -> None:
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            self._unheld(lambda: self.f.write(data))

    def flush(self) -> None:
        self._send()
        self._unheld(self.f.flush)

    def read(self, n: int = -1) -> bytes:
        self._send()
        return self._unheld(lambda: self.f.read(n))

    def read1(self, n: int = -1) -> bytes:
        self._send()
        return self._unheld(lambda: self.f.read1(n))

    def readinto(self, b: Any) -> int:
        self._send()
        return self._unheld(lambda: self.f.readinto(b))

    def readline(self, limit: int = -1) -> bytes:
        self._send()
        return self._unheld(lambda: self.f.readline(limit))

    def tell(self) -> int:
        self._send()
        return self.f.tell()

    def close(self) -> None:
        try:
            self._send()
        finally:
            self._unheld(self.f.close)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._send()
        return self.f.seek(offset, whence)

    def __getattr__(self, name: str) -> Any:
        """What does not wait (fileno, closed, name) comes from the file itself;
        every call that may wait is one of the methods above."""
        if name in ("peek", "readlines", "writelines", "recv", "send", "sendall"):
            raise AttributeError(f"{name} would wait with the machine held")
        return getattr(self.f, name)


class Cancelled(SaveError):
    """The daemon stops, or the job was cancelled: the job gives up."""


@dataclass
class LiveJob:
    """One live save or migration: its thread, its MigrationInfo (query-migrate),
    what came of it, and the system time its thread waits for (the loop's
    poll must wake by then)."""

    kind: str                     # "save", "migrate", "incoming" or "remus"
    dom: Domain | None            # None for an incoming migration until it is built
    info: MigrationInfo = field(default_factory=MigrationInfo)
    status: str = "setup"         # QEMU's MigrationStatus, as events tell it
    result: Any = None
    error: str = ""
    done: bool = False
    wake_at: int | None = None
    reported: int = 0             # rounds told as events so far
    suspended: bool = False       # the guest suspended for the final round
    cancelled: bool = False
    postcopy_ok: bool = False     # may switch to post-copy (the capability, or --postcopy)
    start_postcopy: bool = False  # migrate-start-postcopy came: switch at the next round
    thread: threading.Thread | None = None
    on_cancel: Callable[[], None] | None = None  # closes its wire (ends a blocked read)
    on_stop: Callable[[], None] | None = None    # a gentle end (Remus's stream ended cleanly)
    finish: Callable[[LiveJob], None] | None = None  # the loop's part once it is done
    # xl's lines said meanwhile, from any thread; the loop emits them as events
    messages: deque[str] = field(default_factory=deque)
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        """One of xl's lines: kept, and told as an event at the loop's next turn."""
        self.lines.append(line)
        self.messages.append(line)

    def query_migrate(self) -> dict[str, Any]:
        out = self.info.query_migrate()
        out["status"] = self.status
        return out

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            try:
                self.on_cancel()
            except OSError:
                pass


def start(machine: Machine, job: LiveJob, work: Callable[[LiveJob], Any]) -> None:
    """Run ``work(job)`` in the job's thread, holding the machine but where it
    gives it back; its result or its failure's one line go into the job, which
    is ``done`` at the end (the loop finishes it)."""
    def body() -> None:
        machine.take()
        try:
            job.result = work(job)
        except Exception as e:  # every failure is the job's answer, never the daemon's end
            if not isinstance(e, (SaveError, OSError, libxl.LibxlError)):
                log.exception("live %s job failed", job.kind)
            job.error = str(e) or type(e).__name__
        finally:
            job.done = True
            job.wake_at = None
            machine.give()
    job.thread = threading.Thread(target=body, name=f"live-{job.kind}", daemon=True)
    job.thread.start()


class DaemonLive:
    """save.LiveCallbacks for a domain of the daemon: the guest runs in the
    daemon's loop while a round is on the wire, for at least the round's
    time on the modelled link (since the last round ended); it is suspended
    through the request and handshake a save uses."""

    def __init__(self, machine: Machine, hv: Hypervisor, job: LiveJob,
                 state: libxl.DomainState, time_words: str,
                 suspended: Callable[[], None]) -> None:
        self.machine, self.hv, self.job, self.state = machine, hv, job, state
        self.time_words = time_words
        self.suspended = suspended   # told once the guest has suspended (the SUSPEND event)
        self.mark = domctl.system_time(hv)

    def _check(self) -> None:
        dom = self.job.dom
        assert dom is not None
        if self.job.cancelled:
            raise Cancelled("the live job was cancelled")
        if dom.shutdown_reason is not None and dom.shutdown_reason != SHUTDOWN_suspend:
            raise SaveError(f"the guest stopped ({domctl.shutdown_name(dom.shutdown_reason)})"
                            " during the live save")

    def run_for(self, ns: int) -> None:
        self.job.wake_at = self.mark + ns
        self._check()
        self.machine.let_run()
        while domctl.system_time(self.hv) < self.job.wake_at:
            self._check()
            self.machine.let_run()
        self._check()
        self.job.wake_at = None
        self.mark = domctl.system_time(self.hv)

    def suspend(self) -> None:
        dom, st = self.job.dom, self.state
        assert dom is not None
        now = domctl.system_time(self.hv)
        libxl.make_request(self.hv, dom, st, Request(now, command="suspend"))
        deadline = now + libxl.SUSPEND_TIMEOUT_NS
        while dom.shutdown_reason != SHUTDOWN_suspend:
            self._check()
            now = domctl.system_time(self.hv)
            if libxl.check_acknowledged(self.hv, dom, st, now):
                raise SaveError(libxl.why_not_suspended("", True, self.time_words))
            if now >= deadline:
                cancel_shutdown(self.hv, dom)
                st.ack_deadline = None
                raise SaveError(libxl.why_not_suspended("", False, self.time_words))
            self.job.wake_at = min(deadline, st.ack_deadline or deadline)
            self.machine.let_run()
        self.job.wake_at = None
        st.ack_deadline = None
        self.suspended()


def wire(f: BinaryIO, machine: Machine) -> BinaryIO:
    """``f`` with the machine given back while it is written or read."""
    return Unheld(f, machine)  # type: ignore[return-value]


__all__ = ["Cancelled", "DaemonLive", "LiveJob", "Machine", "Unheld", "start", "unheld",
           "wire"]
