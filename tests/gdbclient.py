"""A small gdb remote-protocol client for the tests: it starts ``pvlab run
--gdb 0`` (or restore) in a child process and talks to it as gdb would."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from hypervisor.toolstack.rsp import checksum, frame, unescape
from tests.conftest import ROOT, checkout_env

WAITING = re.compile(r"pvlab: waiting for gdb on 127\.0\.0\.1:(\d+)")


def start_pvlab(args: list[str], cwd: Path = ROOT) -> tuple[subprocess.Popen, int]:
    """``pvlab ARGS --gdb 0`` in a child process, and the port it waits on."""
    cmd = [sys.executable, "-m", "hypervisor", *args, "--gdb", "0"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=checkout_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stderr.readline()
    m = WAITING.match(line)
    assert m, line + proc.stderr.read()
    return proc, int(m.group(1))


class GdbClient:
    def __init__(self, args: list[str], cwd: Path = ROOT) -> None:
        self.proc, self.port = start_pvlab(args, cwd)
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        self.buf = b""

    def _byte(self) -> bytes:
        if not self.buf:
            self.buf = self.sock.recv(4096)
            assert self.buf, "the stub hung up"
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def reply(self) -> bytes:
        """The next packet from the stub, acknowledged."""
        while self._byte() != b"$":
            pass
        body = b""
        while (b := self._byte()) != b"#":
            body += b
        cc = self._byte() + self._byte()
        assert int(cc, 16) == checksum(body)
        self.sock.sendall(b"+")
        return unescape(body)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))
        assert self._byte() == b"+"

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.reply()

    def finish(self) -> tuple[int, str, str]:
        """Hang up and wait for pvlab: exit code, stdout, stderr."""
        self.sock.close()
        out, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, out, err
