"""The daemon's wire protocol, in the shape of QEMU's machine protocol (QMP).

A client connects to a Unix socket and the server greets it::

    {"QMP": {"version": {...}, "capabilities": [...]}}

The connection starts in *capabilities negotiation*: the only command is
``qmp_capabilities`` (QEMU's rule), any other is answered CommandNotFound and
no event is sent. After it, commands are JSON objects::

    {"execute": NAME, "arguments": {...}, "id": ANY}

each answered by ``{"return": VALUE, "id": ANY}`` or ``{"error": {"class":
CLASS, "desc": TEXT}, "id": ANY}`` (the id, any JSON value, comes back as it
was sent). Events come at any time after negotiation::

    {"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}

Objects may be split over lines or share one; each is read as soon as it is
whole (QEMU's streaming parser does the same). Bad input never stops the
server: a malformed object is answered with an error and skipped up to the
next newline; a message longer than the limit is answered and the
connection closed, since nothing after it can be trusted to be its end; a
client that goes away mid-command is forgotten, and an answer that comes
later for it (a Deferred) is dropped.

Nothing here knows the hypervisor: the daemon registers its commands.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import re
import selectors
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "pvlab.sock"
MAX_MESSAGE = 1 << 20        # bytes of one incoming object (QEMU limits tokens, not objects)
MAX_BACKLOG = 8 << 20        # bytes waiting for a client that does not read: then it is dropped
MAX_NESTING = 64             # arrays and objects within each other (QEMU's limit is 1024)
SUN_PATH_MAX = 107           # sockaddr_un's sun_path, less its terminating NUL
MAX_FDS = 4                  # file descriptors one message may carry (SCM_RIGHTS)
GENERIC = "GenericError"
BUILTIN = ("qmp_capabilities", "query-commands", "getfd", "closefd")  # the server's own
NOT_FOUND = "CommandNotFound"


class QmpError(Exception):
    """A command's failure, sent as {"error": {"class": klass, "desc": desc}}."""

    def __init__(self, klass: str, desc: str) -> None:
        super().__init__(desc)
        self.klass = klass
        self.desc = desc


class _TooLong(QmpError):
    """An object longer than the limit: its end cannot be found, so the
    connection is closed after this is said."""


class DaemonNotRunning(Exception):
    """Nothing listens at the socket; str() says in one line how to start a daemon."""


class Deferred:
    """An answer that comes later: a handler returns one, and resolves or
    fails it when the work is done (a save waits for the guest's suspend)."""

    def __init__(self) -> None:
        self.cancelled = False  # the asking client went away: the answer is dropped
        self._send: Callable[[dict[str, Any]], None] | None = None
        self._done = False

    def resolve(self, value: Any) -> None:
        self._finish({"return": value})

    def fail(self, klass: str, desc: str) -> None:
        self._finish({"error": {"class": klass, "desc": desc}})

    def _finish(self, reply: dict[str, Any]) -> None:
        if self._done:
            raise RuntimeError("a Deferred is answered once")
        self._done = True
        if self._send is not None and not self.cancelled:
            self._send(reply)


Handler = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Param:
    """One argument of a command: the JSON types it may have (str, int, bool,
    list, dict; an int is never a bool) and whether it must be given."""

    types: tuple[type, ...]
    required: bool = True


@dataclass
class _Command:
    handler: Handler
    params: Mapping[str, Param] | None  # None: the handler checks its own arguments


def default_socket() -> Path:
    """$XDG_RUNTIME_DIR/pvlab/pvlab.sock, else /tmp/pvlab-<uid>/pvlab.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "pvlab" if runtime else Path(f"/tmp/pvlab-{os.getuid()}")
    return base / SOCKET_NAME


def private_dir(path: Path) -> None:
    """Make ``path`` a directory only its owner can enter (0700), or refuse
    one that another user owns or others may enter: the socket in it is the
    hypervisor's control."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"{path} belongs to another user")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise OSError(errno.EPERM, f"{path} may be entered by others (mode "
                      f"{stat.S_IMODE(st.st_mode):o}; want 700)")


