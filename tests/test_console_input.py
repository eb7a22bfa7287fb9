"""Input to the guest: the console ring's ``in`` half (Xen's
xen/include/public/io/console.h), filled by the console daemon as
xenconsoled's handle_tty_read does, read by the guest's tty in canonical
mode (a line at a time, echoed as n_tty echoes), and the shell among the
user programs that reads a line and runs the program it names. Scripted
input comes as ``type TEXT`` requests at virtual times and replays exactly;
a person's comes through ``pvlab run --console``."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.public.io.console import IN_CONS_OFF, IN_OFF, IN_PROD_OFF, XENCONS_IN_SIZE
from hypervisor.toolstack.context import domain_of
from hypervisor.toolstack.control import TYPE, console_bytes, parse_request
from hypervisor.toolstack.session import RunResult, run_domain, save_domain
from tests.conftest import GUEST_IMAGE, ROOT, checkout_env, make_config, sweep
from tests.reference import hashchain_line
from tests.terminal import read_until

HELLO = "hello from user space\n"


def typed(*items: tuple[int, str]) -> list:
    """``type`` requests: (virtual ms, text with real newlines or escapes)."""
    return [parse_request(f"{ms}ms type {text}") for ms, text in items]


def run_shell(booted, *items: tuple[int, str], vcpus: int = 1) -> RunResult:
    """The shell as the first task, with this input; it must power off."""
    hv, dom = booted(make_config("run=sh", vcpus=vcpus))
    r = run_domain(hv, dom, requests=typed(*items))
    assert r.reason == "poweroff", r.console.decode() + dom.crash_report
    return r


def results(console: bytes) -> list[str]:
    """The programs' result lines, in order."""
    return [line for line in console.decode().splitlines(keepends=True)
            if line in (HELLO,) or line.startswith("hashchain digest")]


def test_the_guest_echoes_typed_lines(booted):
    out = run_shell(booted, (3, "hello\n"), (20, "exit\n")).console.decode()
    assert "$ hello\n" in out and "$ exit\n" in out


@pytest.mark.parametrize("vcpus", sweep([1, 2]))
def test_the_shell_runs_programs_with_the_result_lines_of_run(booted, vcpus: int):
    hv, dom = booted(make_config("run=hello,hashchain:3:2", vcpus=1))
    reference = run_domain(hv, dom)
    shell = run_shell(booted, (3, "hello\n"), (5, "hashchain 3 2\n"), (40, "exit\n"),
                      vcpus=vcpus)
    assert results(shell.console) == results(reference.console) == [HELLO,
                                                                    hashchain_line(3, 2)]
    out = shell.console.decode()
    assert "sh: hello (pid 2) exited with code 0\n" in out
    assert "sh: hashchain (pid 3) exited with code 0\n" in out


def test_an_empty_line_gives_the_prompt_again(booted):
    out = run_shell(booted, (3, "\n"), (4, "  \n"), (5, "exit\n")).console.decode()
    assert "sh:" not in out
    assert out.count("$ ") == 3


def test_an_unknown_program_is_one_line_and_the_shell_goes_on(booted):
    out = run_shell(booted, (3, "nothere 1\n"), (4, "hello\n"), (20, "exit\n")).console.decode()
    assert "sh: nothere: no such program\n" in out
    assert HELLO in out


def test_bad_arguments_are_one_line_each(booted):
    out = run_shell(booted, (3, "hello 1 2 3 4\nhello x\n"), (9, "exit\n")).console.decode()
    assert "sh: hello: too many numbers (at most 3)\n" in out
    assert "sh: hello: an argument is not a decimal number\n" in out
    assert HELLO not in out


def test_the_exit_code_of_a_killed_program_reaches_the_shell(booted):
    out = run_shell(booted, (3, "fault\n"), (30, "exit\n")).console.decode()
    assert "sh: fault (pid 2) exited with code 139\n" in out


def test_more_input_than_the_ring_holds(booted):
    """3000 bytes at once: the daemon moves 1024 and queues the rest, which
    moves each time the guest's driver has taken what was there."""
    long = "x" * 3000
    out = run_shell(booted, (3, f"{long}\nhello\nexit\n")).console.decode()
    assert f"$ {long}\nhello\nexit\n" in out   # every byte echoed, in order
    assert "sh: line too long\n" in out
    assert HELLO in out


