"""pvlab xl's verbs without a daemon: argument and size parsing, xl's output
formats from rows of the protocol's shape, the one-line failures, and what
each verb asks of the daemon (a stand-in that answers as the protocol says)."""

from __future__ import annotations

import io
import json
import os
import pty
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from hypervisor.toolstack import xl
from hypervisor.toolstack.cli import build_parser, main
from hypervisor.toolstack.console import ConsoleClient
from hypervisor.toolstack.qmp import QmpError
from hypervisor.toolstack.savefile import write_xl_header
from hypervisor.toolstack.xenconsole import CLOSED, DETACHED, AttachError, attach
from tests.conftest import ROOT

ROW = {"domid": 1, "name": "shell", "memory_mib": 16, "maxmem_mib": 16, "vcpus": 2,
       "state": "-b----", "cpu_time_s": 1.25}
VCPU = {"domid": 1, "name": "shell", "vcpu": 0, "cpu": 0, "state": "-b-", "time_s": 0.5}


class FakeDaemon:
    """Answers each command from ``answers`` (a value, a function of the
    arguments, or a QmpError to raise) and records what was asked."""

    def __init__(self, **answers: Any) -> None:
        self.answers = {name.replace("_", "-"): a for name, a in answers.items()}
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.events: list[dict[str, Any]] = []
        self.closed = False

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None, on_event: Any = None) -> Any:
        """The events waiting go to ``on_event`` first, as they would come
        while a deferred command waits for its answer."""
        self.calls.append((command, arguments))
        while on_event is not None and self.events:
            on_event(self.events.pop(0))
        answer = self.answers[command]
        if isinstance(answer, QmpError):
            raise answer
        return answer(arguments) if callable(answer) else answer

    def next_event(self, timeout: float | None) -> dict[str, Any] | None:
        return self.events.pop(0) if self.events else None

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def daemon(monkeypatch):
    """A FakeDaemon that the verbs connect to; its answers are set by the test."""
    fake = FakeDaemon(domain_info=lambda a: {**ROW, "domid": 1})
    monkeypatch.setattr(xl, "connect", lambda socket: fake)
    return fake


def run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


# --- sizes (xl's parse_mem_size_kb) ----------------------------------------------------------

@pytest.mark.parametrize("text, kib", [
    ("64", 64 << 10), ("64m", 64 << 10), ("64M", 64 << 10), ("1g", 1 << 20),
    ("2t", 2 << 30), ("512k", 512), ("512K", 512), ("4096b", 4), ("1023b", 0), ("0", 0),
])
def test_sizes_read_as_xl_reads_them(text, kib):
    assert xl.parse_mem_size_kb(text) == kib


@pytest.mark.parametrize("text", ["", "m", "-1", "+4", " 64", "64 ", "1.5g", "64mb", "12q",
                                  "0x10"])
def test_a_bad_size_is_refused(text):
    with pytest.raises(ValueError, match="invalid memory size"):
        xl.parse_mem_size_kb(text)


def test_a_bad_size_is_one_line_and_no_daemon_is_asked(capsys, monkeypatch):
    monkeypatch.setattr(xl, "connect", lambda socket: pytest.fail("connected"))
    code, out, err = run(capsys, "xl", "mem-set", "shell", "12q")
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("pvlab: invalid memory size: '12q'")


def test_domains_are_domids_when_all_digits():
    assert xl.domain_ref("3") == 3 and xl.domain_ref("shell") == "shell"
    assert xl.domain_ref("web3") == "web3"


# --- arguments -------------------------------------------------------------------------------