def listen_unix(path: Path) -> socket.socket:
    """A listening socket at ``path``, mode 0600 in a private directory. A
    socket file nobody answers on (a daemon that died) is replaced; one a
    live daemon answers on is refused."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, f"socket path {path} is longer than "
                      f"{SUN_PATH_MAX} bytes")
    private_dir(path.parent)
    if path.exists() or path.is_symlink():
        if _answers(path):
            raise OSError(errno.EADDRINUSE, f"a daemon already listens at {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def timestamp() -> dict[str, int]:
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": ")).encode() + b"\r\n"


_TOKEN = re.compile(rb'[\[\]{}"]')
_STRING_END = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)


class _Split:
    """The objects in a byte stream: whole ones out, the rest kept.

    An object (or array) ends where its brackets close, strings skipped; the
    scan resumes where the last read stopped, so a message sent a byte at a
    time costs no more than one sent whole. Anything else that is not
    blank is taken up to the end of its line."""

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit
        self._reset()

    def _reset(self) -> None:
        self.pos = 0          # scanned up to here
        self.depth = 0
        self.deepest = 0
        self.in_str = False

    def feed(self, data: bytes) -> list[Any]:
        """Whole objects, and a QmpError for each piece of bad input."""
        self.buf += data
        out: list[Any] = []
        while True:
            item = self._one()
            if item is None:
                if len(self.buf) > self.limit:
                    del self.buf[:]
                    self._reset()
                    out.append(_TooLong(GENERIC, f"message longer than {self.limit} bytes"))
                return out
            out.append(item)

    def _one(self) -> Any:
        """The next object, an error for bad input, or None (not whole yet)."""
        if self.pos == 0:
            blank = len(self.buf) - len(self.buf.lstrip())
            del self.buf[:blank]
            if not self.buf:
                return None
            if self.buf[0] not in b"[{":
                nl = self.buf.find(b"\n")
                return None if nl < 0 else self._take(nl + 1)
        end = self._scan()
        return None if end is None else self._take(end)

    def _scan(self) -> int | None:
        """Where the bracketed value at the buffer's start ends, or None."""
        while self.pos < len(self.buf):
            if self.in_str:
                m = _STRING_END.match(self.buf, self.pos)
                if m is None:
                    return None  # the string goes on in the next read
                self.pos, self.in_str = m.end(), False
                continue
            m = _TOKEN.search(self.buf, self.pos)
            if m is None:
                self.pos = len(self.buf)
                return None
            self.pos = m.end()
            c = m.group()
            if c == b'"':
                self.in_str = True
            elif c in (b"[", b"{"):
                self.depth += 1
                self.deepest = max(self.deepest, self.depth)
            else:
                self.depth -= 1
                if self.depth == 0:
                    return self.pos
        return None

    def _take(self, end: int) -> Any:
        text, deepest = bytes(self.buf[:end]), self.deepest
        del self.buf[:end]
        self._reset()
        if deepest > MAX_NESTING:
            return QmpError(GENERIC, f"JSON parse error, nesting deeper than {MAX_NESTING}")
        try:
            return json.loads(text.decode("utf-8"))
        except UnicodeDecodeError:
            return QmpError(GENERIC, "JSON parse error, invalid UTF-8 sequence")
        except (ValueError, RecursionError) as e:
            return QmpError(GENERIC, f"JSON parse error, {e}")