def test_the_daemon_queues_what_the_ring_has_no_room_for(booted):
    """A guest that never reads: the ring fills to its size, the daemon keeps
    the rest, and the producer index runs no further."""
    hv, dom = booted(make_config("run=counter:3"))
    backend = domain_of(hv, dom).console
    data = bytes(range(256)) * 12
    backend.feed(data)
    backend.feed(b"more")
    page = backend.page
    u32 = lambda off: int.from_bytes(page[off:off + 4].tobytes(), "little")  # noqa: E731
    assert u32(IN_PROD_OFF) - u32(IN_CONS_OFF) == XENCONS_IN_SIZE
    assert page[IN_OFF:IN_OFF + XENCONS_IN_SIZE].tobytes() == data[:XENCONS_IN_SIZE]
    assert bytes(backend.pending_input) == data[XENCONS_IN_SIZE:] + b"more"
    assert run_domain(hv, dom).reason == "poweroff"


def test_erase_and_end_of_file(booted):
    """DEL erases the last character of the line being typed (echoed as
    backspace, space, backspace); Ctrl-D on an empty line is the end of
    input, which ends the shell."""
    out = run_shell(booted, (3, "hellp\\x7fo\n"), (20, "\\x04")).console.decode()
    assert "$ hellp\b \bo\n" in out
    assert HELLO in out


def test_scripted_input_replays_exactly(booted):
    items = ((3, "hello\n"), (4, "hashchain 2 2\n"), (30, "exit\n"))
    first = run_shell(booted, *items, vcpus=2)
    again = run_shell(booted, *items, vcpus=2)
    assert first.console == again.console and first.virtual_ns == again.virtual_ns


def test_type_requests_take_escapes_and_refuse_unknown_ones():
    req = parse_request("3ms type a b\\tc\\n\\\\\\x41\\e")
    assert (req.at_ns, req.command) == (3_000_000, TYPE)
    assert console_bytes(req.value) == b"a b\tc\n\\A\x1b"
    with pytest.raises(ValueError, match="unknown escape"):
        parse_request("3ms type a\\q")


def test_a_bad_type_request_is_refused_before_the_guest_boots(tmp_path):
    p = pvlab("run", str(_config(tmp_path)), "--request", "3ms type a\\q")
    assert p.returncode == 2 and p.stdout == ""
    assert "unknown escape '\\\\q'" in p.stderr.splitlines()[-1]
    assert "Traceback" not in p.stderr


# --- across a save, and from the command line ---------------------------------------------

def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "sh.toml"
    cfg.write_text(f'name = "sh"\nmemory = 16\nvcpus = 1\nimage = "{GUEST_IMAGE}"\n'
                   'cmdline = "run=sh"\nseed = 1\n')
    return cfg


def pvlab(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", *args], cwd=ROOT,
                          env=checkout_env(), capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_a_read_blocked_across_a_save_completes_after_a_restore_in_a_new_process(
        booted, tmp_path):
    """The shell is blocked in read, with half a line in the tty's buffer,
    when the guest is saved; restored in another process, it takes the rest
    of the line typed there, and runs the program."""
    hv, dom = booted(make_config("run=sh"))
    image = tmp_path / "sh.img"
    save_domain(hv, dom, str(image), 8_000_000, requests=typed((3, "hash")))
    p = pvlab("restore", str(image), "--request", "30ms type chain 3 2\\n",
              "--request", "60ms type exit\\n")
    assert p.returncode == 0, p.stdout + p.stderr
    assert hashchain_line(3, 2) in p.stdout
    assert "sh: hashchain (pid 2) exited with code 0\n" in p.stdout


def test_the_console_takes_piped_input():
    """``pvlab run --console`` with stdin a pipe: the lines go to the shell
    of examples/shell.toml as they come, and the pipe's end is the end of
    input."""
    p = pvlab("run", str(ROOT / "examples" / "shell.toml"), "--console",
              stdin="hello\nhashchain 3 2\n")
    assert p.returncode == 0, p.stdout + p.stderr
    assert results(p.stdout.encode()) == [HELLO, hashchain_line(3, 2)]


@pytest.mark.slow
def test_a_person_at_a_terminal_types_and_detaches(tmp_path):
    """Through a pseudo-terminal: a line typed with a correction runs its
    program; Ctrl-] detaches, which ends the run with exit 0."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "run", str(_config(tmp_path)),
                             "--console"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env=checkout_env())
    os.close(slave)
    seen = bytearray()
    try:
        assert read_until(master, seen, b"$ ")
        os.write(master, b"hellp\x7fo\r")
        assert read_until(master, seen, b"sh: hello (pid 2) exited with code 0\r\n")
        os.write(master, b"\x1d")
        assert proc.wait(timeout=60) == 0
        read_until(master, seen, b"ends with the run")
    finally:
        proc.kill()
        os.close(master)
    assert b"hello from user space\r\n" in seen and b"detached" in seen
