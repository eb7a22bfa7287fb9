"""Save and restore throughput: guest MiB per second for guests of 64, 256 and
1024 MiB, beside writing and reading the same number of bytes with plain file
I/O in the same run (the ratio is the figure: the goal is within 2x), the
time spent canonicalising and localising pagetables, and what the integrity
digest costs.

Save: from the suspended domain to an image on disk (p2m walk, page types,
canonicalisation, writing, fsync), against writing the image's own bytes from
memory and fsync. Restore: from the image to a domain ready to run (the whole-
image check, new frames, localisation, pins, contexts), against reading the
file into memory just allocated (both from the page cache: it was just written;
both touch fresh memory, as a new machine's frames are).

The digest: the save hashes as it writes, and SaveStats.digest_s is the time
it spent hashing; the restore's check is one pass over the file, timed here
alone (savefile.check_digest). "without" is the whole time less the digest's,
in the same run, so the two columns are side by side and their ratio is the
cost. The same suspended guest is also saved by the older rule (a digest of
the whole file beside the page digests: every page hashed twice,
``DigestWriter(whole=True)``), so the hashing of the two rules is side by side.

    .venv/bin/python bench/saverestore.py [--sizes 64,256,1024] [--repeat N]
"""

from __future__ import annotations

import argparse
import functools
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypervisor.core import Hypervisor  # noqa: E402
from hypervisor.toolstack import savefile  # noqa: E402
from hypervisor.toolstack.config import DomainConfig  # noqa: E402
from hypervisor.toolstack.control import Request  # noqa: E402
from hypervisor.toolstack.image import scan_image  # noqa: E402
from hypervisor.toolstack.restore import machine_for, restore_image  # noqa: E402
from hypervisor.toolstack.save import save_to_file  # noqa: E402
from hypervisor.toolstack.session import boot, run_domain  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
CHUNK = 4 << 20


def plain_write(path: Path, data: bytes) -> float:
    """Write the bytes and fsync, as a save ends."""
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        view = memoryview(data)
        for pos in range(0, len(data), CHUNK):
            f.write(view[pos:pos + CHUNK])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def plain_read(path: Path) -> float:
    """Read the file into memory just allocated, as a restore reads an image
    into a new machine's frames."""
    t = time.perf_counter()
    size = path.stat().st_size
    buf = mmap.mmap(-1, size)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf)
        pos = 0
        while pos < size:
            n = f.readinto(view[pos:pos + CHUNK])
            if not n:
                break
            pos += n
        view.release()
    buf.close()
    return time.perf_counter() - t


def one(mib: int, work: Path) -> dict[str, float]:
    # a guest with two tasks, one asleep: suspended at 5 ms with its pgds pinned
    cfg = DomainConfig("bench", mib, 2, IMAGE, "run=hashchain:20:16,spawner:1:1:50", 1)
    hv, dom = boot(cfg)
    img = work / f"guest-{mib}.img"
    stats: list = []
    older: list = []

    def on_suspend(d) -> bool:
        stats.append(save_to_file(hv, d, img))
        older.append(save_whole_rule(hv, d, work / "older.img"))
        return False

    run_domain(hv, dom, 1_000_000_000, None, [Request(5_000_000, command="suspend")], None,
               on_suspend)
    hv.close()
    s = stats[0]
    # the same bytes: the image itself, written by plain I/O, and read back
    plain = work / "plain.bin"
    w = plain_write(plain, img.read_bytes())
    plain.unlink()
    r = plain_read(img)
    info = scan_image(img)
    rhv = Hypervisor(machine_for(info), seed=2)
    _, _, rs = restore_image(img, hv=rhv)
    rhv.close()
    check = digest_check(img)
    img.unlink()
    return {"save": s.total_s, "write": w, "canon": s.canonicalise_s, "tables": s.tables,
            "restore": rs.total_s, "read": r, "local": rs.localise_s, "bytes": s.bytes,
            "save_nodigest": s.total_s - s.digest_s, "restore_nodigest": rs.total_s - check,
            "hash": s.digest_s, "hash_older": older[0].digest_s, "save_older": older[0].total_s}


def save_whole_rule(hv: Hypervisor, dom, path: Path):
    """save_to_file with the older rule's writer (the whole file hashed
    besides the blocks); the image is dropped."""
    real = savefile.DigestWriter
    savefile.DigestWriter = functools.partial(real, whole=True)  # type: ignore[misc]
    try:
        return save_to_file(hv, dom, path)
    finally:
        savefile.DigestWriter = real  # type: ignore[misc]
        path.unlink(missing_ok=True)


def digest_check(img: Path) -> float:
    """The restore's digest check alone: one pass over the file."""
    with open(img, "rb") as f:
        xl = savefile.read_xl_header(f)
        t = time.perf_counter()
        savefile.check_digest(f, xl, required=True)
        return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,256,1024",
                   help="guest sizes in MiB (default %(default)s)")
    p.add_argument("--repeat", type=int, default=2, help="runs per size; the best is shown")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="pvlab-bench-"))
    digest_rows = []
    print(f"{'guest':>6} {'save MiB/s':>10} {'plain write':>11} {'ratio':>6} "
          f"{'restore MiB/s':>13} {'plain read':>10} {'ratio':>6} {'tables':>6} "
          f"{'canonicalise':>12} {'localise':>9}")
    try:
        for mib in sizes:
            runs = [one(mib, work) for _ in range(args.repeat)]
            best = {k: min(r[k] for r in runs) for k in runs[0]}
            digest_rows.append((mib, best))
            size = best["bytes"] / (1 << 20)
            print(f"{mib:>4}Mi {mib / best['save']:>10.0f} {size / best['write']:>9.0f}/s "
                  f"{best['save'] / best['write']:>5.2f}x {mib / best['restore']:>13.0f} "
                  f"{size / best['read']:>8.0f}/s {best['restore'] / best['read']:>5.2f}x "
                  f"{int(best['tables']):>6} {best['canon'] * 1e3:>9.1f} ms "
                  f"{best['local'] * 1e3:>6.1f} ms", flush=True)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    print("ratio: the save (restore) time over plain file I/O of the same bytes, same run")
    print(f"\nthe integrity digest ({savefile.DIGEST_ALGORITHM}), MiB/s of guest")
    print(f"{'guest':>6} {'save':>8} {'without':>8} {'cost':>6} {'restore':>8} {'without':>8} "
          f"{'cost':>6}")
    for mib, best in digest_rows:
        print(f"{mib:>4}Mi {mib / best['save']:>8.0f} {mib / best['save_nodigest']:>8.0f} "
              f"{best['save'] / best['save_nodigest']:>5.2f}x {mib / best['restore']:>8.0f} "
              f"{mib / best['restore_nodigest']:>8.0f} "
              f"{best['restore'] / best['restore_nodigest']:>5.2f}x")
    print("cost: the time with the digest over the time without it, same run")
    print("\nthe save's hashing, each octet once (hash tree) against the older rule (the "
          "whole file besides the blocks), same guest, same run")
    print(f"{'guest':>6} {'tree':>8} {'older':>8} {'ratio':>6} {'save':>8} {'older':>8}")
    for mib, best in digest_rows:
        print(f"{mib:>4}Mi {best['hash']:>7.2f}s {best['hash_older']:>7.2f}s "
              f"{best['hash_older'] / best['hash']:>5.2f}x {best['save']:>7.2f}s "
              f"{best['save_older']:>7.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
