"""Remus on the primary (Cully et al., NSDI 2008; Xen's libxl_remus.c and
``xl remus``): the guest's state streamed to a backup in epochs, and its
output to the world held until the epoch that produced it has committed
there (the output commit).

Each epoch: the guest suspended through the save's path, CLEAN(FINAL), the
pages dirtied since the last epoch, its TSC, shared info and VCPUs,
CHECKPOINT, libxl's records and CHECKPOINT_END (save.write_checkpointed_
stream); then the guest resumes cancelled (its suspend hypercall returns 1:
THAW) and runs for the interval while the backup applies the epoch.

Output commit. The console is this guest's "network": what the console
backend takes from the guest's ring during an epoch is held in an
OutputBuffer (libxl_netbuffer.c's plug qdisc: ``start_new_epoch`` at each
suspend, ``release_one`` at commit). Xen's libxl releases an epoch as soon
as it has *written* CHECKPOINT_END; pvlab does what the Remus paper does:
the backup acknowledges each epoch it has committed on the same connection
(an ACK of 8 octets: "RACK", the epoch as u32), and the primary releases
the epoch's output only when that acknowledgement has arrived. So nothing a
failover could take back is ever seen. The output channel tells the backup
each epoch's held output and each release, as REMUS_OUTPUT records (pvlab's
own optional libxc record) between the stream's records on the same
connection: after a failover the backup shows the committed output the
primary never let out. One connection carries it all, so the backup can
be ``ssh HOST pvlab migrate-receive -r`` as xl's rune runs it.

If the backup fails (the connection breaks, or it closes it) the primary
says "Backup failed? resuming domain at primary." as xl does, resumes the
guest if it is suspended, releases what it held (no backup can take it back
now) and the guest runs on alone.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.toolstack import libxl
from hypervisor.toolstack.control import Request, resume_cancelled
from hypervisor.toolstack.image import ImageError
from hypervisor.toolstack.livejob import Cancelled, DaemonLive, LiveJob, Machine
from hypervisor.toolstack.migrate import (
    INCOMING,
    MIGRATE_RECEIVER_BANNER,
    Channel,
    MigrateError,
    Prefixed,
    incoming_header,
    read_fixed_message,
    write_message,
)
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions
from hypervisor.toolstack.restore import RestoreError, receive_checkpoints
from hypervisor.toolstack.save import Report, SaveError, write_checkpointed_stream
from hypervisor.toolstack.session import LiveRun, RunResult, run_domain
from hypervisor.toolstack.stream import REMUS_OUTPUT, Record, StreamError, write_record
from hypervisor.toolstack.timeparse import format_duration

log = logging.getLogger(__name__)

ACK = struct.Struct("<4sI")            # the backup's acknowledgement: magic, epoch
ACK_MAGIC = b"RACK"
OUTPUT = struct.Struct("<4sII")        # a REMUS_OUTPUT record: magic, epoch, octets after it
OUTPUT_HELD = b"RHLD"                  # an epoch's output as it closed, held at the primary
OUTPUT_RELEASED = b"RREL"              # the epoch's output is out at the primary
DEFAULT_INTERVAL_NS = 200_000_000      # xl remus -i: 200 ms
BACKUP_FAILED = "Backup failed? resuming domain at primary."
SUSPEND_FAILED = "Failed to suspend domain at primary."
PRIMARY_DESTROYED = "Primary domain has been destroyed."

Sink = Callable[[Domain, bytes], None]


class BackupFailed(Exception):
    """The backup is gone or spoke out of turn: the primary runs on alone."""


def write_ack(out: BinaryIO, epoch: int) -> None:
    """The backup's side: epoch ``epoch`` is committed (sent on the stream's
    connection, back to the primary)."""
    out.write(ACK.pack(ACK_MAGIC, epoch))
    out.flush()


def read_ack(src: BinaryIO, epoch: int) -> None:
    """Wait for the backup's acknowledgement of ``epoch``; BackupFailed if the
    connection ends or breaks, or the acknowledgement is not that epoch's."""
    try:
        data = src.read(ACK.size)
    except OSError as e:
        raise BackupFailed(f"reading the backup's acknowledgement: {e.strerror or e}") from None
    if not data or len(data) < ACK.size:
        raise BackupFailed(f"the backup closed the connection before acknowledging epoch "
                           f"{epoch}")
    magic, got = ACK.unpack(data)
    if magic != ACK_MAGIC or got != epoch:
        raise BackupFailed(f"the backup acknowledged {magic!r} epoch {got}, not epoch {epoch}")


