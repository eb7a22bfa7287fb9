"""VCPU benchmark: instructions per second for hashchain inside pvlab in each
clock mode, against the same code under a bare Unicorn loop, and the round trip
of a null hypercall from x86 and from the Python kernel against an empty Unicorn
syscall hook. Everything is measured side by side in one run; the ratios are
the figures (these machines are noisy).

    .venv/bin/python bench/vcpu.py [--rounds N] [--pages N] [--calls N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc  # noqa: E402
from unicorn.x86_const import UC_X86_INS_SYSCALL  # noqa: E402

from bench import bare  # noqa: E402
from bench.kernels import nullcall  # noqa: E402
from hypervisor.toolstack.config import DomainConfig  # noqa: E402
from hypervisor.toolstack.session import boot, run_domain  # noqa: E402

IMAGE = ROOT / "firmware/guest.elf"
HASHCHAIN = ROOT / "firmware/user/hashchain.elf"
SLICE = 50_000


def pvlab_hashchain(rounds: int, pages: int, clock: str) -> tuple[float, int, bytes]:
    cfg = DomainConfig("bench", 32, 1, IMAGE, f"run=hashchain:{rounds}:{pages}", 1)
    hv, dom = boot(cfg, clock=clock, slice_insns=SLICE)
    t = time.perf_counter()
    r = run_domain(hv, dom)
    seconds = time.perf_counter() - t
    insns = dom.vcpus[0].clock
    hv.close()
    assert r.reason == "poweroff", dom.crash_report
    return seconds, insns, r.console


def empty_hook_us(calls: int) -> float:
    """The floor: the same hypercall loop in a bare engine whose syscall hook
    does nothing."""
    code = nullcall._loop(calls)
    stub = b"\x51\x41\x53\xb8\x11\x00\x00\x00\x0f\x05\x41\x5b\x59\xc3"
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, code + b"\xf4")
    uc.mem_write(0x2000, stub)
    from unicorn.x86_const import UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_RSP
    uc.reg_write(UC_X86_REG_R12, 0x2000)
    uc.reg_write(UC_X86_REG_R13, 0x1000 + len(code))  # the hlt: ends emu_start
    uc.reg_write(UC_X86_REG_RSP, 0x8000)
    uc.hook_add(UC_HOOK_INSN, lambda uc, ud: None, None, 1, 0, UC_X86_INS_SYSCALL)
    t = time.perf_counter()
    uc.emu_start(0x1000, 0)
    return (time.perf_counter() - t) / calls * 1e6


def pvlab_nullcall(calls: int) -> tuple[float, float]:
    nullcall.COUNT = calls
    cfg = DomainConfig("bench", 16, 1, IMAGE, "", 1, kernel="bench.kernels.nullcall")
    hv, dom = boot(cfg, clock="fast")
    run_domain(hv, dom)
    hv.close()
    return nullcall.RESULTS["x86_us"], nullcall.RESULTS["python_us"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100, help="hashchain rounds (default 100)")
    ap.add_argument("--pages", type=int, default=64, help="hashchain pages (default 64)")
    ap.add_argument("--calls", type=int, default=200_000, help="null hypercalls (default 200000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, best kept (default 3)")
    a = ap.parse_args()

    args = (a.rounds, a.pages, 0)
    counted = bare.run(HASHCHAIN, args, count_slice=SLICE)
    runs: dict[str, list[float]] = {"bare": [], "bare_count": [], "det": [], "fast": []}
    det_insns = 0
    # interleaved, best of each: every variant sees the same machine conditions
    for _ in range(a.repeat):
        runs["bare"].append(bare.run(HASHCHAIN, args).seconds)
        runs["fast"].append(pvlab_hashchain(a.rounds, a.pages, "fast")[0])
        runs["bare_count"].append(bare.run(HASHCHAIN, args, count_slice=SLICE).seconds)
        seconds, det_insns, _ = pvlab_hashchain(a.rounds, a.pages, "deterministic")
        runs["det"].append(seconds)
    bare_free, fast, bare_count, det = (min(runs[k]) for k in ("bare", "fast", "bare_count",
                                                                "det"))
    insns = counted.instructions or 1
    mips = lambda s: insns / s / 1e6  # noqa: E731

    print(f"hashchain {a.rounds} rounds x {a.pages} pages: {insns:,} instructions "
          f"(pvlab counted {det_insns:,} with the kernel); best of {a.repeat}, interleaved")
    print(f"  bare unicorn, one run          {mips(bare_free):8.1f} MIPS")
    print(f"  bare unicorn, count={SLICE}  {mips(bare_count):8.1f} MIPS")
    print(f"  pvlab fast clock               {mips(fast):8.1f} MIPS   "
          f"{bare_free / fast:.2f}x bare")
    print(f"  pvlab deterministic clock      {mips(det):8.1f} MIPS   "
          f"{bare_count / det:.2f}x bare with the same count slicing")

    hooks, pv = [], []
    for _ in range(a.repeat):
        hooks.append(empty_hook_us(a.calls))
        pv.append(pvlab_nullcall(a.calls))
    hook = min(hooks)
    x86, py = min(x for x, _ in pv), min(p for _, p in pv)
    print(f"null hypercall (xen_version), {a.calls:,} calls:")
    print(f"  empty unicorn syscall hook     {hook:6.2f} us")
    print(f"  pvlab from x86 (hypercall page){x86:6.2f} us   {x86 / hook:.2f}x the empty hook")
    print(f"  pvlab from the Python kernel   {py:6.2f} us   {py / hook:.2f}x the empty hook")


if __name__ == "__main__":
    main()
