"""Lazy restore against eager restore, and what absent frames cost.

1. A guest of each size (default 1024 MiB) suspended and saved; then, in the
   same run, from nothing to its first instruction retired: ``restore_image``
   (eager: the whole image checked, every page read) and
   ``restore_image_lazy`` (the structure checked, the tables now, the rest
   when touched, each block of pages checked when first read), each on a new
   machine. The lazy restore's time is split into its parts (the functions
   that make them timed in place). Goal: under 10 ms.
2. The mechanism, side by side in one run: the hypervisor's read of a guest
   word with no frame absent against the same read without the check (the
   cost everybody pays); a guest's run with every chunk mapped as one region
   against the same run after half the chunks were filled one by one (the
   regions a partly filled machine has); and marking frames absent in a
   Unicorn engine by unmapping chunks against protecting each frame with
   ``mem_protect`` (the alternative: per-frame regions).

    .venv/bin/python bench/lazyrestore.py [--sizes 1024] [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, UC_PROT_NONE, Uc  # noqa: E402

from hypervisor import domctl  # noqa: E402
from hypervisor.core import Hypervisor  # noqa: E402
from hypervisor.mm.absent import CHUNK_SHIFT  # noqa: E402
from hypervisor.mm.memory import MachineMemory  # noqa: E402
from hypervisor.toolstack import lazyrestore  # noqa: E402
from hypervisor.toolstack import restore as restore_module  # noqa: E402
from hypervisor.toolstack.config import DomainConfig  # noqa: E402
from hypervisor.toolstack.control import Request  # noqa: E402
from hypervisor.toolstack.image import scan_image  # noqa: E402
from hypervisor.toolstack.restore import machine_for  # noqa: E402
from hypervisor.toolstack.save import save_to_file  # noqa: E402
from hypervisor.toolstack.session import boot, run_domain  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
CMDLINE = "run=hashchain:20:16,spawner:1:1:50"


def saved_guest(mib: int, work: Path) -> Path:
    """A guest of ``mib`` MiB suspended at 5 ms and saved."""
    hv, dom = boot(DomainConfig("bench", mib, 2, IMAGE, CMDLINE, 1))
    img = work / f"guest-{mib}.img"

    def on_suspend(d) -> bool:
        save_to_file(hv, d, img)
        return False

    run_domain(hv, dom, 1_000_000_000, None, [Request(5_000_000, command="suspend")], None,
               on_suspend)
    hv.close()
    return img


SPANS: dict[str, float] = {}  # seconds inside each part of the restore being timed


def timed(module, name: str, part: str) -> None:
    """Wrap ``module.name`` so that its seconds add to SPANS[part]."""
    real = getattr(module, name)

    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            SPANS[part] = SPANS.get(part, 0.0) + time.perf_counter() - t

    setattr(module, name, wrapper)


def to_first_instruction(img: Path, lazy: bool) -> tuple[float, dict[str, float]]:
    """Seconds from nothing to vcpu0's first instruction retired, and the
    parts of them (SPANS)."""
    info = scan_image(img)
    hv = Hypervisor(machine_for(info), seed=2)
    SPANS.clear()
    t = time.perf_counter()
    if lazy:
        hv, dom, _, image = lazyrestore.restore_image_lazy(img, hv=hv)
    else:
        hv, dom, _ = restore_module.restore_image(img, hv=hv)
    t_run = time.perf_counter()
    dom.vcpus[0].run(1)
    took = time.perf_counter() - t
    spans = dict(SPANS, run=time.perf_counter() - t_run)
    if lazy:
        image.close()
    hv.close()
    return took, spans


PARTS = ("check", "tables", "pins", "vcpus", "run")


def restores(sizes: list[int], repeat: int, work: Path) -> None:
    timed(restore_module, "scan_image", "check")
    timed(lazyrestore, "scan_image", "check")
    for name in ("populate_pfns", "localise_page", "last_copies"):
        timed(lazyrestore, name, "tables")
    timed(restore_module, "pin_pagetables", "pins")
    timed(domctl, "createdomain", "vcpus")
    print(f"{'guest':>6} {'eager':>9} {'lazy':>9} {'ratio':>7}   lazy's parts: "
          + " ".join(f"{p:>7}" for p in (*PARTS, "other")))
    for mib in sizes:
        img = saved_guest(mib, work)
        eager = min(to_first_instruction(img, False) for _ in range(repeat))
        lazy, spans = min((to_first_instruction(img, True) for _ in range(repeat)),
                          key=lambda r: r[0])
        other = lazy - sum(spans.get(p, 0.0) for p in PARTS)
        print(f"{mib:>4}Mi {eager[0] * 1e3:>7.1f}ms {lazy * 1e3:>7.1f}ms "
              f"{eager[0] / lazy:>6.1f}x                "
              + " ".join(f"{spans.get(p, 0.0) * 1e3:>5.1f}ms" for p in PARTS)
              + f" {other * 1e3:>5.1f}ms", flush=True)
        img.unlink()
    print("to vcpu0's first instruction retired, same run, best of the runs; ratio: eager "
          "over lazy. Lazy's parts: check (the image's structure, its digests, and the "
          "pages it reads), tables (frames for every pfn, the pagetables read and "
          "localised, the rest marked absent), pins (validation), vcpus (the domain and "
          "its VCPUs' engines), run (vcpu0's first slice: its memory mapped, the pages it "
          "touches read), other (shared_info, start_info, devices, contexts)")


def read_cost(n: int) -> tuple[float, float]:
    """A hypervisor read of one word, n times: through read_u64 (with the
    absent check, nothing absent) and straight from the array."""
    mem = MachineMemory(4096)
    addrs = [(i * 4099 * 8) % (mem.size - 8) & ~7 for i in range(1024)]
    t = time.perf_counter()
    for _ in range(n // 1024):
        for a in addrs:
            mem.read_u64(a)
    checked = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n // 1024):
        for a in addrs:
            unchecked_read_u64(mem, a)
    return checked, time.perf_counter() - t


def unchecked_read_u64(mem: MachineMemory, maddr: int) -> int:
    """MachineMemory.read_u64 as it was before absent frames."""
    return int(mem.u64[maddr >> 3]) if not maddr & 7 else int.from_bytes(
        mem.buf[maddr:maddr + 8], "little")


def run_cost(mib: int) -> tuple[float, float]:
    """A guest's 20 ms of virtual time with its memory one region, and the
    same after every other chunk was unmapped and filled back one by one."""
    times = []
    for split in (False, True):
        hv, dom = boot(DomainConfig("bench", mib, 1, IMAGE, "run=hashchain:50:32", 1))
        run_domain(hv, dom, 1_000_000)
        if split:
            v = dom.vcpus[0]
            for chunk in range(0, len(v._unmapped), 2):
                base, size = v._chunk_range(chunk, chunk + 1)
                v.uc.mem_unmap(base, size)
                v.uc.mem_map_ptr(base, size, UC_PROT_ALL, hv.machine.memory.host_addr + base)
        t = time.perf_counter()
        run_domain(hv, dom, 21_000_000)
        times.append(time.perf_counter() - t)
        hv.close()
    return times[0], times[1]


def mark_cost(frames: int) -> tuple[float, float]:
    """Making ``frames`` scattered frames unreachable in one engine: by
    unmapping their chunks (runs of them), against mem_protect per frame."""
    mem = MachineMemory(frames * 512 // 8)
    rng = np.random.default_rng(1)
    mfns = np.sort(rng.choice(mem.nr_frames, frames, replace=False))
    out = []
    for per_frame in (False, True):
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, mem.size, UC_PROT_ALL, mem.host_addr)
        t = time.perf_counter()
        if per_frame:
            for m in mfns.tolist():
                uc.mem_protect(m << 12, 4096, UC_PROT_NONE)
        else:
            chunks = np.unique(mfns >> CHUNK_SHIFT).tolist()
            for c in chunks:
                uc.mem_unmap(c << (CHUNK_SHIFT + 12), 1 << (CHUNK_SHIFT + 12))
        out.append(time.perf_counter() - t)
    return out[0], out[1]


def mechanism(repeat: int) -> None:
    checked, raw = min(read_cost(200_000) for _ in range(repeat))
    print(f"\nhypervisor read_u64, none absent: {checked / 200_000 * 1e9:.0f} ns against "
          f"{raw / 200_000 * 1e9:.0f} ns for the same read without the check: "
          f"{checked / raw:.2f}x")
    one, split = min(run_cost(64) for _ in range(repeat))
    print(f"a guest's 20 ms, memory one region {one:.3f} s, half its chunks as regions of "
          f"their own {split:.3f} s: {split / one:.2f}x")
    chunked, protected = mark_cost(256)
    print(f"256 scattered frames made unreachable: unmapping their chunks "
          f"{chunked * 1e3:.1f} ms, mem_protect per frame {protected * 1e3:.1f} ms: "
          f"{protected / chunked:.1f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024", help="guest sizes in MiB (default %(default)s)")
    p.add_argument("--repeat", type=int, default=2, help="runs per figure; the best is shown")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pvlab-bench-"))
    try:
        restores([int(x) for x in args.sizes.split(",")], args.repeat, work)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    mechanism(args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