@dataclass
class OutputBuffer:
    """The guest's console output held per epoch (libxl_netbuffer.c's plug
    qdisc): ``hold`` takes what the console backend gives, ``start_new_epoch``
    closes the epoch being produced (at its suspend), ``release_one`` lets an
    epoch's output out once the backup has committed it. Each closed epoch's
    output and each release are also told to the backup on ``log`` (the
    output channel: REMUS_OUTPUT records on the stream's own connection,
    between the stream's records), so that a failover prints what the
    primary never did."""

    sink: Sink
    dom: Domain | None = None
    log: BinaryIO | None = None
    producing: bytearray = field(default_factory=bytearray)
    closed: list[tuple[int, bytes]] = field(default_factory=list)  # (epoch, output)
    epoch: int = 0
    released: int = 0         # octets let out

    def hold(self, dom: Domain, data: bytes) -> None:
        self.dom = dom
        self.producing += data

    def start_new_epoch(self) -> None:
        data = bytes(self.producing)
        self.closed.append((self.epoch, data))
        self._tell(OUTPUT_HELD, self.epoch, data)
        self.producing.clear()
        self.epoch += 1

    def release_one(self, epoch: int) -> None:
        """The output of every closed epoch up to ``epoch``: the backup told
        first, then the output let out. Whoever acts on what they saw (kills
        the primary, say) acts after the backup knew; a kill between the
        two would lose the epoch's output, never show it twice."""
        self._tell(OUTPUT_RELEASED, epoch, b"")
        while self.closed and self.closed[0][0] <= epoch:
            self._out(self.closed.pop(0)[1])

    def release_all(self) -> None:
        """Everything held: no backup can take it back any more."""
        while self.closed:
            self._out(self.closed.pop(0)[1])
        self._out(bytes(self.producing))
        self.producing.clear()

    def _out(self, data: bytes) -> None:
        if data and self.dom is not None:
            self.sink(self.dom, data)
            self.released += len(data)

    def _tell(self, magic: bytes, epoch: int, data: bytes) -> None:
        """One REMUS_OUTPUT record, flushed with the stream before it; a
        connection that broke is left (the stream's next write says the
        backup is gone)."""
        if self.log is None:
            return
        try:
            write_record(self.log, REMUS_OUTPUT, OUTPUT.pack(magic, epoch, len(data)) + data)
            self.log.flush()
        except OSError as e:
            log.info("the output channel: %s", e)
            self.log = None


class OutputLog:
    """The backup's end of the output channel: each epoch's held output and
    the last epoch the primary released, taken from the REMUS_OUTPUT records
    as the stream brings them (restore.receive_checkpoints' on_optional)."""

    def __init__(self) -> None:
        self.held: dict[int, bytes] = {}
        self.released = -1

    def take(self, rec: Record) -> None:
        """One optional record: a REMUS_OUTPUT is kept, any other skipped."""
        if rec.type != REMUS_OUTPUT or len(rec.body) < OUTPUT.size:
            return
        magic, epoch, n = OUTPUT.unpack_from(rec.body)
        data = rec.body[OUTPUT.size:OUTPUT.size + n]
        if magic == OUTPUT_HELD and len(data) == n:
            self.held[epoch] = data
        elif magic == OUTPUT_RELEASED:
            self.released = max(self.released, epoch)

    def unreleased(self, committed: int) -> bytes:
        """After a failover from epoch ``committed``: the output of the
        committed epochs the primary never let out (the guest resumed here
        has already produced it, so only this side can show it)."""
        return b"".join(self.held.get(e, b"") for e in range(self.released + 1, committed + 1))