def parse(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def test_flags_are_xls_letters():
    a = parse("xl", "save", "-c", "-p", "web", "web.img", "--socket", "/s")
    assert (a.domain, a.file, a.checkpoint, a.paused, a.socket) == ("web", "web.img", True,
                                                                     True, "/s")
    a = parse("xl", "create", "-cp", "web.toml")
    assert (a.config, a.console, a.paused) == ("web.toml", True, True)
    assert parse("xl", "restore", "-p", "web.img").paused
    assert parse("xl", "shutdown", "-w", "web").wait and parse("xl", "reboot", "--wait", "3").wait
    assert parse("xl", "list", "--long").long and parse("xl", "list", "web").domain == "web"
    assert parse("xl", "vcpu-list", "a", "b").domains == ["a", "b"]
    assert parse("xl", "dmesg", "-c").clear and not parse("xl", "dmesg").clear
    assert parse("console", "web").xl_verb is xl.xl_console


@pytest.mark.parametrize("argv", [("xl",), ("xl", "save", "web"), ("xl", "mem-set", "web"),
                                  ("xl", "list", "-x"), ("xl", "nosuchverb")])
def test_bad_arguments_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2 and "usage: pvlab" in capsys.readouterr().err


# --- formats ---------------------------------------------------------------------------------

def test_list_has_xls_columns():
    text = xl.format_list([{**ROW, "domid": 0, "name": "Domain-0", "memory_mib": 1024,
                            "state": "r-----", "cpu_time_s": 13.8}, ROW])
    assert text.splitlines() == [
        "Name                                        ID   Mem VCPUs\tState\tTime(s)",
        "Domain-0                                     0  1024     2     r-----      13.8",
        "shell                                        1    16     2     -b----       1.2",
    ]


def test_vcpu_list_has_xls_columns():
    offline = {**VCPU, "vcpu": 1, "cpu": None, "state": "--p", "time_s": 0}
    assert xl.format_vcpu_list([VCPU, offline]).splitlines() == [
        "Name                                ID  VCPU   CPU State   Time(s) "
        "Affinity (Hard / Soft)",
        "shell                                1     0     0   -b-       0.5  all / all",
        "shell                                1     1     -   --p       0.0  all / all",
    ]


def test_info_lines_are_padded_as_xls():
    assert xl.format_info({"host": "lab", "xen_major": 4}).splitlines() == [
        "host                   : lab", "xen_major              : 4"]


# --- the verbs, against a stand-in daemon ----------------------------------------------------

def test_list(capsys, daemon):
    daemon.answers["domain-list"] = [ROW]
    code, out, _ = run(capsys, "xl", "list")
    assert code == 0 and out.splitlines()[1].startswith("shell ")


def test_list_long_is_json_of_each_domains_info(capsys, daemon):
    daemon.answers["domain-list"] = [ROW]
    daemon.answers["domain-info"] = lambda a: {**ROW, "config": {"memory": 16}}
    code, out, _ = run(capsys, "xl", "list", "-l")
    assert code == 0 and json.loads(out) == [{**ROW, "config": {"memory": 16}}]
    assert ("domain-info", {"domain": 1}) in daemon.calls


def test_mem_set_and_mem_max_send_kib(capsys, daemon):
    daemon.answers["domain-mem-set"] = daemon.answers["domain-mem-max"] = {}
    assert run(capsys, "xl", "mem-set", "shell", "12")[0] == 0
    assert run(capsys, "xl", "mem-max", "1", "1g")[0] == 0
    assert daemon.calls == [("domain-mem-set", {"domain": "shell", "kib": 12 << 10}),
                            ("domain-mem-max", {"domain": 1, "kib": 1 << 20})]


@pytest.mark.parametrize("verb, command", [("pause", "domain-pause"),
                                           ("unpause", "domain-unpause"),
                                           ("destroy", "domain-destroy")])
def test_one_command_verbs(capsys, daemon, verb, command):
    daemon.answers[command] = {}
    assert run(capsys, "xl", verb, "shell") == (0, "", [])
    assert daemon.calls == [(command, {"domain": "shell"})]


def test_a_missing_domain_is_xls_one_line(capsys, daemon):
    daemon.answers["domain-pause"] = QmpError("DomainNotFound", "no domain 'nosuch'")
    code, out, err = run(capsys, "xl", "pause", "nosuch")
    assert code == 1 and out == ""
    assert err == ["pvlab: nosuch is an invalid domain identifier (no domain has that name "
                   "or domid)"]
    assert daemon.closed


def test_a_missing_domain_in_vcpu_list(capsys, daemon):
    daemon.answers["domain-vcpu-list"] = QmpError("DomainNotFound", "no domain 'x'")
    code, _, err = run(capsys, "xl", "vcpu-list", "x")
    assert code == 1 and err == [f"pvlab: {xl.invalid_domain('x')}"]


def test_the_daemons_error_is_one_line(capsys, daemon):
    daemon.answers["domain-mem-max"] = QmpError("GenericError", "mem-max below the target")
    code, _, err = run(capsys, "xl", "mem-max", "shell", "1")
    assert code == 1 and err == ["pvlab: mem-max below the target"]


def test_create_sends_the_configs_absolute_path(capsys, daemon):
    daemon.answers["domain-create"] = {"domid": 4, "name": "shell"}
    code, _, err = run(capsys, "xl", "create", "-p", str(ROOT / "examples" / "shell.toml"))
    assert code == 0 and err[-1] == "Created domain 4 (shell), paused (pvlab xl unpause " \
                                    "starts it)"
    assert daemon.calls == [("domain-create", {"config": str(ROOT / "examples" / "shell.toml"),
                                               "paused": True})]


def test_create_refuses_a_missing_config_before_asking(capsys, tmp_path, daemon):
    code, _, err = run(capsys, "xl", "create", str(tmp_path / "nope.toml"))
    assert code == 2 and err == [f"pvlab: {tmp_path / 'nope.toml'}: no such configuration"]
    assert daemon.calls == []


def xl_file(path: Path) -> str:
    """A file that begins as an xl save file; its xl format info as xl prints it."""
    with path.open("wb") as f:
        write_xl_header(f, b'{"name": "shell"}')
    return xl.xl_format_info(str(path))


def saving(image: Path) -> Any:
    """domain-save's answer, the file written as the daemon would begin it."""
    def answer(args: dict[str, Any]) -> dict[str, Any]:
        xl_file(image)
        return {"file": args["file"], "pages": 4096, "bytes": 3 << 20}
    return answer


def test_save_says_what_was_saved(capsys, tmp_path, daemon):
    image = tmp_path / "s.img"
    daemon.answers["domain-save"] = saving(image)
    code, _, err = run(capsys, "xl", "save", "-c", "shell", str(image))
    assert code == 0
    info = xl.xl_format_info(str(image))
    assert info.startswith("0x3/0x0/")   # JSON config, libxl stream v2; no optional flag
    assert err == [f"Saving domain 1 (shell) to {image}",
                   f"Saved domain 1 (shell) to {image}, new xl format (info {info}): 4096 "
                   "pages, 3.0 MiB; the domain runs on"]
    assert daemon.calls[-1] == ("domain-save", {"domain": 1, "file": str(image),
                                                "checkpoint": True, "paused": False,
                                                "live": False})


def test_save_p_keeps_the_domain_paused(capsys, tmp_path, daemon):
    """-p asks for the domain to be kept, as -c does (xl's save_domain)."""
    image = tmp_path / "s.img"
    daemon.answers["domain-save"] = saving(image)
    code, _, err = run(capsys, "xl", "save", "-p", "shell", str(image))
    assert code == 0 and err[-1].endswith("; the domain is paused")
    assert daemon.calls[-1][1] == {"domain": 1, "file": str(image), "checkpoint": True,
                                   "paused": True, "live": False}


def _round_event(domid: int, iteration: int, final: bool = False) -> dict[str, Any]:
    ram = {"total": 16 << 20, "transferred": (iteration + 1) << 20, "remaining": 4096,
           "dirty-pages-rate": 10, "dirty-sync-count": iteration, "page-size": 4096}
    rnd = {"iteration": iteration, "pages": 100, "pfns": 4096 if not iteration else 100,
           "octets": 1 << 20, "deferred": 0, "wire_ns": 1000, "final": final}
    return {"event": "MIGRATION_ROUND", "data": {"domid": domid, "name": "shell",
                                                  "status": "active", "ram": ram,
                                                  "round": rnd}}


def test_save_live_shows_the_rounds(capsys, tmp_path, daemon, monkeypatch):
    """xl save --live: a progress line per round of its domain's (libxc's
    "Frames iteration N") on a terminal; with --json the query-migrate
    fields of each round, then the final ones; another domain's rounds are
    not shown."""
    image = tmp_path / "s.img"
    daemon.answers["domain-save"] = lambda a: {**saving(image)(a), "rounds": 2}
    daemon.answers["query-migrate"] = {"status": "completed", "downtime": 1}
    monkeypatch.setattr(xl.sys.stderr, "isatty", lambda: True)
    daemon.events = [_round_event(1, 0), _round_event(7, 0), _round_event(1, 1, final=True)]
    code, _, err = run(capsys, "xl", "save", "--live", "shell", str(image))
    assert code == 0
    assert err[1:3] == ["Frames iteration 0: 4096/4096  100%",
                        "Frames iteration 1: 100/4096    2% (suspended)"]
    assert err[-1].endswith("pages in 2 rounds, 3.0 MiB; the domain is destroyed")
    assert daemon.calls[-1][1]["live"] is True
    daemon.events = [_round_event(1, 0)]
    code, out, _ = run(capsys, "xl", "save", "--live", "--json", "shell", str(image))
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and lines[0]["ram"]["transferred"] == 1 << 20 and "round" not in lines[0]
    assert lines[-1] == {"status": "completed", "downtime": 1}
    code, _, err = run(capsys, "xl", "save", "--json", "shell", str(image))
    assert code == 2 and err == ["pvlab: --json reports a live save's rounds: give --live too"]


@pytest.mark.parametrize("argv, uri", [
    (["shell", "h"], "exec:exec ssh h pvlab migrate-receive"),
    (["-p", "-e", "shell", "h"], "exec:exec ssh h pvlab migrate-receive -e -p"),
    (["-s", "ssh -p 2222", "--live", "shell", "h"],
     "exec:exec ssh -p 2222 h pvlab migrate-receive"),
    (["-s", "", "shell", "my receiver"], "exec:my receiver"),  # xl: HOST is the command
    (["shell", "--tcp", "10.0.0.2:7001"], "tcp:10.0.0.2:7001"),
])
def test_migrate_asks_for_xls_rune_or_tcp(capsys, daemon, argv, uri):
    """xl migrate [options] DOM HOST: the uri the daemon is asked for."""
    daemon.answers["migrate"] = {}
    code, _, _ = run(capsys, "xl", "migrate", *argv)
    assert code == 0 and daemon.calls[-1] == ("migrate", {"domain": 1, "uri": uri})


def test_migrate_passes_ottos_postcopy_flags(capsys, daemon):
    daemon.answers["migrate"] = {}
    code, _, _ = run(capsys, "xl", "migrate", "--postcopy", "--precopy-iterations", "0",
                     "shell", "h")
    assert code == 0 and daemon.calls[-1] == ("migrate", {
        "domain": 1, "uri": "exec:exec ssh h pvlab migrate-receive", "postcopy": True,
        "precopy-iterations": 0})
    code, _, err = run(capsys, "migrate", "--precopy-iterations", "0", "shell", "h")
    assert code == 2 and len(err) == 1 and "0 only with --postcopy" in err[0]


def test_a_failed_migration_is_one_line(capsys, daemon):
    daemon.answers["migrate"] = QmpError("GenericError", "Connection refused; the guest runs on")
    code, _, err = run(capsys, "migrate", "shell", "--tcp", "h:1")
    assert code == 1 and err == ["pvlab: migrating domain 1 (shell) failed: Connection "
                                 "refused; the guest runs on"]


def test_save_refuses_a_file_it_cannot_write(capsys, tmp_path, daemon):
    code, _, err = run(capsys, "xl", "save", "shell", str(tmp_path / "no" / "s.img"))
    assert code == 2 and err == [f"pvlab: {tmp_path / 'no'} does not exist: cannot write "
                                 "s.img there"]
    assert daemon.calls == []


def test_restore(capsys, tmp_path, daemon):
    info = xl_file(tmp_path / "s.img")
    daemon.answers["domain-restore"] = {"domid": 2, "name": "shell"}
    code, _, err = run(capsys, "xl", "restore", "-p", str(tmp_path / "s.img"))
    assert code == 0 and err == [
        f"Loading new save file {tmp_path / 's.img'} (new xl fmt info {info})",
        f"Restored domain 2 (shell) from {tmp_path / 's.img'}, paused (pvlab xl unpause "
        "starts it)"]
    assert daemon.calls == [("domain-restore", {"file": str(tmp_path / "s.img"),
                                                "paused": True})]


def test_restore_refuses_what_is_no_save_file_before_asking(capsys, tmp_path, daemon):
    (tmp_path / "s.img").write_bytes(b"x" * 64)
    code, _, err = run(capsys, "xl", "restore", str(tmp_path / "s.img"))
    assert code == 2 and len(err) == 1 and "not an xl save file" in err[0]
    assert daemon.calls == []


def test_shutdown_wait_waits_for_its_domains_shutdown(capsys, daemon):
    daemon.answers["domain-shutdown"] = {}
    daemon.events = [{"event": "SHUTDOWN", "data": {"domid": 7, "name": "other",
                                                    "reason": "poweroff"}},
                     {"event": "SUSPEND", "data": {"domid": 1, "name": "shell"}},
                     {"event": "SHUTDOWN", "data": {"domid": 1, "name": "shell",
                                                    "reason": "poweroff"}}]
    code, _, err = run(capsys, "xl", "shutdown", "-w", "shell")
    assert code == 0 and daemon.events == []
    assert err == ["Shutting down domain 1 (shell)",
                   "Domain 1 has been shut down (poweroff)"]
    assert ("domain-shutdown", {"domain": 1, "reason": "poweroff"}) in daemon.calls


def test_shutdown_wait_ends_if_the_daemon_goes(capsys, daemon):
    daemon.answers["domain-shutdown"] = {}
    code, _, err = run(capsys, "xl", "reboot", "-w", "shell")
    assert code == 1
    assert err[-1] == "pvlab: the daemon went away before domain 1 shut down"


def test_info_and_dmesg(capsys, daemon):
    daemon.answers["host-info"] = {"host": "lab", "xen_major": 4}
    daemon.answers["host-dmesg"] = lambda a: {"text": "booted\nsaved"}
    assert run(capsys, "xl", "info")[1] == "host                   : lab\n" \
                                           "xen_major              : 4\n"
    assert run(capsys, "xl", "dmesg", "-c")[1] == "booted\nsaved\n"
    assert daemon.calls[-1] == ("host-dmesg", {"clear": True})


def test_vcpu_list_of_every_domain(capsys, daemon):
    daemon.answers["domain-vcpu-list"] = [VCPU]
    code, out, _ = run(capsys, "xl", "vcpu-list")
    assert code == 0 and len(out.splitlines()) == 2
    assert daemon.calls == [("domain-vcpu-list", {})]


# --- no daemon, help -------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [("xl", "list"), ("xl", "info"), ("console", "shell"),
                                  ("xl", "mem-set", "shell", "64m")])
