"""xl migrate's handshake (tools/xl/xl_migrate.c, its messages in xl.h):
the sender ``migrate_domain`` and the receiver ``migrate_receive``, over any
connection (transport.py makes them: ssh's pipes, a TCP socket).

    receiver                                   sender
    banner (no NUL)               ---------->  read: else the guest never suspends
                                  <----------  the stream: xl's header and config,
                                               libxl's stream around a live save
    domain built *paused*, named NAME--incoming
    "domain received, ready to unpause"  ---->
                                               renames its copy NAME--migratedaway
                                  <----------  "domain is yours, you are cleared
                                               to unpause": the point of no return
    renames NAME--incoming to NAME, unpauses (unless paused is asked)
    "my copy unpause results are as follows" + one octet (0: running) ---->
                                               0: destroys its copy
    (not 0: destroys its copy, then   ---->    renames back, resumes its copy
     "domain is yours, ..." back)              cancelled (the suspend returns 1)

The three messages after the banner go with their NUL, as xl sends them.

After a switch to post-copy (Otto's xl, postcopy.py has the stream) neither
the ready message nor GO is sent: the domain starts at the target at the
transition, and once every page is there the target says "postcopy
migration completed successfully" (with its NUL), renames its copy NAME and
the sender destroys its own. A failure after the transition can leave the
guest running at the target: the sender keeps its copy suspended, renamed
NAME--postcopy-inconsistent, says Otto's warning and never resumes it. A
dropped connection pauses both sides (QEMU's postcopy-paused) and a new one
resumes the post-copy: the receiver's banner, then postcopy.py's resume
handshake (``resume_postcopy``, ``push_postcopy`` at the sender;
``receive_resume``, ``postcopy_recovery`` at the receiver).
Every failure before the point of no return leaves the guest running at the
source (resumed cancelled if it had suspended, THAW) and nothing at the
target; after it the sender says xl's warning and keeps its copy renamed and
suspended, for a person to decide. One departure from xl: a GO write that
fails outright (EPIPE, ECONNRESET: the receiver is gone and cannot have read
it) resumes the source, where xl gives up the domain as undefined.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.toolstack import balloonctl, libxl, postcopy, savefile
from hypervisor.toolstack.control import resume_cancelled
from hypervisor.toolstack.image import ImageError
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions
from hypervisor.toolstack.restore import RestoreError, RestoreStats, restore_stream
from hypervisor.toolstack.save import (
    LiveCallbacks,
    Progress,
    Report,
    SaveError,
    end_live_stream,
    start_live_stream,
    write_image_live,
)
from hypervisor.toolstack.stream import StreamError

log = logging.getLogger(__name__)

# xl.h's four messages, byte for byte
MIGRATE_RECEIVER_BANNER = b"xl migration receiver ready, send binary domain data.\n"
MIGRATE_RECEIVER_READY = b"domain received, ready to unpause\0"
MIGRATE_PERMISSION_TO_GO = b"domain is yours, you are cleared to unpause\0"
MIGRATE_REPORT = b"my copy unpause results are as follows\0"
# Otto's post-copy xl (xl.h there): the target's word that every page is in
MIGRATE_POSTCOPY_SYNC = b"postcopy migration completed successfully\0"

INCOMING = "--incoming"        # the receiver's copy until GO
MIGRATED_AWAY = "--migratedaway"  # the sender's copy from the ready message on
POSTCOPY_INCONSISTENT = "--postcopy-inconsistent"  # the sender's after a failed post-copy
ERROR_FAIL = -3                # libxl's; the report octet is its negation
# a write that fails with these reached no one: the other end is gone
GONE = (errno.EPIPE, errno.ECONNRESET)

# xl's warning after GO, in one line
FAILED_BADLY = ("** Migration failed during final handshake ** Domain state is now undefined! "
                "Please CHECK AT BOTH ENDS for running instances, before renaming and resuming "
                "at most one instance. Two simultaneous instances of the domain would probably "
                "result in SEVERE DATA LOSS and it is now your responsibility to avoid that.")

# Otto's xl after a failure past the post-copy transition, in one line
FAILED_POSTCOPY = ("** Migration failed during memory postcopy ** It's possible that the guest "
                   "has executed/is executing at the destination, so resuming it here now may "
                   "be unsafe.")

Say = Callable[[str], None]
Connect = Callable[[], "Channel"]
# a scripted source's resumes of a dropped post-copy at the same target
RESUME_TRIES = 3
RESUME_WAIT_S = 1.0   # between two tries (host time)
END_WAIT_S = 30.0     # a target with every page waits this long for a resume to end the stream


class MigrateError(Exception):
    """The migration failed; the message is its one line."""


@dataclass
class Channel:
    """The migration's connection as xl holds it: ``reader`` (its recv_fd:
    what the other end says) and ``writer`` (its send_fd). ``rune`` is the
    command run for it (xl quotes it when the banner is wrong), None for a
    socket or this process's stdin and stdout; ``closer`` ends the
    transport, given whether to wait for the command's process to exit."""

    reader: BinaryIO
    writer: BinaryIO
    rune: str | None = None
    closer: Callable[[bool], None] | None = None

    def close(self, wait: bool = True) -> None:
        """close(send_fd), then the transport's end: with ``wait``, a short
        wait for the command's exit status (migration_child_report; xl
        waits only when it failed: a receiver that succeeded runs on)."""
        for f in (self.writer, self.reader):
            try:
                f.close()
            except OSError:
                pass  # a writer whose buffer cannot be flushed any more
        if self.closer is not None:
            self.closer(wait)