class RemusPrimary(LiveRun):
    """The checkpointed save's callbacks for a scripted run (save.Checkpoint
    Callbacks): the guest runs in this process, its output into the buffer;
    each epoch commits when the backup's acknowledgement arrives on
    ``acks``."""

    def __init__(self, hv: Hypervisor, dom: Domain, now_ns: int, buffer: OutputBuffer,
                 acks: BinaryIO, interval_ns: int, until_ns: int | None = None) -> None:
        super().__init__(hv, dom, now_ns, buffer.hold, None)
        self.buffer, self.acks, self.interval_ns = buffer, acks, interval_ns
        self.until_ns = until_ns
        self.committed = -1

    def suspend(self) -> None:
        super().suspend()
        self.buffer.start_new_epoch()  # the NIC's postsuspend: plug a new epoch

    def postcopy(self) -> None:
        """libxl__remus_domain_resume_callback: resumed cancelled (THAW)."""
        resume_cancelled(self.hv, self.dom)

    def checkpoint(self, epoch: int) -> bool:
        """remus_checkpoint_stream_written, then the interval: the epoch's
        output released once the backup acknowledges it. False once the
        guest has shut down or reached ``until_ns``."""
        commit(self.buffer, self.acks, epoch)
        self.committed = epoch
        self.now_ns += self.interval_ns
        self.result = run_domain(self.hv, self.dom, self.now_ns, self.sink,
                                 on_suspend=lambda d: False)
        if self.until_ns is not None and self.now_ns >= self.until_ns:
            return False
        return self.result.reason == "running"


def commit(buffer: OutputBuffer, acks: BinaryIO, epoch: int) -> None:
    """The epoch's output commit (libxl_remus.c's remus_checkpoint_stream_
    written, with the paper's wait): the backup's acknowledgement awaited,
    then the epoch's output let out."""
    read_ack(acks, epoch)
    buffer.release_one(epoch)


class DaemonRemus(DaemonLive):
    """The checkpointed save's callbacks for a domain of the daemon: the
    guest runs in the daemon's loop for the interval (livejob.DaemonLive),
    its console output into the buffer meanwhile; ``on_commit(epoch)`` tells
    each committed epoch (the daemon's REMUS_CHECKPOINT event). ``stop``
    ends the stream cleanly at the next epoch (the backup destroys its copy;
    the guest runs on here)."""

    def __init__(self, machine: Machine, hv: Hypervisor, job: LiveJob,
                 state: libxl.DomainState, time_words: str, buffer: OutputBuffer,
                 acks: BinaryIO, interval_ns: int, on_commit: Callable[[int], None]) -> None:
        super().__init__(machine, hv, job, state, time_words, buffer.start_new_epoch)
        self.buffer, self.acks, self.interval_ns = buffer, acks, interval_ns
        self.on_commit = on_commit
        self.committed = -1
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True

    def postcopy(self) -> None:
        """libxl__remus_domain_resume_callback: resumed cancelled (THAW)."""
        assert self.job.dom is not None
        resume_cancelled(self.hv, self.job.dom)

    def checkpoint(self, epoch: int) -> bool:
        """The epoch committed, then the interval run in the daemon's loop.
        False once the guest has shut down meanwhile, or ``stop`` was asked."""
        commit(self.buffer, self.acks, epoch)
        self.committed = epoch
        self.on_commit(epoch)
        if self.stopping:
            return False
        try:
            self.run_for(self.interval_ns)
        except Cancelled:
            raise
        except SaveError:   # the guest stopped (powered off, crashed) meanwhile
            return False
        return not self.stopping


class Primary(Protocol):
    """A primary's callbacks as replicate drives them."""

    committed: int

    def suspend(self) -> None: ...
    def run_for(self, ns: int) -> None: ...
    def postcopy(self) -> None: ...
    def checkpoint(self, epoch: int) -> bool: ...


