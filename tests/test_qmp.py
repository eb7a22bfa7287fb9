"""The daemon's wire protocol (hypervisor/toolstack/qmp.py): QMP's greeting,
negotiation, answers and errors, events, bad input of every kind, and a
server that goes on answering whatever its clients do."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.toolstack import qmp
from hypervisor.toolstack.qmp import Client, DaemonNotRunning, Deferred, Param, QmpError, Server


class Running:
    """A Server polled by a thread of its own, with a few commands."""

    def __init__(self, path: Path, max_message: int = qmp.MAX_MESSAGE) -> None:
        self.server = Server(path, {"pvlab": "test"}, max_message=max_message)
        self.waiting: list[Deferred] = []
        self.stop = threading.Event()
        s = self.server
        s.register("echo", lambda a: a)
        s.register("add", lambda a: a["a"] + a["b"],
                   {"a": Param((int,)), "b": Param((int,)), "note": Param((str,), False)})
        s.register("boom", lambda a: 1 // 0)
        s.register("later", self._later)
        s.register("finish", self._finish)
        s.register("shout", lambda a: s.emit("SHOUT", {"text": a.get("text", "")}))
        s.register("readfd", self._readfd, {"fdname": Param((str,))})
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _later(self, args: dict[str, Any]) -> Deferred:
        d = Deferred()
        self.waiting.append(d)
        return d

    def _finish(self, args: dict[str, Any]) -> dict[str, Any]:
        n = 0
        for d in self.waiting:
            n += not d.cancelled
            d.resolve({"done": True})
        self.waiting.clear()
        return {"answered": n}

    def _readfd(self, args: dict[str, Any]) -> str:
        """What the descriptor named ``fdname`` (getfd) gives, read to its end."""
        with os.fdopen(self.server.take_fd(args["fdname"]), "rb") as f:
            return f.read().decode()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.server.poll(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "pvlab.sock"


@pytest.fixture
def server(sock_path: Path) -> Iterator[Running]:
    r = Running(sock_path)
    yield r
    r.close()


def raw(path: Path) -> tuple[socket.socket, Any]:
    """A connection that speaks bytes, and a reader of its messages."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(os.fspath(path))
    return s, s.makefile("rb")


def read(f: Any) -> dict[str, Any]:
    line = f.readline()
    assert line, "the server closed the connection"
    return json.loads(line)


def test_greeting_then_negotiation_first(server: Running, sock_path: Path) -> None:
    s, f = raw(sock_path)
    greeting = read(f)
    assert greeting == {"QMP": {"version": {"pvlab": "test"}, "capabilities": []}}
    s.sendall(b'{"execute": "echo", "id": 1}\n')
    assert read(f) == {"error": {"class": "CommandNotFound", "desc": "Expecting capabilities "
                                 "negotiation with 'qmp_capabilities'"}, "id": 1}
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert read(f) == {"return": {}}
    s.sendall(b'{"execute": "qmp_capabilities", "id": "x"}\n')
    assert read(f)["error"]["class"] == "CommandNotFound"
    s.sendall(b'{"execute": "query-commands"}\n')
    names = [c["name"] for c in read(f)["return"]]
    assert {"qmp_capabilities", "query-commands", "echo", "add"} <= set(names)
    s.close()


def test_ids_come_back_as_sent(server: Running, sock_path: Path) -> None:
    s, f = raw(sock_path)
    read(f)
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    read(f)
    for ident in (7, "seven", [1, {"a": None}], None):
        s.sendall(json.dumps({"execute": "echo", "arguments": {"k": 1}, "id": ident}).encode())
        assert read(f) == {"return": {"k": 1}, "id": ident}
    s.close()