def _stream_name(ch: Channel) -> str:
    return "migration receiver stream" if ch.rune else "migration stream"


def read_fixed_message(ch: Channel, msg: bytes, what: str) -> None:
    """migrate_read_fixedmessage: exactly ``msg`` next on the reader, else a
    MigrateError in xl's words (libxl_read_exactly's for a short read)."""
    stream = _stream_name(ch)
    try:
        got = _read_exactly(ch.reader, len(msg))
    except OSError as e:
        raise MigrateError(f"{stream}: error reading {what}: {e.strerror or e}") from None
    if len(got) < len(msg):
        raise MigrateError(f"file/stream truncated reading {what} from {stream}")
    if got != msg:
        rune = f" (command run was: {ch.rune} )" if ch.rune else ""
        raise MigrateError(f"{stream} contained unexpected data instead of {what}{rune}")


def _read_exactly(reader: BinaryIO, n: int) -> bytes:
    parts, want = [], n
    while want > 0:
        data = reader.read(want)
        if not data:
            break
        parts.append(data)
        want -= len(data)
    return b"".join(parts)


def write_message(ch: Channel, msg: bytes, what: str) -> None:
    """libxl_write_exactly, flushed: OSError if it could not be written."""
    try:
        ch.writer.write(msg)
        ch.writer.flush()
    except OSError as e:
        log.info("writing %s: %s", what, e)
        raise


# --- the sender ----------------------------------------------------------------------

@dataclass
class MigrateOutcome:
    """What came of ``migrate_domain``. ``ok``: the guest runs at the target
    and its copy here is destroyed. Otherwise ``runs_on`` says whether the
    guest runs on here (resumed cancelled, or never suspended); ``undefined``
    that the handshake failed after GO (the copy here stays suspended and
    renamed NAME--migratedaway); ``error`` is xl's last line."""

    ok: bool = False
    runs_on: bool = True
    undefined: bool = False
    error: str = ""
    info: MigrationInfo | None = None
    lines: list[str] = field(default_factory=list)
    # a post-copy's push, kept when it failed: what is still to send and
    # where the pages come from, for a push resumed on a new connection
    postcopy: postcopy.PostcopySource | None = None
    pages: postcopy.PageSource | None = None