@dataclass
class RemusOutcome:
    """How a Remus run ended on the primary."""

    result: RunResult | None
    info: MigrationInfo | None = None
    epochs: int = 0            # committed on the backup
    error: str = ""            # why replication stopped early ("" if it did not)
    line: str = ""             # xl's line for it (BACKUP_FAILED, SUSPEND_FAILED)


def replicate(hv: Hypervisor, dom: Domain, out: BinaryIO, acks: BinaryIO, primary: Primary,
              buffer: OutputBuffer, opts: PrecopyOptions | None = None,
              seed: int | None = None, say: Callable[[str], None] | None = None,
              report: Report | None = None,
              cancelled: Callable[[], bool] = lambda: False) -> RemusOutcome:
    """libxl_domain_remus_start's loop and its end: the checkpointed stream
    into ``out``, each epoch committed by the backup's acknowledgement on
    ``acks``. A backup that fails, or a guest that does not suspend, is
    xl's line (said) and the guest resumed if it is suspended; then
    everything held is let out, unless the job was ``cancelled`` (the
    primary destroyed: what it held dies with it, the backup has the
    committed part of it)."""
    tell = say or (lambda _m: None)
    outcome = RemusOutcome(None)
    try:
        outcome.info = write_checkpointed_stream(hv, dom, out, primary,
                                                 opts or PrecopyOptions(), seed, report)
        read_ack(acks, primary.committed + 1)  # the backup has let the stream go
    except (OSError, BackupFailed, SaveError) as e:
        outcome.error = str(e) or type(e).__name__
        if not cancelled():
            outcome.line = SUSPEND_FAILED if isinstance(e, SaveError) else BACKUP_FAILED
            tell(outcome.line)
    outcome.epochs = primary.committed + 1
    if dom.shutdown_reason == SHUTDOWN_suspend:
        resume_cancelled(hv, dom)
    if not cancelled():
        buffer.release_all()
    return outcome


def remus_domain(hv: Hypervisor, dom: Domain, out: BinaryIO, acks: BinaryIO, now_ns: int,
                 sink: Sink, interval_ns: int = DEFAULT_INTERVAL_NS,
                 opts: PrecopyOptions | None = None, until_ns: int | None = None,
                 note: Callable[[str], None] | None = None,
                 seed: int | None = None, output_log: BinaryIO | None = None) -> RemusOutcome:
    """libxl_domain_remus_start for a scripted run: replicate with the
    guest in this process, its output to ``sink`` only as its epochs
    commit (and told to the backup on ``output_log``, the output channel).
    Returns when the guest has shut down (the stream ended cleanly,
    everything released) or, if the backup failed or the guest could not be
    suspended, after the guest has run on alone to its end (or ``until_ns``)."""
    buffer = OutputBuffer(sink, dom, output_log)
    primary = RemusPrimary(hv, dom, now_ns, buffer, acks, interval_ns, until_ns)
    outcome = replicate(hv, dom, out, acks, primary, buffer, opts, seed, note)
    outcome.result = primary.result
    if outcome.error and dom.shutdown_reason is None:
        outcome.result = run_domain(hv, dom, until_ns, sink, note=note)
    return outcome


