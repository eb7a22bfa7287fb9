"""Live migration: downtime and total time of a guest that dirties memory at a
given rate, moved over loopback TCP to a receiver in another process, beside
the loopback's own throughput measured in the same run.

What it measures, in host time (time.perf_counter: CLOCK_MONOTONIC, one clock
for both processes):

* the sender is pvlab migrate's code (migrate.migrate_domain over
  transport.connect_tcp: xl's handshake around a live save,
  save.write_image_live, no digest) on a booted guest running the dirtier
  user program (firmware/user/dirtier.S: PAGES pages rewritten every pass,
  the spin between passes chosen to give RATE KiB per second of virtual
  time; the deterministic clock runs one instruction a nanosecond, the spin
  two a turn). Its rounds go as the pre-copy policy decides (5 rounds, or
  fewer than 50 dirty pages; the modelled link's bandwidth sets how long the
  guest runs between rounds), then its suspend through the save's path, the
  final round and the tail;
* the receiver is pvlab migrate-receive's code (migrate.migrate_receive on a
  transport.listen_tcp socket, in a process of its own: the banner, the
  stream restored as it arrives, the ready message, GO, the unpause, the
  report), then the domain run for a millisecond of virtual time, which must
  show it resumed ("suspend: done");
* downtime: from the source guest's suspend (the live save's suspend
  callback returning: the guest has made its suspend hypercall) to the
  destination's first instruction (migrate_receive returned, the domain
  unpaused, its run loop about to start). It is split into the sender's
  part (the final round and the tail, to the last octet written), the
  receiver's work after the stream's last octet (to its "Transfer complete"),
  and xl's messages after that (ready, GO, the unpause);
* total: from the start of the live save to the destination's first
  instruction, against the guest's bytes at the loopback throughput (the
  same number of octets sent over a loopback TCP connection to a process
  that reads and drops them, in the same run): the ratio is the figure.

Goals (issue 18): downtime under 50 ms for a 256 MiB guest dirtying 1 MiB a
second of virtual time; total within 1.5x of guest bytes / loopback
throughput.

    .venv/bin/python bench/migrate.py [--sizes 64,256] [--rate KIB] [--pages N]
                                      [--at TIME] [--repeat N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor import domctl  # noqa: E402
from hypervisor.toolstack import transport  # noqa: E402
from hypervisor.toolstack.config import DomainConfig  # noqa: E402
from hypervisor.toolstack.migrate import migrate_domain, migrate_receive  # noqa: E402
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions  # noqa: E402
from hypervisor.toolstack.session import LiveRun, boot, run_domain  # noqa: E402
from hypervisor.toolstack.timeparse import parse_duration  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
NS_PER_SPIN = 2           # dirtier's spin loop: dec, jnz; one instruction a nanosecond
FOREVER_PASSES = 10 ** 12
CHUNK = 1 << 20
PAGE = 4096
AFTER_NS = 1_000_000      # the destination runs this long, to show it goes on


def dirtier_cmdline(pages: int, rate_kib: int) -> str:
    """run=dirtier with the spin that rewrites ``pages`` pages at ``rate_kib``
    KiB per second of virtual time."""
    period_ns = pages * PAGE * 1_000_000_000 // (rate_kib * 1024)
    return f"run=dirtier:{pages}:{max(period_ns // NS_PER_SPIN, 1)}:{FOREVER_PASSES}"


class TimedReader:
    """The receiver's socket, with the time of the last octet read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.last = f, 0.0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.last = time.perf_counter()
        return data

    def read1(self, n: int = -1) -> bytes:
        data = self.f.read1(n)  # type: ignore[attr-defined]
        self.last = time.perf_counter()
        return data

    def close(self) -> None:
        self.f.close()

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        self.last = time.perf_counter()
        return n


class TimedLive:
    """The live save's callbacks (session.LiveRun's: the guest runs on while
    a round is on the wire, then suspends through the save's path), with the
    moment the guest is suspended."""

    def __init__(self, live: LiveRun) -> None:
        self.live, self.suspended, self.guest_s = live, 0.0, 0.0

    def run_for(self, ns: int) -> None:
        t = time.perf_counter()
        self.live.run_for(ns)
        self.guest_s += time.perf_counter() - t

    def suspend(self) -> None:
        self.live.suspend()
        self.suspended = time.perf_counter()


def receiver(listener: socket.socket, report: Any) -> None:
    """pvlab migrate-receive's part: xl's handshake around the stream's
    restore, then the domain run for a moment."""
    ch = transport.accept_one(listener)
    src = TimedReader(ch.reader)
    ch.reader = src  # type: ignore[assignment]
    t: dict[str, float] = {}

    def say(line: str) -> None:
        if "Transfer complete" in line:  # the stream restored: the handshake follows
            t["last_read"], t["restored"] = src.last, time.perf_counter()

    got = migrate_receive(ch, say=say)
    first = time.perf_counter()
    ch.close()
    now = max(domctl.vcpu_clocks(got.dom), default=0)
    r = run_domain(got.hv, got.dom, now + AFTER_NS)
    report.send({**t, "first": first, "reason": r.reason,
                 "console": r.console.decode(errors="replace")[-200:]})
    got.hv.close()


