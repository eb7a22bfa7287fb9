"""Block throughput: the guest writing, flushing and reading back its
virtio-blk disk, beside plain file I/O on the host moving the same bytes in
the same calls, in one run (the ratio is the figure: these machines are
noisy).

The guest runs blkcheck (firmware/user/blkcheck.S) on vda: BLOCKS blocks of
4 KiB written two at a time (8 KiB write(2) calls, each followed by a
512-byte read and write of a counter sector), a flush, then read back 8 KiB
at a time and checksummed. Its time runs from the "blkcheck start" line to
the checksum line on the console (wall time; boot is not in it). The host
makes the same calls on a file of its own: the same writes and counter
read-writes with pwrite/pread, an fsync, the same reads, with blkcheck's
pattern made and checked and its checksum folded in Python (the checksum
must be the guest's: the bench fails if not). The guest's time
includes its user code generating and checking the pattern in emulated x86,
the syscall path through the Python kernel, the ring, and the device.

    .venv/bin/python bench/blk.py [--blocks N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor.toolstack.config import parse_config  # noqa: E402
from hypervisor.toolstack.session import boot, run_domain  # noqa: E402

CHUNK = 8192
M64 = (1 << 64) - 1
SEED = 1                       # blkcheck's pattern seed, as the guest is given it
GOLDEN = 0x9E3779B97F4A7C15    # blkcheck.S's pattern: (seed << 32 | 0) + i + 1, times this
FNV_PRIME = 0x100000001B3      # its checksum: h ^= word; h *= this
FNV_BASIS = 0xCBF29CE484222325
WORDS = CHUNK // 8


def guest_run(disk: Path, blocks: int) -> tuple[float, int, int]:
    """Seconds from blkcheck's start to its checksum; the device's requests;
    the checksum it printed."""
    disk.write_bytes(bytes((blocks * 8 + 1) * 512 + (1 << 16)))
    cfg = parse_config({"name": "blkbench", "memory": 16,
                        "image": str(ROOT / "firmware/guest.elf"),
                        "cmdline": f"run=blkcheck:{blocks}:1:0",
                        "disk": [f"{disk},raw,xvda,rw"]}, disk.parent / "blk.toml")
    marks: dict[str, float] = {}
    seen = bytearray()

    def sink(dom: object, data: bytes) -> None:
        seen.extend(data)
        for word in ("blkcheck start", "blkcheck checksum"):
            if word not in marks and word.encode() in seen:
                marks[word] = time.perf_counter()

    hv, dom = boot(cfg)
    try:
        r = run_domain(hv, dom, None, sink=sink)
        if r.reason != "poweroff" or b" bad 0" not in r.console:
            raise SystemExit(f"bench/blk.py: the guest run failed ({r.reason}):\n"
                             f"{r.console.decode()[-1500:]}")
        requests = dom.devices[0].device.metrics.requests
        checksum = int(re.search(rb"blkcheck checksum (?:0x)?([0-9a-fA-F]+)", r.console)[1], 16)
    finally:
        hv.close()
    return marks["blkcheck checksum"] - marks["blkcheck start"], requests, checksum


def pattern(block: int) -> bytes:
    """blkcheck's ``fill``: the 8 KiB of blocks ``block`` and ``block + 1``."""
    base = (SEED << 32) + (block << 9) + 1
    return array("Q", [(base + i) * GOLDEN & M64 for i in range(WORDS)]).tobytes()


def host_run(path: Path, blocks: int) -> tuple[float, int]:
    """The same calls on a host file: writes of the pattern with counter
    read-writes, an fsync, reads checked against the pattern and folded
    into the checksum, as blkcheck does. (seconds, checksum)"""
    t = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        counter_at = blocks * 4096
        for block in range(0, blocks, 2):
            os.pwrite(fd, pattern(block), block * 4096)
            c = int.from_bytes(os.pread(fd, 512, counter_at)[:8] or bytes(8), "little")
            os.pwrite(fd, (c + 1).to_bytes(8, "little").ljust(512, b"\0"), counter_at)
        os.fsync(fd)
        h = FNV_BASIS
        for block in range(0, blocks, 2):
            got = os.pread(fd, CHUNK, block * 4096)
            if got != pattern(block):
                raise SystemExit("bench/blk.py: the host read back other bytes than it wrote")
            for word in array("Q", got):
                h = (h ^ word) * FNV_PRIME & M64
    finally:
        os.close(fd)
    return time.perf_counter() - t, h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=256,
                   help="4 KiB blocks blkcheck writes and reads back (2 to 256)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved")
    a = p.parse_args()
    if not 2 <= a.blocks <= 256 or a.repeat < 1:
        p.error("--blocks must be 2 to 256 and --repeat at least 1")
    blocks = a.blocks // 2 * 2
    guest, host = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeat):
            g, requests, want = guest_run(Path(tmp) / "disk.img", blocks)
            guest.append(g)
            took, checksum = host_run(Path(tmp) / "plain.img", blocks)
            if checksum != want:
                raise SystemExit(f"bench/blk.py: the host's checksum {checksum:#x} is not "
                                 f"the guest's {want:#x}: the two do not do the same work")
            host.append(took)
    mib = 2 * blocks * 4096 / (1 << 20)  # written and read back
    print(f"blkcheck: {blocks} blocks of 4 KiB written and read back ({mib:.2f} MiB moved), "
          f"{requests} requests")
    print(f"{'':8} {'best s':>9} {'median s':>9} {'MiB/s':>9}")
    for name, runs in (("guest", guest), ("host", host)):
        print(f"{name:8} {min(runs):9.4f} {statistics.median(runs):9.4f} "
              f"{mib / min(runs):9.2f}")
    print(f"guest / host: {min(guest) / min(host):.1f}x (best), "
          f"{statistics.median(guest) / statistics.median(host):.1f}x (median)")


if __name__ == "__main__":
    main()