def remus_run(hv: Hypervisor, dom: Domain, at_ns: int, connect: Callable[[], Channel],
              sink: Sink, interval_ns: int = DEFAULT_INTERVAL_NS,
              until_ns: int | None = None, note: Callable[[str], None] | None = None,
              requests: Sequence[Request] = ()) -> RemusOutcome:
    """``xl remus`` in a scripted run: the domain runs to ``at_ns`` (making
    the requests before it), then the connection to the backup, its banner
    (xl's; no other handshake, as xl's remus rune has none) and
    remus_domain. A backup that cannot be reached or says something else
    is a failed backup: said, and the guest runs on alone. ``connect`` gives
    the one connection (TCP, or the ssh rune's child): the stream with the
    output channel's records in it, the acknowledgements back."""
    say = note or (lambda _m: None)
    result = run_domain(hv, dom, at_ns, sink, [r for r in requests if r.at_ns < at_ns], note)
    if result.reason != "running":
        return RemusOutcome(result, error=f"the guest shut down ({result.reason}) before "
                                          "Remus started")
    say(f"at {format_duration(at_ns)}: Remus to the backup, an epoch every "
        f"{format_duration(interval_ns)}; the guest's output waits for its epoch's commit")
    try:
        ch = connect()
    except OSError as e:
        say(f"remus: cannot reach the backup: {e.strerror or e}")
        say(BACKUP_FAILED)
        return RemusOutcome(run_domain(hv, dom, until_ns, sink, note=note), error=str(e))
    try:
        read_fixed_message(ch, MIGRATE_RECEIVER_BANNER, "banner")
        out = remus_domain(hv, dom, ch.writer, ch.reader, at_ns, sink, interval_ns,
                           until_ns=until_ns, note=note, output_log=ch.writer)
    except (MigrateError, OSError) as e:
        say(f"remus: {e}")
        say(BACKUP_FAILED)
        out = RemusOutcome(run_domain(hv, dom, until_ns, sink, note=note), error=str(e))
    finally:
        ch.close()
    return out


# --- the backup ---------------------------------------------------------------------

@dataclass
class Backup:
    """What the backup holds when the primary's stream ends: the domain
    completed from the last committed epoch, and whether it is to run
    (``failover``: the primary is gone) or not (the stream ended cleanly)."""

    hv: Hypervisor
    dom: Domain
    failover: bool
    epochs: int
    why: str = ""
    output: bytes = b""   # committed output the primary never let out: show it first


def _acknowledge(ch: Channel, epoch: int) -> None:
    """An epoch committed here: tell the primary (which releases its
    output). A primary that is gone cannot hear it; the stream's end says so."""
    try:
        write_ack(ch.writer, epoch)
    except OSError as e:
        log.info("acknowledging epoch %d: %s", epoch, e)


def remus_receive(ch: Channel, seed: int | None = None, clock: str = "deterministic",
                  say: Callable[[str], None] | None = None) -> Backup | None:
    """``xl migrate-receive -r``: the banner, the stream received as
    NAME--incoming, each committed epoch acknowledged. When the stream
    breaks (the primary died): "Remus Failover for domain N", the domain
    renamed to NAME and returned ready to run its RESTORE path, with the
    committed output the primary had not let out (from the output channel's
    REMUS_OUTPUT records in the stream). When it
    ends cleanly (the guest shut down at the primary): the end
    acknowledged, our copy destroyed, None. MigrateError, one line, if no
    epoch ever committed (nothing is left)."""
    tell = say or (lambda _m: None)
    tell("migration target (Remus): Ready to receive domain.")
    output = OutputLog()
    try:
        write_message(ch, MIGRATE_RECEIVER_BANNER, "banner")
        head, name = incoming_header(ch.reader)
        hv, dom, stats = receive_checkpoints(Prefixed(head, ch.reader), seed, clock,
                                             on_commit=lambda e: _acknowledge(ch, e),
                                             on_optional=output.take)
    except (OSError, ImageError, RestoreError, StreamError) as e:
        raise MigrateError(f"migration target (Remus): {e}") from None
    if not stats.failover:
        _acknowledge(ch, stats.epochs)
        libxl.destroy_domain(hv, dom)
        tell(f"Remus: the primary ended the replication after {stats.epochs} epochs; our "
             "copy is destroyed")
        return None
    unreleased = output.unreleased(stats.epochs - 1)
    tell(f"Remus Failover for domain {dom.domid}")
    try:
        libxl.rename_domain(hv, dom, dom.name, name)
    except libxl.LibxlError as e:
        tell(f"Remus: cannot rename {name}{INCOMING} to {name}: {e}; it runs as it is")
    return Backup(hv, dom, True, stats.epochs, stats.why, unreleased)


__all__ = ["ACK", "OUTPUT", "Backup", "BackupFailed", "DaemonRemus", "OutputBuffer",
           "OutputLog", "RemusOutcome", "RemusPrimary", "commit", "read_ack", "remus_domain",
           "remus_receive", "replicate",
           "remus_run", "write_ack"]
