"""Post-copy against pre-copy on a guest that dirties memory faster than the
modelled link can send it (pre-copy's rounds do not converge), side by side
in one run: pre-copy (Xen's five rounds, then stop-and-copy), hybrid
post-copy (Otto's ``--postcopy``: the same rounds, then the switch), hybrid
after one round (QEMU's usual migrate-start-postcopy after the first pass)
and pure post-copy (no round).

Each migration is pvlab's code end to end in this process: the source
(session.migrate_at: migrate.migrate_domain's live save, the switch and the
push) in a thread, the destination (migrate.migrate_receive, then the
domain run while its pages come, the pager between slices and on each
fault) here, on a socketpair. The guest is the dirtier user program
(firmware/user/dirtier.S) rewriting PAGES pages at RATE MiB per second of
virtual time.

The figures, per mode:

* downtime: the guest running nowhere, in virtual time on the modelled link
  (what the live save reports: the final round and the tail, or the pages
  the destination needs first and the switch's records);
* total: every octet sent, on the modelled link (transferred / bandwidth);
* sent: pages sent in all, and per page of the guest (1.00: each once);
* after the switch: pages pushed by the source's scan and pages the
  destination faulted on (asked for), the faults (POSTCOPY_FAULT records),
  and faults served per second of host time in the post-copy phase (from
  the destination's start to its last page), with their mean wait.

Host times include the source's thread and the destination sharing one
interpreter; the virtual-time figures do not depend on the host.

    .venv/bin/python bench/postcopy.py [--mib 16] [--pages 256] [--rate 1024]
                                       [--bandwidth 256] [--at 3ms] [--run 20ms]
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor import domctl  # noqa: E402
from hypervisor.public.xen import PAGE_SIZE  # noqa: E402
from hypervisor.toolstack.config import DomainConfig  # noqa: E402
from hypervisor.toolstack.migrate import Channel, migrate_receive  # noqa: E402
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions  # noqa: E402
from hypervisor.toolstack.session import boot, migrate_at, run_domain  # noqa: E402
from hypervisor.toolstack.timeparse import parse_duration  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
NS_PER_SPIN = 2           # dirtier's spin loop: dec, jnz; one instruction a nanosecond
FOREVER_PASSES = 10 ** 12
MIB = 1 << 20


def cmdline(pages: int, rate_mib: int) -> str:
    """The dirtier rewriting ``pages`` pages at about ``rate_mib`` MiB per
    virtual second (its spin between passes; the passes' own writes, each
    page's first after a CLEAN a log-dirty fault, slow it down)."""
    period_ns = pages * PAGE_SIZE * 1_000_000_000 // (rate_mib * MIB)
    return f"run=dirtier:{pages}:{max(period_ns // NS_PER_SPIN, 1)}:{FOREVER_PASSES}"


def modes(bandwidth: int) -> dict[str, PrecopyOptions]:
    b = bandwidth * MIB
    return {"pre-copy": PrecopyOptions(bandwidth=b),
            "hybrid": PrecopyOptions(bandwidth=b, postcopy=True),
            "hybrid-1": PrecopyOptions(bandwidth=b, postcopy=True, max_iterations=1),
            "pure": PrecopyOptions(bandwidth=b, postcopy=True, max_iterations=0)}


def migrate_once(args: argparse.Namespace, opts: PrecopyOptions) -> dict[str, Any]:
    """One migration, both ends here; its figures."""
    a, b = socket.socketpair()
    tx = Channel(a.makefile("rb"), a.makefile("wb"))
    rx = Channel(b.makefile("rb"), b.makefile("wb"))
    hv, dom = boot(DomainConfig("migrant", args.mib, 1, IMAGE,
                                cmdline(args.pages, args.rate), 1))
    got: dict[str, Any] = {}

    def source() -> None:
        try:
            got["out"] = migrate_at(hv, dom, args.at, lambda: tx, opts, until_ns=args.at)[1]
        finally:
            a.shutdown(socket.SHUT_RDWR)

    thread = threading.Thread(target=source)
    t0 = time.perf_counter()
    thread.start()
    received = migrate_receive(rx, seed=2)
    started = time.perf_counter()
    pager, ended = received.postcopy, []
    if pager is not None:
        done = pager.on_complete
        pager.on_complete = lambda p: (ended.append(time.perf_counter()),
                                       done(p) if done else None)
    now = max(domctl.vcpu_clocks(received.dom), default=0)
    r = run_domain(received.hv, received.dom, now + args.run)
    if pager is not None:
        pager.drain()
    thread.join()
    end = time.perf_counter()
    rx.close(wait=False)
    b.close()
    a.close()
    out = got["out"]
    assert out.ok and out.info is not None, out.lines
    assert r.reason == "running", r.reason
    received.hv.close()
    return {"info": out.info, "pager": pager, "host": end - t0,
            "phase": (ended[0] if ended else end) - started}


def figures(m: dict[str, Any], opts: PrecopyOptions, guest_pages: int) -> dict[str, float]:
    info: MigrationInfo = m["info"]
    pager = m["pager"]
    sent = sum(r.pages for r in info.rounds) + info.postcopy_pushed + info.postcopy_faulted
    faults = pager.requests if pager is not None else 0
    return {"rounds": sum(1 for r in info.rounds if not r.final),
            "downtime": info.downtime_ns / 1e6,
            "total": opts.wire_ns(info.transferred) / 1e6,
            "sent": sent, "per_page": sent / guest_pages,
            "pushed": info.postcopy_pushed, "faulted": info.postcopy_faulted,
            "faults": faults, "phase": m["phase"],
            "fault_rate": faults / m["phase"] if pager is not None and m["phase"] else 0.0,
            "wait_ms": pager.blocked_ns / faults / 1e6 if faults else 0.0,
            "host": m["host"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=16, help="the guest's memory (default 16)")
    p.add_argument("--pages", type=int, default=256,
                   help="pages the dirtier rewrites every pass (default 256, its most)")
    p.add_argument("--rate", type=int, default=1024,
                   help="MiB it dirties per second of virtual time (default 1024)")
    p.add_argument("--bandwidth", type=int, default=256,
                   help="the modelled link, MiB per second of virtual time (default 256)")
    p.add_argument("--at", type=parse_duration, default=parse_duration("3ms"),
                   help="virtual time of the migration (default 3ms)")
    p.add_argument("--run", type=parse_duration, default=parse_duration("20ms"),
                   help="virtual time the destination runs the guest (default 20ms)")
    args = p.parse_args()
    guest_pages = args.mib * MIB // PAGE_SIZE
    print(f"guest: {args.mib} MiB, {args.pages} pages rewritten at {args.rate} MiB/s of "
          f"virtual time; link {args.bandwidth} MiB/s; migrated at {args.at / 1e6:g} ms")
    print(f"{'mode':>9} {'rounds':>6} {'downtime':>9} {'total':>9} {'sent':>6} {'/page':>6} "
          f"{'pushed':>6} {'faulted':>7} {'faults':>6} {'faults/s':>8} {'wait':>8} "
          f"{'host':>7}")
    rows = {}
    for name, opts in modes(args.bandwidth).items():
        f = rows[name] = figures(migrate_once(args, opts), opts, guest_pages)
        print(f"{name:>9} {f['rounds']:>6} {f['downtime']:>6.2f} ms {f['total']:>6.1f} ms "
              f"{f['sent']:>6} {f['per_page']:>6.2f} {f['pushed']:>6} {f['faulted']:>7} "
              f"{f['faults']:>6} {f['fault_rate']:>8.0f} {f['wait_ms']:>5.2f} ms "
              f"{f['host']:>5.2f} s", flush=True)
    pre = rows["pre-copy"]
    for name in ("hybrid", "hybrid-1", "pure"):
        f = rows[name]
        print(f"{name} / pre-copy: downtime {f['downtime'] / pre['downtime']:.2f}x, total "
              f"{f['total'] / pre['total']:.2f}x, pages sent {f['sent'] / pre['sent']:.2f}x")
    print("downtime and total: virtual time on the modelled link; /page: pages sent per page "
          "of the guest; faults/s: faults served per second of host time from the "
          "destination's start to its last page; wait: a fault's mean host time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
