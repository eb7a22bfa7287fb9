"""virtio-console throughput: bytes per second through a port, both ways.

A guest runs ``portecho`` on a port whose host end is a Unix socket; the
bench connects, sends KIB KiB in chunks and reads the upper-cased echo back,
running the guest a millisecond of virtual time between chunks. Every byte
goes host -> guest (the device fills the port's receive buffers) and guest
-> host (the driver's transmit buffer, written to the socket in the notify),
so the figure is bytes per second each way. Side by side in the same run,
the reference: the same bytes through a host thread that does what portecho
does (read 4 KiB, upper-case, write back) over a socketpair; the ratio
is pvlab's time over the reference's.

    .venv/bin/python bench/console.py [--kib 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor.toolstack.config import parse_config  # noqa: E402
from hypervisor.toolstack.session import boot, run_domain  # noqa: E402

MS = 1_000_000
CHUNK = 4096
WINDOW = 16384  # bytes in flight at most: the socket never drops the echo
READ_SIZE = 4096  # what portecho reads at a time
STALL_ROUNDS = 1000  # rounds of a millisecond with no echo back: it cannot finish


def through_guest(total: int, work: Path) -> tuple[float, float]:
    """(wall seconds, virtual seconds) to echo ``total`` bytes through portecho."""
    sock = work / "bench.sock"
    cfg = parse_config({"name": "vcbench", "memory": 16, "image": "firmware/guest.elf",
                        "cmdline": "run=portecho",
                        "channel": [f"name=echo, connection=socket, path={sock}"]},
                       ROOT / "bench.toml")
    hv, dom = boot(cfg)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock))
        client.setblocking(False)
        run_domain(hv, dom, 20 * MS)  # booted, portecho waits in its read
        payload = bytes(b"abcdefghijklmnopqrstuvwxyz0123456789\n"[i % 37] for i in range(total))
        sent = got = 0
        v0 = max(v.clock for v in dom.vcpus)
        t0 = time.perf_counter()
        idle = 0
        while got < total:
            while sent < total and sent - got < WINDOW:
                try:
                    sent += client.send(payload[sent:sent + CHUNK])
                except BlockingIOError:
                    break
            now = max(v.clock for v in dom.vcpus)
            r = run_domain(hv, dom, now + MS)
            if r.reason not in ("running", "hung"):
                raise SystemExit(f"bench/console.py: the guest stopped ({r.reason}) with "
                                 f"{got} of {total} bytes echoed")
            before = got
            while True:
                try:
                    data = client.recv(65536)
                except BlockingIOError:
                    break
                if not data:
                    raise SystemExit("bench/console.py: the port closed before the echo "
                                     "came back")
                got += len(data)
            idle = 0 if got > before else idle + 1
            if idle > STALL_ROUNDS:
                raise SystemExit(f"bench/console.py: no echo in {STALL_ROUNDS} rounds of "
                                 f"1 ms ({got} of {total} bytes back): the run cannot finish")
        wall = time.perf_counter() - t0
        virtual = (max(v.clock for v in dom.vcpus) - v0) / 1e9
        client.close()
        return wall, virtual
    finally:
        hv.close()


def through_thread(total: int) -> float:
    """Wall seconds to echo ``total`` bytes through a host thread doing portecho's work."""
    ours, theirs = socket.socketpair()

    def echo() -> None:
        while data := theirs.recv(READ_SIZE):
            theirs.sendall(data.upper())
        theirs.close()

    thread = threading.Thread(target=echo)
    thread.start()
    payload = b"x" * total
    t0 = time.perf_counter()
    sent = got = 0
    while got < total:
        if sent < total and sent - got < WINDOW:
            ours.sendall(payload[sent:sent + CHUNK])
            sent += len(payload[sent:sent + CHUNK])
        got += len(ours.recv(65536))
    wall = time.perf_counter() - t0
    ours.close()
    thread.join()
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kib", type=int, default=256, help="KiB echoed per run")
    p.add_argument("--repeat", type=int, default=3, help="runs; the median is shown")
    args = p.parse_args()
    for name, value in (("--kib", args.kib), ("--repeat", args.repeat)):
        if value < 1:
            raise SystemExit(f"bench/console.py: {name} {value}: give 1 or more")
    total = args.kib * 1024
    with tempfile.TemporaryDirectory(prefix="vcb", dir="/tmp") as d:
        runs = [through_guest(total, Path(d)) for _ in range(args.repeat)]
    walls = [r[0] for r in runs]
    wall = statistics.median(walls)
    virtual = statistics.median(r[1] for r in runs)
    ref = statistics.median(through_thread(total) for _ in range(args.repeat))
    kib = total / 1024
    print(f"{'KiB':>6} {'pvlab KiB/s':>11} {'virtual KiB/s':>13} {'thread KiB/s':>12} "
          f"{'ratio':>7}")
    print(f"{kib:6.0f} {kib / wall:11.0f} {kib / virtual:13.0f} {kib / ref:12.0f} "
          f"{wall / ref:6.0f}x")
    print("each way: every byte goes host -> guest -> host (portecho); virtual: per second "
          "of the guest's time; ratio: pvlab's wall time over the host thread's, same run")


if __name__ == "__main__":
    main()