class _Conn:
    """One client's connection."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.split = _Split(limit)
        self.out = bytearray()
        self.negotiated = False
        self.closing = False      # send what is queued, then close
        self.deaf = False         # the client can no longer be written to
        self.pending: list[Deferred] = []
        self.fds_in: list[int] = []       # passed with SCM_RIGHTS, not yet named by getfd
        self.fds: dict[str, int] = {}     # getfd's names (QEMU's per-monitor table)

    def send(self, obj: dict[str, Any]) -> None:
        if not self.closing and not self.deaf:
            self.out += _encode(obj)


class Server:
    """The daemon's side: the listening socket, its clients, the commands
    registered with it and the other files the daemon's loop watches."""

    def __init__(self, path: Path, version: dict[str, Any],
                 capabilities: Sequence[str] = (), max_message: int = MAX_MESSAGE) -> None:
        self.path = Path(path)
        self.version = version
        self.capabilities = list(capabilities)
        self.max_message = max_message
        self.commands: dict[str, _Command] = {}
        self.sel = selectors.DefaultSelector()
        self.listener = listen_unix(self.path)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self.conns: dict[int, _Conn] = {}
        self.current: _Conn | None = None  # the client whose command is being handled

    def register(self, name: str, handler: Handler,
                 params: Mapping[str, Param] | None = None) -> None:
        """Answer ``name`` with ``handler``; with ``params`` the server checks
        the arguments (none missing, none unknown, each of its types) first."""
        if name in self.commands or name in BUILTIN:
            raise ValueError(f"command {name} is registered already")
        self.commands[name] = _Command(handler, params)

    def watch(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` when ``fileobj`` can be read (a console socket)."""
        self.sel.register(fileobj, selectors.EVENT_READ, callback)

    def unwatch(self, fileobj: Any) -> None:
        self.sel.unregister(fileobj)

    def poll(self, timeout: float | None) -> None:
        """One round: wait up to ``timeout`` (None: for ever) for a file to be
        ready, then accept, read and answer, and send what is queued."""
        for key, mask in self.sel.select(timeout):
            if isinstance(key.data, _Conn):
                self._ready(key.data, mask)
            else:
                key.data()
        self._flush()

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """An event to every client past negotiation; sent at the next poll."""
        msg: dict[str, Any] = {"event": event, "timestamp": timestamp()}
        if data is not None:
            msg["data"] = data
        for conn in self.conns.values():
            if conn.negotiated:
                conn.send(msg)
        self._flush()

    def close(self) -> None:
        """Close every client and the listener; the socket file goes."""
        for conn in list(self.conns.values()):
            self._flush_one(conn)
            self._drop(conn)
        self.sel.unregister(self.listener)
        self.listener.close()
        self.sel.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    # --- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = _Conn(sock, self.max_message)
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        conn.send({"QMP": {"version": self.version, "capabilities": self.capabilities}})

    def _ready(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = _recv_fds(conn.sock, conn.fds_in)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(conn)
                return
            for item in conn.split.feed(data):
                self._handle(conn, item)
                if conn.closing:
                    break
        if mask & selectors.EVENT_WRITE:
            self._flush_one(conn)

    def _drop(self, conn: _Conn) -> None:
        """Forget a client: its answers still to come are dropped."""
        fd = conn.sock.fileno()
        if self.conns.pop(fd, None) is None:
            return
        for d in conn.pending:
            d.cancelled = True
        for fd in [*conn.fds_in, *conn.fds.values()]:
            os.close(fd)
        conn.fds_in.clear()
        conn.fds.clear()
        self.sel.unregister(conn.sock)
        conn.sock.close()

    def _flush(self) -> None:
        for conn in list(self.conns.values()):
            self._flush_one(conn)

    def _flush_one(self, conn: _Conn) -> None:
        """Send what is queued; a client that lets too much pile up is dropped."""
        if conn.sock.fileno() not in self.conns:
            return
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # the client went (EPIPE): what it wrote before going is still
                # read and carried out; it is dropped at its end of file
                conn.out.clear()
                conn.deaf = True
                break
            del conn.out[:n]
        if len(conn.out) > MAX_BACKLOG:
            log.warning("dropping a client that does not read its messages")
            self._drop(conn)
            return
        if conn.closing and not conn.out:
            self._drop(conn)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self.sel.modify(conn.sock, want, conn)

    # --- commands ---------------------------------------------------------------------

    def _handle(self, conn: _Conn, item: Any) -> None:
        if isinstance(item, QmpError):
            conn.send({"error": {"class": item.klass, "desc": item.desc}})
            conn.closing = isinstance(item, _TooLong)
            return
        reply_id = item.get("id") if isinstance(item, dict) and "id" in item else None
        try:
            name, args = self._parse(item)
            value = self._dispatch(conn, name, args)
        except QmpError as e:
            reply: dict[str, Any] = {"error": {"class": e.klass, "desc": e.desc}}
        else:
            if isinstance(value, Deferred):
                self._defer(conn, value, item, reply_id)
                return
            reply = {"return": {} if value is None else value}
        if isinstance(item, dict) and "id" in item:
            reply["id"] = reply_id
        conn.send(reply)

    def _defer(self, conn: _Conn, d: Deferred, item: dict[str, Any], reply_id: Any) -> None:
        def send(reply: dict[str, Any]) -> None:
            if "id" in item:
                reply["id"] = reply_id
            conn.pending.remove(d)
            conn.send(reply)
            self._flush_one(conn)
        d._send = send
        conn.pending.append(d)

    @staticmethod
    def _parse(item: Any) -> tuple[str, dict[str, Any]]:
        """QEMU's qmp_dispatch checks, in its words where they fit."""
        if not isinstance(item, dict):
            raise QmpError(GENERIC, "QMP input must be a JSON object")
        for key in item:
            if key not in ("execute", "arguments", "id"):
                raise QmpError(GENERIC, f"QMP input member '{key}' is unexpected")
        if "execute" not in item:
            raise QmpError(GENERIC, "QMP input lacks member 'execute'")
        name, args = item["execute"], item.get("arguments", {})
        if not isinstance(name, str):
            raise QmpError(GENERIC, "QMP input member 'execute' must be a string")
        if not isinstance(args, dict):
            raise QmpError(GENERIC, "QMP input member 'arguments' must be an object")
        return name, args

    def _dispatch(self, conn: _Conn, name: str, args: dict[str, Any]) -> Any:
        if name == "qmp_capabilities":
            return self._negotiate(conn, args)
        if not conn.negotiated:
            raise QmpError(NOT_FOUND, "Expecting capabilities negotiation with "
                           "'qmp_capabilities'")
        if name == "query-commands":
            return [{"name": n} for n in [*BUILTIN, *sorted(self.commands)]]
        if name in ("getfd", "closefd"):
            check_arguments(args, {"fdname": Param((str,))})
            return self._getfd(conn, args["fdname"]) if name == "getfd" else \
                os.close(self._take(conn, args["fdname"]))
        cmd = self.commands.get(name)
        if cmd is None:
            raise QmpError(NOT_FOUND, f"The command {name} has not been found")
        if cmd.params is not None:
            check_arguments(args, cmd.params)
        self.current = conn
        try:
            return cmd.handler(args)
        except QmpError:
            raise
        except Exception as e:  # a handler's bug must not stop the daemon
            log.exception("command %s failed", name)
            raise QmpError(GENERIC, f"internal error in {name}: {e}") from e
        finally:
            self.current = None

    # --- file descriptors passed with a command (QEMU's getfd, closefd) ---------------

    def _getfd(self, conn: _Conn, name: str) -> dict[str, Any]:
        """Name the oldest descriptor this client passed; an old one of that name is closed."""
        if not conn.fds_in:
            raise QmpError(GENERIC, "No file descriptor supplied via SCM_RIGHTS")
        if name in conn.fds:
            os.close(conn.fds.pop(name))
        conn.fds[name] = conn.fds_in.pop(0)
        return {}

    @staticmethod
    def _take(conn: _Conn, name: str) -> int:
        if name not in conn.fds:
            raise QmpError(GENERIC, f"File descriptor named '{name}' not found")
        return conn.fds.pop(name)

    def take_fd(self, name: str) -> int:
        """For a command's handler: the descriptor its client named ``name``
        with getfd, now the handler's to close."""
        if self.current is None:
            raise QmpError(GENERIC, f"File descriptor named '{name}' not found")
        return self._take(self.current, name)

    def _negotiate(self, conn: _Conn, args: dict[str, Any]) -> dict[str, Any]:
        if conn.negotiated:
            raise QmpError(NOT_FOUND, "Capabilities negotiation is already complete, "
                           "command ignored")
        check_arguments(args, {"enable": Param((list,), required=False)})
        for cap in args.get("enable", []):
            if cap not in self.capabilities:
                raise QmpError(GENERIC, f"Capability {cap!r} not available")
        conn.negotiated = True
        return {}


def _recv_fds(sock: socket.socket, fds: list[int]) -> bytes:
    """recv, with the descriptors passed alongside (SCM_RIGHTS) added to ``fds``."""
    data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return data


_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", list: "array",
               dict: "object", float: "number"}


def check_arguments(args: dict[str, Any], params: Mapping[str, Param]) -> None:
    """Every argument known and of its types, every required one given."""
    for key, value in args.items():
        spec = params.get(key)
        if spec is None:
            raise QmpError(GENERIC, f"Parameter '{key}' is unexpected")
        if not _is_a(value, spec.types):
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in spec.types)
            raise QmpError(GENERIC, f"Invalid parameter type for '{key}', expected: {want}")
    for key, spec in params.items():
        if spec.required and key not in args:
            raise QmpError(GENERIC, f"Parameter '{key}' is missing")


def _is_a(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


class Client:
    """A program's side: connect, negotiate, execute commands, read events."""

    def __init__(self, path: Path | None = None, timeout: float | None = 30.0) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(self.path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            self.sock.close()
            raise DaemonNotRunning(not_running(self.path)) from e
        self.split = _Split(1 << 30)
        self.queue: deque[Any] = deque()
        self.events: deque[dict[str, Any]] = deque()
        self.next_id = 0
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError(GENERIC, f"no greeting from {self.path}")
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """The command's "return"; QmpError for its "error". Events read
        meanwhile go to ``on_event`` as they come, or wait in ``events``.
        ``timeout`` (seconds) overrides the connection's for this answer (a
        save may take a while)."""
        self._send(command, arguments)
        return self._answer(timeout, on_event)

    def send_fd(self, fdname: str, fd: int) -> None:
        """QEMU's getfd: ``fd`` passed to the daemon (SCM_RIGHTS) under ``fdname``,
        for a later command to name."""
        self._send("getfd", {"fdname": fdname}, fd)
        self._answer(None, None)

    def _send(self, command: str, arguments: dict[str, Any] | None, fd: int | None = None
              ) -> None:
        self.next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": self.next_id}
        if arguments:
            msg["arguments"] = arguments
        if fd is None:
            self.sock.sendall(_encode(msg))
        else:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self.sock.sendmsg([_encode(msg)], rights)

    def _answer(self, timeout: float | None,
                on_event: Callable[[dict[str, Any]], None] | None) -> Any:
        old = self.sock.gettimeout()
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while True:
                reply = self._read()
                if "event" in reply and on_event is not None:
                    on_event(reply)
                elif "event" in reply:
                    self.events.append(reply)
                elif reply.get("id") == self.next_id:
                    break
        finally:
            self.sock.settimeout(old)
        if "error" in reply:
            raise QmpError(reply["error"].get("class", GENERIC), reply["error"].get("desc", ""))
        return reply.get("return")

    def next_event(self, timeout: float | None) -> dict[str, Any] | None:
        """The next event, waiting up to ``timeout`` seconds; None if none came."""
        if self.events:
            return self.events.popleft()
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            while True:
                msg = self._read()
                if "event" in msg:
                    return msg
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(old)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        while not self.queue:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"the daemon at {self.path} closed the connection")
            self.queue.extend(self.split.feed(data))
        msg = self.queue.popleft()
        if isinstance(msg, QmpError) or not isinstance(msg, dict):
            raise ConnectionError(f"the daemon at {self.path} sent something that is not "
                                  "a JSON object")
        return msg


def not_running(path: Path) -> str:
    """The one line a client says when no daemon listens at ``path``."""
    flag = "" if Path(path) == default_socket() else f" --socket {path}"
    return (f"no pvlab daemon is listening at {path}: start one with "
            f"'pvlab daemon --detach{flag}'")