def test_without_a_daemon_a_verb_says_how_to_start_one(capsys, tmp_path, argv):
    code, out, err = run(capsys, *argv, "--socket", str(tmp_path / "none.sock"))
    assert code == 1 and out == ""
    assert len(err) == 1 and err[0].startswith("pvlab: ") and "pvlab daemon" in err[0]


@pytest.mark.parametrize("verb", [spec[0] for spec in xl.VERBS])
def test_every_verb_has_help_and_takes_socket(capsys, verb):
    with pytest.raises(SystemExit) as e:
        main(["xl", verb, "--help"])
    assert e.value.code == 0 and "--socket PATH" in capsys.readouterr().out


def test_console_is_also_a_top_level_verb(capsys):
    with pytest.raises(SystemExit):
        main(["console", "--help"])
    assert "Ctrl-] detaches" in capsys.readouterr().out


# --- the console bridge, against a socket that plays the daemon's console -------------------

class ConsoleSocket:
    """A console socket: sends ``greeting`` to the client that connects, then
    records what it gets until the client goes (or ``close_after`` bytes);
    ``seen`` is set once ``expect`` bytes came."""

    def __init__(self, path: Path, greeting: bytes, expect: int = 0,
                 close_after: int = 0) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.got = bytearray()
        self.seen = threading.Event()
        self.thread = threading.Thread(target=self._serve,
                                       args=(greeting, expect, close_after))
        self.thread.start()

    def _serve(self, greeting: bytes, expect: int, close_after: int) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(greeting)
            while data := conn.recv(100):
                self.got += data
                if len(self.got) >= expect:
                    self.seen.set()
                if close_after and len(self.got) >= close_after:
                    break
        self.listener.close()