@pytest.mark.parametrize("text, desc", [
    (b'[1, 2]', "QMP input must be a JSON object"),
    (b'"echo"\n', "QMP input must be a JSON object"),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    (b'{"execute": "echo", "extra": 1}', "QMP input member 'extra' is unexpected"),
    (b'{"execute": 5}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "echo", "arguments": [1]}', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "nope"}', "The command nope has not been found"),
    (b'{"execute": "add", "arguments": {"a": 1}}', "Parameter 'b' is missing"),
    (b'{"execute": "add", "arguments": {"a": 1, "b": 2, "c": 3}}', "Parameter 'c' is unexpected"),
    (b'{"execute": "add", "arguments": {"a": true, "b": 2}}',
     "Invalid parameter type for 'a', expected: integer"),
    (b'{"execute": "add", "arguments": {"a": 1, "b": 2, "note": 3}}',
     "Invalid parameter type for 'note', expected: string"),
    (b'{"execute": "boom"}', "internal error in boom: integer division or modulo by zero"),
    (b'{"execute": \'echo\'}', "JSON parse error"),
    (b'not json at all\n', "JSON parse error"),
    (b'{"a": "\xff\xfe"}', "JSON parse error, invalid UTF-8 sequence"),
    (b'[' * 100 + b']' * 100, "JSON parse error, nesting deeper than 64"),
])
def test_bad_input_is_answered_and_the_next_command_works(server: Running, sock_path: Path,
                                                          text: bytes, desc: str) -> None:
    with Client(sock_path) as c:
        c.sock.sendall(text + b"\n")
        err = c._read()["error"]
        assert err["desc"].startswith(desc)
        assert err["class"] in ("GenericError", "CommandNotFound")
        assert c.execute("add", {"a": 2, "b": 3}) == 5


def test_objects_split_anywhere_and_joined(server: Running, sock_path: Path) -> None:
    with Client(sock_path) as c:
        msg = b'{"execute": "echo", "arguments": {"s": "}{\\"]["}, "id": 1}'
        for i in range(len(msg)):
            c.sock.sendall(msg[i:i + 1])
        assert c._read() == {"return": {"s": '}{"]['}, "id": 1}
        c.sock.sendall(b'{"execute": "echo", "id": 2}{"execute": "echo", "id": 3}\n')
        assert [c._read()["id"], c._read()["id"]] == [2, 3]


def test_a_message_over_the_limit_closes_only_its_connection(sock_path: Path) -> None:
    r = Running(sock_path, max_message=4096)
    try:
        other = Client(sock_path)
        s, f = raw(sock_path)
        read(f)
        s.sendall(b'{"execute": "echo", "arguments": {"s": "' + b"x" * 10000)
        assert read(f)["error"]["desc"] == "message longer than 4096 bytes"
        assert f.readline() == b""  # closed
        assert other.execute("echo", {"still": "here"}) == {"still": "here"}
        other.close()
    finally:
        r.close()


def test_deferred_answers_and_two_clients(server: Running, sock_path: Path) -> None:
    a, b = Client(sock_path), Client(sock_path)
    a.sock.sendall(b'{"execute": "later", "id": "a1"}\n')
    assert b.execute("add", {"a": 1, "b": 1}) == 2  # b is served while a waits
    assert b.execute("finish") == {"answered": 1}
    assert a._read() == {"return": {"done": True}, "id": "a1"}
    a.close()
    b.close()


def test_a_client_that_goes_away_mid_command(server: Running, sock_path: Path) -> None:
    gone = Client(sock_path)
    gone.sock.sendall(b'{"execute": "later", "id": 1}\n')
    with Client(sock_path) as c:
        c.execute("echo")  # the "later" was read before this was answered
        gone.close()
        for _ in range(100):  # each answer is one more round of the server's loop
            if server.waiting[0].cancelled:
                break
            c.execute("echo")
        assert c.execute("finish") == {"answered": 0}  # its answer is dropped
        assert c.execute("echo", {"ok": 1}) == {"ok": 1}


def test_commands_sent_before_a_client_leaves_are_carried_out(server: Running,
                                                              sock_path: Path) -> None:
    """A client that writes its commands and goes before it has read anything
    (its greeting cannot be sent any more) still has them carried out."""
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.fspath(sock_path))
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "later"}')
        s.close()
    with Client(sock_path) as c:
        c.execute("echo")
        for _ in range(100):
            if len(server.waiting) == 5:
                break
            c.execute("echo")  # each answer is one more round of the server's loop
        assert len(server.waiting) == 5
        assert c.execute("finish") == {"answered": 0}  # the answers had nowhere to go