class _Sender:
    """One migrate_domain: what it says, and its three ways to fail."""

    def __init__(self, hv: Hypervisor, dom: Domain, ch: Channel, say: Say | None) -> None:
        self.hv, self.dom, self.ch = hv, dom, ch
        self.name = dom.name
        self.out = MigrateOutcome()
        self._say = say

    def say(self, line: str) -> None:
        self.out.lines.append(line)
        log.info("%s", line)
        if self._say is not None:
            self._say(line)

    def failed_resume(self, why: str) -> MigrateOutcome:
        """Before GO: the copy here runs on, resumed cancelled if it had
        suspended (xl's failed_resume; a guest that never suspended is xl's
        failed_suspend or preamble exit: nothing to resume)."""
        self.say(why)
        self.ch.close()
        dom = self.dom
        if dom.name != self.name:
            libxl.rename_domain(self.hv, dom, dom.name, self.name)
        if dom.shutdown_reason == SHUTDOWN_suspend:
            resume_cancelled(self.hv, dom)
            self.out.error = "Migration failed, resuming at sender."
        elif dom.shutdown_reason is None:
            self.out.error = "Migration failed; the domain never suspended and runs on."
        else:
            self.out.runs_on = False
            self.out.error = "Migration failed; the domain shut down at the sender."
        self.say(self.out.error)
        return self.out

    def failed_badly(self, why: str) -> MigrateOutcome:
        """After GO: nothing is done; the copy here stays renamed and suspended."""
        self.say(why)
        self.out.runs_on = False
        self.out.undefined = True
        self.out.error = FAILED_BADLY
        self.say(FAILED_BADLY)
        self.say(f"migration sender: the copy here stays suspended as {self.dom.name}")
        self.ch.close()
        return self.out

    def failed_postcopy(self, why: str) -> MigrateOutcome:
        """After the post-copy transition: the copy here renamed
        NAME--postcopy-inconsistent and kept suspended, never resumed; its
        push state kept in the outcome for a resume (postcopy-paused)."""
        self.say(why)
        dom = self.dom
        if dom.name != self.name + POSTCOPY_INCONSISTENT:
            try:
                libxl.rename_domain(self.hv, dom, dom.name, self.name + POSTCOPY_INCONSISTENT)
            except libxl.LibxlError as e:
                self.say(f"migration sender: {e}")
        self.out.ok = self.out.runs_on = False
        self.out.undefined = True
        self.out.error = FAILED_POSTCOPY
        self.say(FAILED_POSTCOPY)
        self.say(f"migration sender: the copy here stays suspended as {dom.name}; its "
                 "post-copy is paused and can be resumed")
        self.ch.close()
        return self.out

    def status(self, status: str, report: Report | None) -> None:
        """query-migrate's status changed: told to ``report``."""
        info = self.out.info
        assert info is not None
        info.status = status
        if report is not None:
            report(info)


def migrate_domain(hv: Hypervisor, dom: Domain, ch: Channel, callbacks: LiveCallbacks,
                   opts: PrecopyOptions | None = None, seed: int | None = None,
                   report: Report | None = None, say: Say | None = None,
                   switch: Callable[[], bool] | None = None,
                   reconnect: Connect | None = None) -> MigrateOutcome:
    """xl's migrate_domain on a running domain: the receiver's banner, the
    stream (a live save: ``callbacks`` run the guest between rounds and
    suspend it, as save.write_image_live takes them), the ready message, the
    rename to NAME--migratedaway, GO, the receiver's report, then the copy
    here destroyed, or resumed if the target failed. ``report`` sees the
    rounds' progress, ``say`` xl's lines. The channel is closed at the end.
    With ``opts.postcopy`` the stream switches to post-copy where the policy
    stops (migrate_postcopy); ``switch``, asked between the rounds, may ask
    for the switch sooner (QEMU's migrate-start-postcopy); a drop after the
    switch is resumed on ``reconnect``'s connections, RESUME_TRIES at most,
    if given."""
    s = _Sender(hv, dom, ch, say)
    try:
        read_fixed_message(ch, MIGRATE_RECEIVER_BANNER, "banner")
    except MigrateError as e:
        return s.failed_resume(str(e))
    opts = opts or PrecopyOptions()
    if opts.postcopy or switch is not None:
        return migrate_postcopy(s, callbacks, opts, seed, report, switch, reconnect)
    try:
        s.out.info = write_image_live(hv, dom, ch.writer, callbacks, opts, seed, report,
                                      digest=False)
        ch.writer.flush()
    except (SaveError, OSError) as e:
        return s.failed_resume(_suspend_failed(e))
    return _handshake(s)


def _suspend_failed(e: Exception) -> str:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"migration sender: libxl_domain_suspend failed: {why}"


def migrate_postcopy(s: _Sender, callbacks: LiveCallbacks, opts: PrecopyOptions,
                     seed: int | None, report: Report | None,
                     switch: Callable[[], bool] | None = None,
                     reconnect: Connect | None = None) -> MigrateOutcome:
    """The stream to its post-copy transition (any failure so far resumes
    the guest here), then the pages pushed and asked for until the target
    has them all (``push_postcopy``), END, the target's word, and the copy
    here destroyed. If the rounds end without the switch (no
    ``opts.postcopy``, and ``switch`` never asked for it), the migration
    ends as a pre-copy one."""
    hv, dom, ch = s.hv, s.dom, s.ch
    try:
        ls = start_live_stream(hv, dom, ch.writer, callbacks, opts, seed, report, switch)
        s.out.info = ls.info
        if not ls.to_postcopy:
            end_live_stream(ls)
            ch.writer.flush()
            return _handshake(s)
        src = postcopy.switch_to_postcopy(ls)
    except (SaveError, OSError, ValueError) as e:
        return s.failed_resume(_suspend_failed(e))
    s.say(f"migration sender: Post-copy: switched; the guest starts at the target, "
          f"{src.remaining()} pages follow.")
    s.out.postcopy, s.out.pages = src, postcopy.DomainPages(hv, dom, ls.p2m)
    return push_postcopy(s, postcopy.Link(ch.reader, ch.writer), report, reconnect)


