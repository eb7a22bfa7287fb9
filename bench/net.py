"""virtio-net packets per second between two guests, beside the same frames
through the socket backend alone, in the same run (the ratio is the figure:
what the guests, their drivers, the rings and the device cost over the
wire itself).

Two guests on one machine are joined by the socket backend over a Unix
socket; each pings the other (``run=ping:PEER:N:INTERVAL``), so every echo
request and reply crosses the wire once. The guests' figure is the frames
the two devices delivered into rx buffers per host second of the whole run,
the two guests' boots included (a fixed part, which more ``--pings`` make
smaller). The reference sends the same number of frames, of the same sizes,
through a pair of socket backends alone (send on one, poll on the other),
per host second.

    .venv/bin/python bench/net.py [--pings N] [--interval-ms MS] [--repeat N]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor.core import Hypervisor  # noqa: E402
from hypervisor.devices.net import StreamBackend  # noqa: E402
from hypervisor.toolstack.builder import build_domain  # noqa: E402
from hypervisor.toolstack.config import parse_config  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
ECHO_FRAME = 98  # Ethernet + IPv4 + ICMP with ping's 56 bytes


def guest(name: str, ip: str, peer: int, pings: int, interval: int, vif: str):
    return parse_config({"name": name, "memory": 16, "image": str(IMAGE), "seed": 1,
                         "cmdline": f"ip={ip} run=ping:{peer:#x}:{pings}:{interval}",
                         "vif": [vif]})


def guests_run(pings: int, interval: int) -> tuple[int, float, str]:
    """Frames delivered to the two guests and the host seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"unix:{tmp}/seg.sock"
        hv = Hypervisor(64, seed=1)
        try:
            a = build_domain(hv, guest("a", "10.0.2.15", 0x0A000210, pings, interval,
                                       f"mac=00:16:3e:00:00:0a, type=socket, listen={sock}"))
            b = build_domain(hv, guest("b", "10.0.2.16", 0x0A00020F, pings, interval,
                                       f"mac=00:16:3e:00:00:0b, type=socket, connect={sock}"))
            t = time.perf_counter()
            hv.run()
            took = time.perf_counter() - t
            frames = sum(d.devices[0].device.metrics.rx_frames for d in (a, b))
            summary = [line for d in (a, b) for line in bytes(d.console_out).decode().splitlines()
                       if "packet loss" in line]
            return frames, took, "; ".join(summary)
        finally:
            hv.close()


def wire_alone(frames: int) -> float:
    """Host seconds to send ``frames`` echo-sized frames through two socket
    backends alone, each polled as the device polls it."""
    x, y = socket.socketpair()
    a, b = StreamBackend.from_socket(x), StreamBackend.from_socket(y)
    frame = bytes(ECHO_FRAME)
    try:
        t = time.perf_counter()
        got = 0
        for i in range(frames):
            (a if i % 2 else b).send(frame)
            got += len((b if i % 2 else a).poll())
        took = time.perf_counter() - t
        assert got == frames, (got, frames)
        return took
    finally:
        a.close()
        b.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pings", type=int, default=100, help="echo requests each guest sends")
    p.add_argument("--interval-ms", type=int, default=1,
                   help="milliseconds between a guest's requests (virtual time)")
    p.add_argument("--repeat", type=int, default=3, help="runs; the best is shown")
    args = p.parse_args(argv)
    if args.pings < 1 or args.interval_ms < 1 or args.repeat < 1:
        p.error("--pings, --interval-ms and --repeat must be at least 1")
    best = None
    for _ in range(args.repeat):
        frames, took, summary = guests_run(args.pings, args.interval_ms)
        if best is None or took < best[1]:
            best = (frames, took, summary)
    frames, took, summary = best
    alone = min(wire_alone(frames) for _ in range(args.repeat))
    guests_pps, wire_pps = frames / took, frames / alone
    print(f"two guests pinging each other: {frames} frames in {took:.3f} s host time "
          f"(their boots included): "
          f"{guests_pps:,.0f} packets/s ({summary})")
    print(f"the same frames through the socket backend alone: {alone:.4f} s: "
          f"{wire_pps:,.0f} packets/s")
    print(f"guests / wire alone: {guests_pps / wire_pps:.4f} x "
          f"(the wire alone is {wire_pps / guests_pps:.0f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