def test_the_bridge_copies_both_ways_and_ctrl_bracket_detaches(tmp_path):
    """Through a pseudo-terminal in raw mode: output is written with \\r\\n
    (the host's tty no longer adds \\r), typed bytes go to the socket; Ctrl-]
    detaches, what follows it is not sent, the terminal is left as it was."""
    master, slave = pty.openpty()
    server = ConsoleSocket(tmp_path / "c.sock", b"$ hi\n", expect=3)
    out = io.BytesIO()
    term = ConsoleClient(fd=slave, out=out)
    before = term._saved
    os.write(master, b"ls\r")
    ended: list[str] = []
    bridge = threading.Thread(target=lambda: ended.append(attach(tmp_path / "c.sock", "shell",
                                                                 term)))
    bridge.start()
    try:
        server.seen.wait(60)
        os.write(master, b"\x1dlost")
        bridge.join(60)
    finally:
        os.close(master)
        os.close(slave)
    server.thread.join()
    assert ended == [DETACHED] and bytes(server.got) == b"ls\r"
    assert out.getvalue() == b"$ hi\r\n"
    assert before is not None and term._saved is None


def test_the_bridge_ends_when_the_console_closes(tmp_path):
    """Input from a pipe: its end is typed as Ctrl-D; the bridge then waits
    for the guest's output until the daemon closes the console."""
    r, w = os.pipe()
    os.write(w, b"exit\n")
    os.close(w)
    server = ConsoleSocket(tmp_path / "c.sock", b"bye\n", close_after=6)
    out = io.BytesIO()
    try:
        assert attach(tmp_path / "c.sock", "shell", ConsoleClient(fd=r, out=out)) == CLOSED
    finally:
        os.close(r)
    server.thread.join()
    assert bytes(server.got) == b"exit\n\x04" and out.getvalue() == b"bye\n"