def push_postcopy(s: _Sender, link: postcopy.Link, report: Report | None,
                  reconnect: Connect | None = None) -> MigrateOutcome:
    """The push on ``link`` to its end. A drop, or any other failure (a page
    unreadable here), pauses it (postcopy-paused:
    the copy here kept suspended, the push state in the outcome); with
    ``reconnect``, up to RESUME_TRIES new connections after each drop are
    offered a resume (``_resume``) and the push goes on on the first taken."""
    out = s.out
    assert out.postcopy is not None and out.pages is not None
    while True:
        try:
            postcopy.push(out.pages, link, out.postcopy, report)
            return _postcopy_complete(s, link, report, reconnect)
        except postcopy.Refused as e:
            return _refused(s, str(e), report)
        except Exception as e:  # any failure: the guest runs there, never resumed here
            why = postcopy.refusal(link) if isinstance(e, postcopy.Dropped) else ""
            if why:
                return _refused(s, why, report)
            if not isinstance(e, (postcopy.Dropped, StreamError, SaveError)):
                log.exception("post-copy push failed")
            assert out.info is not None
            out.info.error = str(e) or type(e).__name__
            s.status("postcopy-paused", report)
            s.failed_postcopy(f"migration sender: post-copy failed: {out.info.error}")
        if reconnect is None:
            return out
        resumed = _resume(s, reconnect, report)
        for _ in range(RESUME_TRIES - 1):
            if resumed is not None:
                break
            time.sleep(RESUME_WAIT_S)  # a network that dropped may need a moment
            resumed = _resume(s, reconnect, report)
        if resumed is None:
            return out
        link = resumed


def _resume(s: _Sender, connect: Connect, report: Report | None) -> postcopy.Link | None:
    """One try at a paused post-copy's resume (QEMU's migrate resume=true):
    a connection (postcopy-recover-setup), the banner, the handshake
    (postcopy-recover: the pages lost in flight to send again), then
    postcopy-active. None, still paused, if it failed (said in one line)."""
    s.status("postcopy-recover-setup", report)
    try:
        ch = connect()
    except OSError as e:
        s.say(f"migration sender: cannot reach the target to resume: {e.strerror or e}")
        s.status("postcopy-paused", report)
        return None
    s.ch = ch
    try:
        read_fixed_message(ch, MIGRATE_RECEIVER_BANNER, "banner")
        s.status("postcopy-recover", report)
        link = postcopy.Link(ch.reader, ch.writer)
        assert s.out.postcopy is not None
        lacked, lost = postcopy.resume_source(link, s.out.postcopy, s.name)
    except (MigrateError, postcopy.Dropped, StreamError) as e:
        s.say(f"migration sender: the target refused the resume: {e}")
        ch.close()
        s.status("postcopy-paused", report)
        return None
    s.say(f"migration sender: Post-copy resumed: the target lacks {lacked} pages, {lost} of "
          "them sent before the drop and sent again.")
    s.out.error = ""
    s.status("postcopy-active", report)
    return link


def _end_stream(s: _Sender, link: postcopy.Link) -> None:
    postcopy.end_stream(link)
    if link.read_exactly(len(MIGRATE_POSTCOPY_SYNC)) != MIGRATE_POSTCOPY_SYNC:
        s.say("migration sender: the target's word after post-copy is not xl's")


def resume_postcopy(hv: Hypervisor, dom: Domain, out: MigrateOutcome, ch: Channel,
                    report: Report | None = None, say: Say | None = None) -> MigrateOutcome:
    """``migrate --resume``: a paused post-copy (``out``, the failed
    migration's outcome, its push state kept; ``dom`` the copy here, named
    NAME--postcopy-inconsistent) resumed on the new connection ``ch``. The
    outcome is the migration's, as migrate_domain's: ok once the target has
    every page (the copy here destroyed), else paused again and resumable
    again."""
    if out.postcopy is None or out.pages is None or out.info is None:
        raise MigrateError(f"domain {dom.name} has no paused post-copy to resume")
    s = _Sender(hv, dom, ch, say)
    s.name = dom.name.removesuffix(POSTCOPY_INCONSISTENT)
    s.out = out
    link = _resume(s, lambda: ch, report)
    if link is None:
        return out
    return push_postcopy(s, link, report)