def sender(mib: int, cmdline: str, at_ns: int, port: int) -> tuple[MigrationInfo, dict]:
    """pvlab migrate's part: a booted guest's live save into loopback TCP,
    in xl's handshake."""
    hv, dom = boot(DomainConfig("migrant", mib, 1, IMAGE, cmdline, 1))
    r = run_domain(hv, dom, at_ns)
    assert r.reason == "running", r.reason
    live = TimedLive(LiveRun(hv, dom, at_ns, None, None))
    written: list[float] = []

    def report(info: MigrationInfo) -> None:
        if info.status == "completed":
            written.append(time.perf_counter())

    ch = transport.connect_tcp("127.0.0.1", port)
    start = time.perf_counter()
    out = migrate_domain(hv, dom, ch, live, PrecopyOptions(), report=report)
    hv.close()
    assert out.ok and out.info is not None, out.error
    return out.info, {"start": start, "suspended": live.suspended, "written": written[0],
                      "guest": live.guest_s}


def _listener() -> socket.socket:
    return transport.listen_tcp("127.0.0.1", 0)


def migrate_once(mib: int, cmdline: str, at_ns: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    listener = _listener()
    mine, theirs = ctx.Pipe()
    rx = ctx.Process(target=receiver, args=(listener, theirs))
    rx.start()
    try:
        info, t = sender(mib, cmdline, at_ns, listener.getsockname()[1])
        got = mine.recv()
    finally:
        rx.join()
        listener.close()
    assert got["reason"] == "running" and "suspend: done" in got["console"], got
    return {"info": info, **t, **got}


def _drain(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        while conn.recv(CHUNK):
            pass


def loopback_throughput(octets: int) -> float:
    """Octets per second of host time over loopback TCP to another process."""
    ctx = multiprocessing.get_context("fork")
    listener = _listener()
    rx = ctx.Process(target=_drain, args=(listener,))
    rx.start()
    block = b"\xa5" * CHUNK
    with socket.create_connection(listener.getsockname()) as sock:
        t = time.perf_counter()
        for pos in range(0, octets, CHUNK):
            sock.sendall(block[:min(CHUNK, octets - pos)])
        sock.shutdown(socket.SHUT_WR)
        rx.join()
        took = time.perf_counter() - t
    listener.close()
    return octets / took


def one(mib: int, cmdline: str, at_ns: int) -> dict[str, float]:
    m = migrate_once(mib, cmdline, at_ns)
    info: MigrationInfo = m["info"]
    rate = loopback_throughput(info.total)
    return {
        "downtime": m["first"] - m["suspended"],
        "sent": m["written"] - m["suspended"],
        "received": m["restored"] - max(m["last_read"], m["written"]),
        "handshake": m["first"] - m["restored"],
        "total": m["first"] - m["start"],
        "guest": m["guest"],
        "ideal": info.total / rate,
        "rate": rate,
        "vdowntime": info.downtime_ns / 1e6,
        "rounds": len(info.rounds),
        "final": info.rounds[-1].pages,
        "stream": info.transferred,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,256", help="guest sizes in MiB (default %(default)s)")
    p.add_argument("--rate", type=int, default=1024,
                   help="KiB the guest dirties per second of virtual time (default 1024)")
    p.add_argument("--pages", type=int, default=16,
                   help="the dirtier's pages, rewritten every pass (default 16, at most 256)")
    p.add_argument("--at", default="2ms", help="virtual time of the migration (default 2ms)")
    p.add_argument("--repeat", type=int, default=2, help="runs per size; the best is shown")
    args = p.parse_args()
    cmdline = dirtier_cmdline(args.pages, args.rate)
    at_ns = parse_duration(args.at)
    print(f"guest: {cmdline} ({args.rate} KiB/s of virtual time), migrated at {args.at}")
    print(f"{'guest':>6} {'rounds':>6} {'final':>5} {'stream':>8} {'downtime':>9} "
          f"{'sender':>8} {'receiver':>9} {'xl msgs':>8} {'virtual':>8} {'total':>7} "
          f"{'loopback':>9} {'ideal':>7} {'ratio':>6} {'guest':>7} {'rest':>6}")
    for mib in [int(x) for x in args.sizes.split(",")]:
        runs = [one(mib, cmdline, at_ns) for _ in range(args.repeat)]
        b = min(runs, key=lambda r: r["total"])
        print(f"{mib:>4}Mi {b['rounds']:>6} {b['final']:>5} {b['stream'] / (1 << 20):>6.1f}Mi "
              f"{b['downtime'] * 1e3:>6.1f} ms {b['sent'] * 1e3:>5.1f} ms "
              f"{b['received'] * 1e3:>6.1f} ms {b['handshake'] * 1e3:>5.1f} ms "
              f"{b['vdowntime']:>5.2f} ms {b['total']:>5.2f} s "
              f"{b['rate'] / (1 << 20):>5.0f}Mi/s {b['ideal']:>5.3f} s "
              f"{b['total'] / b['ideal']:>5.1f}x {b['guest']:>5.2f} s "
              f"{(b['total'] - b['guest']) / b['ideal']:>5.1f}x", flush=True)
    print("downtime: source suspended -> destination's first instruction (host time); of it "
          "the sender's final round and tail to the last octet written, the receiver's work "
          "after the stream's last octet, and xl's messages after it (ready, GO, the unpause); "
          "virtual: the downtime the live save reports on its modelled link")
    print("ratio: the total over guest bytes / loopback throughput, measured in the same run; "
          "guest: of the total, the host time spent emulating the guest while the rounds were "
          "on the modelled link (the rounds and the guest take turns: the scripted run is "
          "deterministic); rest: the ratio without it, the migration's own work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