def test_a_console_socket_nobody_listens_at(tmp_path):
    with pytest.raises(AttachError, match="cannot attach to the console of shell"):
        attach(tmp_path / "none.sock", "shell", ConsoleClient(fd=0, out=io.BytesIO()))


@pytest.mark.parametrize("error, line", [
    (ConnectionError("the daemon at S closed the connection"),
     "pvlab: the daemon at S closed the connection"),
    (ConnectionResetError(104, "Connection reset by peer"),
     "pvlab: the daemon at S: Connection reset by peer"),
    (TimeoutError("timed out"), "pvlab: the daemon at S did not answer in time"),
    (PermissionError(13, "Permission denied"), "pvlab: the daemon at S: Permission denied"),
])
def test_a_lost_daemon_is_one_line(capsys, daemon, error, line):
    def fail(_args: Any) -> Any:
        raise error
    daemon.answers["domain-list"] = fail
    code, out, err = run(capsys, "xl", "list", "--socket", "S")
    assert code == 1 and out == "" and err == [line]


def test_list_long_leaves_out_a_domain_destroyed_meanwhile(capsys, daemon):
    daemon.answers["domain-list"] = [ROW, {**ROW, "domid": 2, "name": "gone"}]

    def info(args: dict[str, Any]) -> dict[str, Any]:
        if args["domain"] == 2:
            raise QmpError("DomainNotFound", "no domain 2")
        return ROW
    daemon.answers["domain-info"] = info
    code, out, _ = run(capsys, "xl", "list", "-l")
    assert code == 0 and json.loads(out) == [ROW]


def test_a_failed_save_is_one_line(capsys, tmp_path, daemon):
    daemon.answers["domain-save"] = QmpError("GenericError", "the guest did not suspend; "
                                                             "it runs on")
    code, _, err = run(capsys, "xl", "save", "shell", str(tmp_path / "s.img"))
    assert code == 1 and err[-1] == "pvlab: failed to save domain 1 (shell): the guest did " \
                                    "not suspend; it runs on"


def test_ctrl_c_cancels_the_migration(capsys, daemon):
    """Ctrl-C while the daemon migrates: migrate_cancel is sent, one line said."""
    def interrupted(_args: Any) -> Any:
        raise KeyboardInterrupt
    daemon.answers["migrate"] = interrupted
    daemon.answers["migrate_cancel"] = {}
    code, _, err = run(capsys, "xl", "migrate", "shell", "h")
    assert code == 1 and daemon.calls[-1] == ("migrate_cancel", {"domain": 1})
    assert err == ["pvlab: interrupted: the job of domain 1 (shell) is cancelled; the domain "
                   "runs on"]