def _postcopy_complete(s: _Sender, link: postcopy.Link, report: Report | None,
                       reconnect: Connect | None = None) -> MigrateOutcome:
    """The target has every page: END, its word (tidiness, Otto's xl), the
    copy here destroyed. If the END may not have reached it, one resume
    (with ``reconnect``) lets it end its side rather than wait."""
    try:
        _end_stream(s, link)
    except postcopy.Dropped as e:
        s.say(f"migration sender: after post-copy: {e}")
        again = _resume(s, reconnect, report) if reconnect is not None else None
        if again is not None:
            assert s.out.pages is not None and s.out.postcopy is not None
            try:  # nothing is left to send: the target's COMPLETE, then the end
                postcopy.push(s.out.pages, again, s.out.postcopy)
                _end_stream(s, again)
            except (postcopy.Dropped, StreamError) as e:
                s.say(f"migration sender: after post-copy: {e}")
    libxl.destroy_domain(s.hv, s.dom)
    out = s.out
    out.postcopy = out.pages = None
    assert out.info is not None
    out.info.remaining, out.info.error = 0, ""
    s.status("completed", report)
    out.ok, out.runs_on, out.undefined, out.error = True, False, False, ""
    s.say("Migration successful.")
    s.ch.close(wait=False)
    return out


def _refused(s: _Sender, why: str, report: Report | None) -> MigrateOutcome:
    """The target refused post-copy before its transition (POSTCOPY_REFUSED
    at POSTCOPY_BEGIN): the guest never ran there, so it is resumed here
    (failed_resume)."""
    s.out.postcopy = s.out.pages = None
    assert s.out.info is not None
    s.out.info.error = f"the target refused post-copy: {why}"
    s.status("failed", report)
    return s.failed_resume(f"migration sender: the target refused post-copy: {why}")


def _handshake(s: _Sender) -> MigrateOutcome:
    """From the ready message to the end (xl's order)."""
    hv, dom, ch = s.hv, s.dom, s.ch
    try:
        read_fixed_message(ch, MIGRATE_RECEIVER_READY, "ready message")
    except MigrateError as e:
        return s.failed_resume(str(e))
    s.say("migration sender: Target has acknowledged transfer.")
    try:
        libxl.rename_domain(hv, dom, s.name, s.name + MIGRATED_AWAY)
    except libxl.LibxlError as e:
        return s.failed_resume(f"migration sender: {e}")
    s.say("migration sender: Giving target permission to start.")
    try:
        write_message(ch, MIGRATE_PERMISSION_TO_GO, "GO message")
    except OSError as e:
        if e.errno in GONE:  # no one read it: the target cannot have started
            return s.failed_resume(f"migration sender: the target is gone ({e.strerror}); "
                                   "it never had permission to start")
        return s.failed_badly(f"migration sender: writing the GO message: {e.strerror or e}")
    try:
        read_fixed_message(ch, MIGRATE_REPORT, "success/failure report message")
        code = _read_exactly(ch.reader, 1)
    except (MigrateError, OSError) as e:
        return s.failed_badly(str(e))
    if not code:
        return s.failed_badly("file/stream truncated reading success/failure status from "
                              "migration ack stream")
    if code[0]:
        return _target_failed(s, code[0])
    s.say("migration sender: Target reports successful startup.")
    libxl.destroy_domain(hv, dom)  # bang!
    s.out.ok, s.out.runs_on = True, False
    s.say("Migration successful.")
    ch.close(wait=False)
    return s.out


def _target_failed(s: _Sender, status: int) -> MigrateOutcome:
    """The target could not start its copy: it destroys it and hands the
    domain back with a second GO; the copy here is renamed back and resumed."""
    s.say(f"migration sender: Target reports startup failure (status code {status}).")
    try:
        read_fixed_message(s.ch, MIGRATE_PERMISSION_TO_GO, "permission for sender to resume")
    except MigrateError as e:
        return s.failed_badly(str(e))
    out = s.failed_resume("migration sender: Trying to resume at our end.")
    out.error = "Migration failed due to problems at target."
    s.say(out.error)
    return out