def test_events_reach_negotiated_clients_only(server: Running, sock_path: Path) -> None:
    s, f = raw(sock_path)
    read(f)
    with Client(sock_path) as c:
        c.execute("shout", {"text": "hi"})
        event = c.next_event(5)
        assert event is not None and event["event"] == "SHOUT"
        assert event["data"] == {"text": "hi"}
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= event["timestamp"]["microseconds"] < 1_000_000
        assert c.next_event(0.05) is None
    s.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n')
    assert read(f) == {"return": {}, "id": 1}  # no SHOUT before it
    s.close()


def test_socket_and_directory_modes(server: Running, sock_path: Path) -> None:
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700


def test_a_directory_others_may_enter_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    with pytest.raises(OSError, match="may be entered by others"):
        Server(d / "pvlab.sock", {})


def test_a_live_daemon_is_not_replaced_a_dead_one_is(server: Running, sock_path: Path,
                                                      tmp_path: Path) -> None:
    with pytest.raises(OSError, match="already listens"):
        Server(sock_path, {})
    stale = tmp_path / "stale" / "pvlab.sock"
    stale.parent.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(stale))
    s.close()  # the file stays, nobody listens
    r = Running(stale)
    with Client(stale) as c:
        assert c.execute("echo", {"x": 1}) == {"x": 1}
    r.close()
    assert not stale.exists()


def test_no_daemon_is_one_line_saying_how_to_start_one(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    with pytest.raises(DaemonNotRunning) as e:
        Client(path)
    assert str(e.value) == (f"no pvlab daemon is listening at {path}: start one with "
                            f"'pvlab daemon --detach --socket {path}'")


def test_a_command_error_is_a_qmperror(server: Running, sock_path: Path) -> None:
    with Client(sock_path) as c, pytest.raises(QmpError) as e:
        c.execute("nope")
    assert (e.value.klass, e.value.desc) == ("CommandNotFound",
                                             "The command nope has not been found")


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)
_messages = st.one_of(
    st.binary(max_size=200),
    _json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"execute": st.sampled_from(["echo", "add", "boom", "later", "x"])},
                          optional={"arguments": _json, "id": _json})
    .map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_messages, min_size=1, max_size=5))
def test_fuzzed_messages_leave_the_server_answering(server: Running, sock_path: Path,
                                                    messages: list[bytes]) -> None:
    """Whatever a client sends, and however it leaves, the next client is served."""
    s, f = raw(sock_path)
    read(f)
    for m in messages:
        try:
            s.sendall(m + b"\n")
        except OSError:
            break  # the server closed the connection (a message too long)
    s.close()
    with Client(sock_path) as c:
        assert c.execute("echo", {"alive": True}) == {"alive": True}


def test_getfd_passes_a_descriptor_by_name(server, sock_path):
    """QEMU's getfd: a descriptor sent with SCM_RIGHTS is kept under its name
    for this client, for a command to take; closefd closes one; a name not
    given, or a getfd without a descriptor, is QEMU's error."""
    r, w = os.pipe()
    os.write(w, b"through the socket")
    os.close(w)
    with Client(sock_path) as c:
        c.send_fd("pipe", r)
        os.close(r)  # the server has its own copy
        with pytest.raises(QmpError, match="No file descriptor supplied via SCM_RIGHTS"):
            c.execute("getfd", {"fdname": "none"})
        with Client(sock_path) as other:  # names are per client
            with pytest.raises(QmpError, match="File descriptor named 'pipe' not found"):
                other.execute("readfd", {"fdname": "pipe"})
        assert c.execute("readfd", {"fdname": "pipe"}) == "through the socket"
        with pytest.raises(QmpError, match="File descriptor named 'pipe' not found"):
            c.execute("closefd", {"fdname": "pipe"})  # taken by the command
        r2, w2 = os.pipe()
        c.send_fd("again", r2)
        assert c.execute("closefd", {"fdname": "again"}) == {}
        os.close(r2)
        os.close(w2)
        assert {"name": "getfd"} in c.execute("query-commands")
