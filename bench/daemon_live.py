"""The host daemon serving while it saves a domain live: how long a client
waits for an answer (query-version, over and over) while a writing guest
just runs ("plain"), beside the same while it is saved live (a thread of its own
that holds the machine only while it copies a batch of pages), in one run.
The ratios are the figure: the daemon should answer about as fast during
the save, and its longest silence should be about one batch's copy and one
quantum, not the save's length.

    .venv/bin/python bench/daemon_live.py [--memory MIB] [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import config, connect  # noqa: E402
from hypervisor.toolstack.qmp import Client  # noqa: E402

WRITER = "run=dirtier:200:20000:100000,sh"


def answer_times(sock: Path, stop: threading.Event, out: list[float]) -> None:
    """query-version's round trips (seconds) until ``stop``."""
    with Client(sock) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            c.execute("query-version")
            out.append(time.perf_counter() - t0)


def while_doing(sock: Path, work) -> tuple[list[float], float]:
    """The answer times while ``work()`` runs, and how long it ran."""
    stop, times = threading.Event(), []
    t = threading.Thread(target=answer_times, args=(sock, stop, times))
    t.start()
    t0 = time.perf_counter()
    work()
    took = time.perf_counter() - t0
    stop.set()
    t.join()
    return times, took


def one_run(d: Path, memory: int) -> tuple[list[float], list[float], float, dict]:
    sock = d / "run" / "pvlab.sock"
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "daemon", "--socket",
                             str(sock)], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        c = connect(sock, proc)
        path = d / "w.toml"
        path.write_text(Path(config(d, "w", WRITER)).read_text().replace(
            "memory = 16", f"memory = {memory}"))
        c.execute("domain-create", {"config": str(path)})
        time.sleep(0.5)  # the guest is writing
        idle, _ = while_doing(sock, lambda: time.sleep(1.0))
        result: dict = {}
        busy, took = while_doing(sock, lambda: result.update(c.execute(
            "domain-save", {"domain": "w", "file": str(d / "w.img"), "live": True},
            timeout=600)))
        result["query"] = c.execute("query-migrate", {"domain": "w"})
        c.execute("quit")
        proc.wait(60)
        return idle, busy, took, result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, default=64, help="the guest's MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'run':>4} {'plain median':>12} {'save median':>12} {'ratio':>7} "
          f"{'plain max':>9} {'save max':>9} {'save s':>7} {'rounds':>6} {'downtime':>8}")
    for i in range(args.repeat):
        d = Path(tempfile.mkdtemp(prefix="pvb", dir="/tmp"))
        try:
            idle, busy, took, res = one_run(d, args.memory)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        mi, mb = statistics.median(idle), statistics.median(busy)
        print(f"{i:>4} {mi * 1e3:>10.2f}ms {mb * 1e3:>10.2f}ms {mb / mi:>6.1f}x "
              f"{max(idle) * 1e3:>7.1f}ms {max(busy) * 1e3:>7.1f}ms {took:>7.2f} "
              f"{res['rounds']:>6} {res['query'].get('downtime', 0):>6}ms")


if __name__ == "__main__":
    main()