# --- the receiver --------------------------------------------------------------------

@dataclass
class Received:
    """The migrated domain, running here (paused if asked), named as at the source."""

    hv: Hypervisor
    dom: Domain
    stats: RestoreStats
    postcopy: postcopy.Pager | None = None  # its pages still coming (post-copy)


class Prefixed(io.RawIOBase):
    """``head`` then whatever ``rest`` has: the stream with its xl header
    rewritten. A read returns what is there (never waits for more than one
    read of ``rest``): the sender waits for our answer once its stream is
    out, so a read must not wait for octets that will not come."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.head, self.rest = head, rest
        self._more = getattr(rest, "read1", rest.read)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self.head:
            data, self.head = self.head[:len(view)], self.head[len(view):]
        else:
            data = self._more(len(view))
        view[:len(data)] = data
        return len(data)


def incoming_header(reader: BinaryIO) -> tuple[bytes, str]:
    """xl's header and config off the wire, the config's name made
    NAME--incoming (create_domain's migration_domname_r); returns the header
    to restore from and the source's name. MigrateError if it is no xl header
    or its config is not what a pvlab domain needs."""
    hdr = _read_exactly(reader, savefile.XL_HDR.size)
    if len(hdr) < savefile.XL_HDR.size:
        raise MigrateError("the stream ended in its xl header")
    magic, _, _, _, optlen = savefile.XL_HDR.unpack(hdr)
    if magic != savefile.XL_MAGIC or optlen > savefile.XL_OPTDATA_MAX:
        raise MigrateError("the stream does not start with an xl save file header")
    optdata = _read_exactly(reader, optlen)
    clen = savefile.XL_CONFIG_LEN.unpack_from(optdata)[0] if len(optdata) >= 4 else -1
    if len(optdata) < optlen or not 0 < clen <= optlen - 4:
        raise MigrateError("the stream ended in, or holds no config in, its xl header")
    try:
        config = json.loads(optdata[4:4 + clen].rstrip(b"\0"))
        name = config["c_info"]["name"]
        if not isinstance(name, str) or "pvlab" not in config:
            raise ValueError("no pvlab domain")
    except (ValueError, KeyError, TypeError) as e:
        raise MigrateError(f"the config in the stream's xl header cannot be used: "
                           f"{e}") from None
    config["c_info"]["name"] = name + INCOMING
    head = io.BytesIO()
    savefile.write_xl_header(head, json.dumps(config, sort_keys=True).encode(), digest=False)
    return head.getvalue(), name


class _Receiver:
    def __init__(self, ch: Channel, say: Say | None) -> None:
        self.ch, self._say = ch, say

    def say(self, line: str) -> None:
        log.info("%s", line)
        if self._say is not None:
            self._say(line)


def migrate_receive(ch: Channel, hv: Hypervisor | None = None, seed: int | None = None,
                    clock: str = "deterministic", paused: bool = False,
                    say: Say | None = None, progress: Progress | None = None,
                    started: Callable[[Received], None] | None = None,
                    refuse_postcopy: str = "",
                    loop_channel: Channel | None = None) -> Received:
    """xl's migrate_receive: the banner, the stream restored into a domain
    built paused as NAME--incoming (on ``hv``, or a machine of its own sized
    for it), the ready message, GO, the rename to NAME, the unpause (unless
    ``paused``), the report. ``started`` takes the domain in (a daemon's
    tables) before the report, so that it is there by the time the sender
    says the migration succeeded; an OSError there fails the start, as a
    failed unpause does. Returns the domain once it is this side's; on any
    failure nothing is left of it here, the sender has been told if it
    could be, and MigrateError says why in one line.

    A stream that switches to post-copy returns as soon as the domain
    starts, named NAME--incoming, with ``postcopy`` its pager: the caller
    runs the domain while its pages come (they are loaded between slices
    and when touched) and calls the pager's ``drain`` when its run ends.
    Once the last page is in, the target's word goes to the sender and the
    domain is renamed NAME; the channel is then closed. A connection that
    drops first pauses the domain and keeps it. The pager works on
    ``loop_channel`` when given (the same connection as the caller's loop
    may use it: a daemon's job reads ``ch`` through wrappers only the job
    may use). With ``refuse_postcopy`` (why not) a post-copy stream is
    refused at its POSTCOPY_BEGIN, before the transition: the sender
    resumes its copy and nothing is left here."""
    r = _Receiver(ch, say)
    r.say("migration target: Ready to receive domain.")
    try:
        write_message(ch, MIGRATE_RECEIVER_BANNER, "banner")
    except OSError as e:
        raise MigrateError(f"migration target: writing the banner: {e.strerror or e}") from None
    incoming = postcopy.Incoming(postcopy.Link(ch.reader, ch.writer), r.say, refuse_postcopy)
    got = _receive_domain(r, hv, seed, clock, progress, incoming)
    if incoming.pager is not None:
        if loop_channel is not None:
            incoming.pager.link = postcopy.Link(loop_channel.reader, loop_channel.writer)
            r.ch = loop_channel
        return _start_postcopy(r, got, incoming.pager, paused)
    r.say("migration target: Transfer complete, requesting permission to start domain.")
    try:
        write_message(ch, MIGRATE_RECEIVER_READY, "ready message")
    except OSError as e:
        libxl.destroy_domain(got.hv, got.dom)
        raise MigrateError(f"migration target: writing the ready message: "
                           f"{e.strerror or e}; our copy is destroyed") from None
    rc = _start_domain(r, got, paused, started)
    _report(r, got, rc)
    return got


def _receive_domain(r: _Receiver, hv: Hypervisor | None, seed: int | None, clock: str,
                    progress: Progress | None, incoming: postcopy.Incoming | None
                    ) -> Received:
    """create_domain from the stream, paused and named NAME--incoming."""
    try:
        head, name = incoming_header(r.ch.reader)
        r.say(f"Loading new save file <incoming migration stream> (domain {name})")
        if hv is not None and libxl.find_domain(hv, name + INCOMING) is not None:
            raise MigrateError(f'domain with name "{name + INCOMING}" already exists')
        hv2, dom, stats = restore_stream(Prefixed(head, r.ch.reader), seed, clock, hv,
                                         progress, incoming)
    except (MigrateError, ImageError, RestoreError, StreamError, OSError) as e:
        if incoming is not None:
            incoming.abandon()
        raise MigrateError(f"migration target: Domain creation failed (code {ERROR_FAIL}): "
                           f"{e}") from None
    libxl.pause(dom)
    return Received(hv2, dom, stats)


def _start_postcopy(r: _Receiver, got: Received, pager: postcopy.Pager,
                    paused: bool) -> Received:
    """The domain starts at the transition (Otto's libxl resumes it while
    the stream goes on), its balloon inhibited until the last page; at that
    last page the word to the sender and the rename (_postcopy_done)."""
    r.say(f"migration target: Post-copy: starting the domain; {pager.left} pages follow.")
    balloonctl.postcopy_inhibit(got.dom)
    if not paused:
        libxl.unpause(got.dom)
    pager.on_complete = lambda p: _postcopy_done(r, got, p)
    got.postcopy = pager
    return got


def _postcopy_done(r: _Receiver, got: Received, pager: postcopy.Pager) -> None:
    """Every page is in and the stream ended: xl's word to the sender (on
    the pager's link: a recovered post-copy's is a new one), the domain
    renamed NAME, the channels closed."""
    try:
        pager.link.write(MIGRATE_POSTCOPY_SYNC)
    except postcopy.Dropped:
        pass  # it does not matter past this point: the domain is whole here
    if pager.link.reader is not r.ch.reader:
        Channel(pager.link.reader, pager.link.writer).close(wait=False)
    r.say("migration target: Domain started successfully.")
    if got.dom.domid in got.hv.domains:
        name = got.dom.name.removesuffix(INCOMING)
        try:
            libxl.rename_domain(got.hv, got.dom, got.dom.name, name)
        except libxl.LibxlError as e:
            r.say(f"migration target: {e}")
    r.ch.close(wait=False)


def receive_resume(ch: Channel, pager: postcopy.Pager, say: Say | None = None,
                   ready: Callable[[], bool] | None = None) -> postcopy.Link:
    """The target's side of a paused post-copy's resume on a new connection
    ``ch`` (QEMU's migrate-recover): the banner, the source's resume for
    this domain (``ready``, if given, says whether it has come in time), the
    pages still lacked. Returns the link for the pager
    (``Pager.replace_link``); MigrateError if it is not that resume (the
    caller closes ``ch``: the source's sign that it was refused)."""
    name = pager.dom.name.removesuffix(INCOMING)
    link = postcopy.Link(ch.reader, ch.writer)
    try:
        write_message(ch, MIGRATE_RECEIVER_BANNER, "banner")
        if ready is not None and not ready():
            raise postcopy.Dropped("no resume came on the connection")
        pager.accept_resume(link, name)
    except (OSError, postcopy.Dropped, StreamError) as e:
        raise MigrateError(f"migration target: a resume refused: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    line = (f"migration target: Post-copy resumed: domain {pager.dom.name} unpaused, "
            f"{pager.left} pages still to come.")
    log.info("%s", line)
    if say is not None:
        say(line)
    return link


def postcopy_recovery(accept: Callable[[float | None], Channel], where: str,
                      say: Say | None = None
                      ) -> Callable[[postcopy.Pager], postcopy.Link | None]:
    """A pager's ``recover`` hook: after a drop, said in one line, the
    connections ``accept(timeout)`` gives (where: the address it listens
    on) until one resumes the post-copy; None once ``accept`` fails
    (OSError: its socket closed), the domain then left paused. A domain
    that has all it needs waits END_WAIT_S at most (its source may have
    ended already: an END lost after our COMPLETE)."""
    def recover(pager: postcopy.Pager) -> postcopy.Link | None:
        state = "paused" if pager.paused else "has all it needs"
        line = (f"migration target: domain {pager.dom.name} {state}; waiting on {where} for "
                "the source to resume its post-copy")
        log.info("%s", line)
        if say is not None:
            say(line)
        while True:
            try:
                ch = accept(END_WAIT_S if pager.unfinished else None)
            except OSError:
                return None
            try:
                return receive_resume(ch, pager, say)
            except MigrateError as e:
                if say is not None:
                    say(str(e))
                ch.close(wait=False)
    return recover


def _start_domain(r: _Receiver, got: Received, paused: bool,
                  started: Callable[[Received], None] | None) -> int:
    """GO, the rename, the unpause, ``started``: 0, or libxl's error code."""
    try:
        read_fixed_message(r.ch, MIGRATE_PERMISSION_TO_GO, "GO message")
    except MigrateError as e:
        r.say(f"migration target: {e}")
        return ERROR_FAIL
    r.say("migration target: Got permission, starting domain.")
    name = got.dom.name.removesuffix(INCOMING)
    try:
        libxl.rename_domain(got.hv, got.dom, got.dom.name, name)
    except libxl.LibxlError as e:
        r.say(f"migration target: {e}")
        return ERROR_FAIL
    if not paused:
        libxl.unpause(got.dom)
    if started is not None:
        try:
            started(got)
        except OSError as e:
            r.say(f"migration target: {e.strerror or e}")
            return ERROR_FAIL
    r.say("migration target: Domain started successfully.")
    return 0


def _report(r: _Receiver, got: Received, rc: int) -> None:
    """The report and its octet; on failure our copy destroyed and the
    domain handed back (a second GO). Raises MigrateError when the domain
    is not this side's."""
    try:
        write_message(r.ch, MIGRATE_REPORT + bytes([-rc & 0xFF]), "success/failure report")
    except OSError as e:
        if rc:
            libxl.destroy_domain(got.hv, got.dom)
            raise MigrateError(f"migration target: the sender is gone ({e.strerror or e}); "
                               "our copy is destroyed") from None
        # after GO the domain is ours: it runs here whether the sender hears or not
        r.say(f"migration target: the report did not reach the sender ({e.strerror or e}); "
              "the domain runs here")
        return
    if not rc:
        return
    r.say("migration target: Failure, destroying our copy.")
    libxl.destroy_domain(got.hv, got.dom)
    r.say("migration target: Cleanup OK, granting sender permission to resume.")
    try:
        write_message(r.ch, MIGRATE_PERMISSION_TO_GO, "permission to sender to have domain back")
    except OSError:
        pass  # the sender is gone: it said xl's warning and decides
    raise MigrateError("migration target: the domain did not start here; it is handed back")


__all__ = ["Channel", "FAILED_BADLY", "INCOMING", "MIGRATED_AWAY", "MIGRATE_PERMISSION_TO_GO",
           "MIGRATE_POSTCOPY_SYNC", "MIGRATE_RECEIVER_BANNER", "MIGRATE_RECEIVER_READY",
           "MIGRATE_REPORT", "FAILED_POSTCOPY", "POSTCOPY_INCONSISTENT",
           "MigrateError", "MigrateOutcome", "RESUME_TRIES", "Received", "incoming_header",
           "migrate_domain", "migrate_receive", "postcopy_recovery", "push_postcopy",
           "read_fixed_message", "receive_resume", "resume_postcopy"]
