"""A migration's receiver: what it does after the stream's last octet has
arrived, streaming (restore.restore_stream: pages applied as they come,
the END checks and stream_complete left) against spooling (the stream
copied to a file by its framing, then the whole-image check and the file's
restore), side by side in one run, for guests of 16 and 256 MiB. That time
is part of a migration's downtime.

The stream is a live save's (the wire's: no digest) of a guest running two
tasks, taken once per size and held in memory; each receiver reads it from
memory, and the clock stops when it returns a domain ready to run.

    .venv/bin/python bench/receive.py [--sizes 16,256] [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor.toolstack import savefile, session, stream  # noqa: E402
from hypervisor.toolstack.config import DomainConfig  # noqa: E402
from hypervisor.toolstack.precopy import PrecopyOptions  # noqa: E402
from hypervisor.toolstack.restore import restore_image, restore_stream  # noqa: E402
from hypervisor.toolstack.save import write_image_live  # noqa: E402
from hypervisor.toolstack.session import boot, run_domain  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
AT_NS = 5_000_000
LINK = 1 << 40  # octets per virtual second: the rounds take little of the guest's time


class Clocked(io.BytesIO):
    """The stream in memory, noting when its last octet is read."""

    last_at = 0.0

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        if self.tell() == len(self.getbuffer()) and not self.last_at:
            self.last_at = time.perf_counter()
        return data


def live_stream(mib: int) -> bytes:
    cfg = DomainConfig("bench", mib, 2, IMAGE, "run=hashchain:20:16,spawner:1:1:50", 1)
    hv, dom = boot(cfg)
    run_domain(hv, dom, AT_NS)
    out = io.BytesIO()
    write_image_live(hv, dom, out, session.LiveRun(hv, dom, AT_NS, None, None),
                     PrecopyOptions(bandwidth=LINK), digest=False)
    hv.close()
    return out.getvalue()


def copy_stream(src: stream.CountingReader, out: BinaryIO) -> None:
    """The spooling receiver's copy: one stream's octets by its framing."""
    def take(n: int, what: str) -> bytes:
        data = stream.read_exact(src, n, what, src.tell())
        out.write(data)
        return data

    def record(what: str) -> int:
        rtype, length = stream.RHDR.unpack(take(stream.RHDR.size, what))
        take(length + (-length % stream.REC_ALIGN), what)
        return rtype

    optlen = savefile.XL_HDR.unpack(take(savefile.XL_HDR.size, "the xl header"))[4]
    take(optlen, "the xl header's optional data")
    take(savefile.LIBXL_HDR.size, "the libxl header")
    while (rtype := record("a libxl record")) != savefile.LibxlRecType.END:
        if rtype == savefile.LibxlRecType.LIBXC_CONTEXT:
            take(stream.IHDR.size + stream.DHDR.size, "the libxc stream's headers")
            while record("a libxc record") != stream.RecType.END:
                pass


def spooled(src: Clocked) -> None:
    with tempfile.TemporaryDirectory(prefix="pvlab-bench-") as tmp:
        spool = Path(tmp) / "incoming.img"
        with open(spool, "wb") as f:
            copy_stream(stream.CountingReader(src), f)
        hv, _, _ = restore_image(spool, wire=True)
        hv.close()


def streaming(src: Clocked) -> None:
    hv, _, _ = restore_stream(src)
    hv.close()


def timed(receive: Callable[[Clocked], None], raw: bytes) -> tuple[float, float]:
    """(seconds after the last octet, seconds in all) of one receive."""
    src = Clocked(raw)
    t0 = time.perf_counter()
    receive(src)
    t1 = time.perf_counter()
    return t1 - src.last_at, t1 - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="16,256", help="guest sizes in MiB (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="runs per receiver; the best is shown")
    args = p.parse_args()
    print("after the last octet: the receiver's time from the stream's last octet to a domain "
          "ready to run")
    print(f"{'guest':>6} {'stream':>8} {'spooled':>9} {'streaming':>9} {'ratio':>7} "
          f"{'in all: spooled':>16} {'streaming':>9}")
    for mib in (int(x) for x in args.sizes.split(",")):
        raw = live_stream(mib)
        sp = [timed(spooled, raw) for _ in range(args.repeat)]
        st = [timed(streaming, raw) for _ in range(args.repeat)]
        after_sp, after_st = min(a for a, _ in sp), min(a for a, _ in st)
        print(f"{mib:>4}Mi {len(raw) / (1 << 20):>6.1f}Mi {after_sp * 1e3:>6.1f} ms "
              f"{after_st * 1e3:>6.1f} ms {after_sp / after_st:>6.1f}x "
              f"{min(t for _, t in sp):>14.2f} s {min(t for _, t in st):>7.2f} s", flush=True)
    print("ratio: the spooling receiver's time after the last octet over the streaming one's, "
          "same run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
