"""The host daemon's idle cost: the CPU time the daemon's process uses per
second of wall time with no domain, then while its one guest is blocked (the
shell, waiting for a line), beside the same while a guest computes, in one
run. The ratios are the figure: an idle daemon sleeps in poll until the next
timer or message, so it should be a small fraction of a busy one (which is
about one CPU second a second, less what other processes take). A blocked
guest still takes its timer tick (100 a second), which wakes the daemon.

    .venv/bin/python bench/daemon.py [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor.toolstack.qmp import Client, DaemonNotRunning  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def config(d: Path, name: str, cmdline: str) -> str:
    path = d / f"{name}.toml"
    path.write_text(f'name = "{name}"\nmemory = 16\nvcpus = 1\nimage = "{IMAGE}"\n'
                    f'cmdline = "{cmdline}"\nseed = 1\n')
    return str(path)


def connect(sock: Path, proc: subprocess.Popen) -> Client:
    while True:
        try:
            return Client(sock)
        except DaemonNotRunning:
            if proc.poll() is not None:
                raise
            time.sleep(0.05)


def measure(pid: int, seconds: float) -> float:
    """CPU seconds per wall second of ``pid`` over ``seconds``."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="each measurement's length")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="pvbench", dir="/tmp"))
    sock = d / "run" / "pvlab.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "daemon", "--socket",
                             str(sock), "--memory", "128"], env=env, stderr=subprocess.DEVNULL)
    try:
        client = connect(sock, proc)
        empty = measure(proc.pid, args.seconds)
        client.execute("domain-create", {"config": config(d, "idle", "run=sh")})
        time.sleep(0.5)  # booted, at its prompt
        idle = measure(proc.pid, args.seconds)
        client.execute("domain-create",
                       {"config": config(d, "busy", "run=hashchain:1000000:32")})
        busy = measure(proc.pid, args.seconds)
        client.execute("quit")
        client.close()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)
    print(f"daemon CPU s per wall s, no domain:         {empty:.4f}")
    print(f"daemon CPU s per wall s, one blocked guest: {idle:.4f}")
    print(f"daemon CPU s per wall s, a computing guest: {busy:.4f}")
    busy = busy or float("nan")
    print(f"no domain / busy: {empty / busy:.4f}; blocked guest / busy: {idle / busy:.4f} "
          "(the daemon sleeps in poll until a timer or a message)")


if __name__ == "__main__":
    main()
