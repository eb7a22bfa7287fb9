"""A warm process that forks a new pvlab process for each of a grade's runs.

Starting Python and importing pvlab (numpy, unicorn, the toolstack) costs
more than many graded runs do. So a grade starts one server for each way it
runs pvlab (the student's files, or the reference's): the server puts the
lab's overlay in place (labs/overlay.py), imports pvlab's command line, and
from then on only forks, the way multiprocessing's forkserver and Android's
zygote start their workers. Each run is a child that has run nothing before
it: the modules as they are just after their import, nothing left by an
earlier run (that died with its own process). A restore therefore still
runs in a new process, and state a student keeps in Python objects is still
lost on the way, as it is between two machines.

The protocol: the grader and the server share a socket pair of messages. A
request is one message, the run's pvlab arguments as JSON, with three file
descriptors: a socket for the run's exit status and the write ends of its
stdout and stderr pipes. The server forks; the child makes the pipes its
fds 1 and 2, leads a process group of its own and runs pvlab; the server
sends the child's exit status (as subprocess gives it: -N for signal N) when
it has reaped it. A grader that gives up on a run closes its end of the
status socket, and the server kills the run's process group. When the
grader closes the request socket the server kills every run still going
and ends.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from labs import LabError
from labs.run import overlay, pvlab

STATUS = struct.Struct("<i")
MESSAGE = 1 << 16          # the largest request: a run's arguments
GRACE = 5.0                # seconds to drain a killed run's pipes


class ServerGone(Exception):
    """The server cannot take a request: the caller runs pvlab another way."""


# --- the grader's side --------------------------------------------------------------

class ForkServer:
    """A server for one lab and one way of running it; ``run`` is safe from
    several threads at once."""

    def __init__(self, lab: str, who: list[str]) -> None:
        self._requests, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "labs.forkserver", "--lab", lab, *who,
               "--fd", str(theirs.fileno())]
        self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),),
                                      stdout=subprocess.DEVNULL)
        theirs.close()
        self._lock = threading.Lock()

    def run(self, argv: list[str], timeout: float | None
            ) -> tuple[int | None, str, str]:
        """pvlab ARGV in a new child: (exit status, or None if it ran past
        ``timeout``; stdout; stderr)."""
        status, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pipes = Pipes(out_r, err_r)
        try:
            with self._lock:
                socket.send_fds(self._requests, [json.dumps(argv).encode()],
                                [theirs.fileno(), out_w, err_w])
        except OSError as e:
            pipes.close()
            status.close()
            raise ServerGone(str(e)) from None
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        deadline = None if timeout is None else time.monotonic() + timeout
        with status:
            try:
                if not pipes.read(deadline):
                    status.close()          # the server kills the run's process group
                    pipes.read(time.monotonic() + GRACE)
                    return None, pipes.text(out_r), pipes.text(err_r)
                return _status(status, deadline), pipes.text(out_r), pipes.text(err_r)
            finally:
                pipes.close()

    def close(self) -> None:
        """End the server (and any run still going)."""
        self._requests.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class Pipes:
    """A run's stdout and stderr, read as they come (each closed at its end)."""

    def __init__(self, *fds: int) -> None:
        self._got = {fd: bytearray() for fd in fds}
        self._sel = selectors.DefaultSelector()
        for fd in fds:
            self._sel.register(fd, selectors.EVENT_READ)

    def read(self, deadline: float | None) -> bool:
        """Read until every pipe has ended (True) or ``deadline`` has passed (False)."""
        while self._sel.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            for key, _ in self._sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    self._got[key.fd] += chunk
                else:
                    self._sel.unregister(key.fd)
                    os.close(key.fd)
        return True

    def close(self) -> None:
        for fd in list(self._sel.get_map()):
            self._sel.unregister(fd)
            os.close(fd)
        self._sel.close()

    def text(self, fd: int) -> str:
        """What subprocess's text mode makes of a pipe's bytes."""
        text = bytes(self._got[fd]).decode(errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")


def _status(status: socket.socket, deadline: float | None) -> int | None:
    """The run's exit status, once its pipes have ended (None: still going
    at ``deadline``, so killed)."""
    status.settimeout(None if deadline is None else max(0.1, deadline - time.monotonic()))
    try:
        data = status.recv(STATUS.size)
    except TimeoutError:
        return None
    if len(data) != STATUS.size:
        raise ServerGone("the fork server ended during a run")
    return STATUS.unpack(data)[0]


# --- the server ---------------------------------------------------------------------------

@dataclass
class Job:
    """A run, as its child process gets it."""
    argv: list[str]
    out: int
    err: int


def serve(requests: socket.socket) -> Job | None:
    """Fork a child for each request until the grader hangs up. Returns in
    the child with its job; in the server, None at the end."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    runs: dict[int, socket.socket | None] = {}   # pid -> its status socket (None: given up)
    while True:
        waiting = [s for s in runs.values() if s is not None]
        ready, _, _ = select.select([requests, wake_r, *waiting], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(runs)
        for pid, s in list(runs.items()):
            if s is not None and s in ready:   # the grader gave up on the run
                _kill(pid)
                s.close()
                runs[pid] = None
        if requests not in ready:
            continue
        msg, fds, _, _ = socket.recv_fds(requests, MESSAGE, 3)
        if not msg:
            break
        pid = os.fork()
        if pid == 0:
            for s in [requests, *filter(None, runs.values())]:
                s.close()
            for fd in (wake_r, wake_w):
                os.close(fd)
            return _child(json.loads(msg), fds)
        _group(pid)
        for fd in fds[1:]:
            os.close(fd)
        runs[pid] = socket.socket(fileno=fds[0])
    for pid in runs:
        _kill(pid)
    return None


def _group(pid: int) -> None:
    """The child leads a process group of its own (set on both sides of the fork)."""
    try:
        os.setpgid(pid, pid)
    except OSError:       # it did it itself, or it has ended already
        pass


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:       # ended already
        pass


def _reap(runs: dict[int, socket.socket | None]) -> None:
    """Send each ended child's exit status to whoever waits for it."""
    while True:
        try:
            pid, how = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        s = runs.pop(pid, None)
        if s is not None:
            try:
                s.sendall(STATUS.pack(os.waitstatus_to_exitcode(how)))
            except OSError:   # the grader has gone
                pass
            s.close()


def _child(argv: list[str], fds: list[int]) -> Job:
    """The child's side of the fork: the signals of a new process, a process
    group of its own, the status socket left to the server."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)
    os.close(fds[0])
    return Job(argv, fds[1], fds[2])


def run_job(job: Job, argv0: list[str]) -> int:
    """The child: pvlab with the job's arguments, writing to the job's pipes."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(job.out, 1)
    os.dup2(job.err, 2)
    os.close(job.out)
    os.close(job.err)
    sys.argv = [*argv0, "--", *job.argv]
    return pvlab(job.argv)


def warm() -> None:
    """Import pvlab's command line once, for every child. A student's module
    that fails to import is imported again by each run, which then fails as a
    new process would."""
    try:
        import hypervisor.toolstack.cli  # noqa: F401
    except Exception:  # noqa: BLE001 - each run reports it
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labs.forkserver",
                                description="fork a pvlab process per graded run "
                                            "(the grader starts this)")
    p.add_argument("--lab", required=True)
    p.add_argument("--dir", default=".", help="the directory holding the lab's directory")
    p.add_argument("--reference", action="store_true", help="the repo's own modules")
    p.add_argument("--fd", type=int, required=True, help="the grader's request socket")
    args = p.parse_args(argv)
    try:
        overlay(args.lab, None if args.reference else Path(args.dir))
    except LabError as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the grader ends it: ^C is the grader's
    warm()
    job = serve(socket.socket(fileno=args.fd))
    if job is None:
        return 0
    who = ["--reference"] if args.reference else ["--dir", args.dir]
    from labs import run
    return run_job(job, [run.__file__, "--lab", args.lab, *who])


if __name__ == "__main__":
    sys.exit(main())
