"""``pvlab demo``, the save/restore demo (``make demo``): an SMP guest running
hashchain and other tasks, two of its pgds unpinned at that moment, is saved
mid-run; a new process restores it on other machine frames and lets it
finish. Shown side by side: pfn -> mfn before and after, one pgd's entries as
they were (mfns), as saved (pfns) and as restored (new mfns), the PM steps
each side ran, and the digests beside an uninterrupted run's. Then a
checkpoint: the guest goes on (THAW) and the checkpoint, restored, finishes
the same. Exits 1 if anything differs.

The restoring side runs in a new process (``pvlab demo --restore-side``), so
that nothing but the image crosses over, as on a real host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.domctl import PFINFO_LPINTAB
from hypervisor.toolstack import pfinfo
from hypervisor.toolstack.config import DomainConfig, load_config
from hypervisor.toolstack.context import domain_of
from hypervisor.toolstack.session import boot, run_domain

# the checkout (or editable install) the package lives in: its example config
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = PACKAGE_ROOT / "examples" / "save-restore.toml"
SAVE_AT_NS = 12_000_000
CHECKPOINT_AT_NS = 20_000_000
LIMIT_NS = 2_000_000_000
STEPS = re.compile(r"\[cpu\d\] (suspend|PM:|xen_mm_|pre-suspend|post-suspend|xenbus: xs_|"
                   r"freezer: thaw|xen_suspend)")
SHOW_PFNS = 8
PM_LINES = 12             # the saving side's last steps shown
XEN_SLOTS = range(256, 272)  # an L4's hypervisor slots


def results(out: str) -> list[str]:
    return sorted(line for line in out.splitlines()
                  if line.startswith(("hashchain digest", "counter ", "hello", "spawner")))


def p2m_of(hv: Hypervisor, dom: Domain) -> np.ndarray:
    tdom = domain_of(hv, dom)  # where the builder or restorer put the p2m list
    frames = np.asarray(domctl.map_foreign_bulk(hv, dom, tdom.p2m_frames))
    return frames.reshape(-1)[:tdom.p2m_size].copy()


def frame(entry: int) -> int:
    return (entry >> 12) & 0xFFFFFFFFFF


def table_entries(hv: Hypervisor, mfn: int) -> list[tuple[int, int]]:
    # a peek at the machine's memory, not through the toolstack's interface:
    # the frame may belong to a domain already destroyed
    t = hv.machine.memory.frame(mfn)
    return [(int(i), int(t[i])) for i in np.flatnonzero(t & 1)[:4]]


def restore_side(image: str, out_json: str, pgd: int) -> int:
    """Run in the new process: restore, note the frames, run to the end."""
    from hypervisor.toolstack.restore import restore_image
    hv, dom, stats = restore_image(image)
    p2m = p2m_of(hv, dom)
    facts: dict[str, Any] = {"p2m": p2m.tolist(), "pinned": stats.pinned,
                             "pgd_entries": table_entries(hv, int(p2m[pgd])),
                             "tables": stats.tables}
    r = run_domain(hv, dom, LIMIT_NS)
    facts["console"] = r.console.decode()
    facts["reason"] = r.reason
    Path(out_json).write_text(json.dumps(facts))
    return 0


def restore_elsewhere(image: Path, out_json: Path, pgd: int) -> dict[str, Any] | None:
    """``restore_side`` in a new process; its facts, or None if it failed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                      env.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", "demo",
                            "--restore-side", str(image), str(out_json), str(pgd)],
                           env=env, capture_output=True, text=True)
    if child.returncode:
        print(child.stderr)
        return None
    return json.loads(out_json.read_text())


@dataclass
class Saved:
    """The saving side: what the old machine had and what the image holds."""

    console: str
    p2m: np.ndarray
    pgd: int                  # the pgd shown
    save_pinned: bool         # pinned for the save by xen_mm_pin_all
    old_entries: list[tuple[int, int]]
    saved_entries: list[tuple[int, int]]


def save_side(cfg: DomainConfig, image: Path) -> Saved:
    """Boot, run to SAVE_AT_NS, save (xl save) and note the frames."""
    from hypervisor.toolstack.image import scan_image
    from hypervisor.toolstack.session import save_domain
    hv, dom = boot(cfg)
    run_domain(hv, dom, SAVE_AT_NS - 1)
    before_p2m = p2m_of(hv, dom)
    types = domctl.getpageframeinfo3(hv, dom, before_p2m.astype(np.int64))
    pinned_before = (types & PFINFO_LPINTAB) != 0
    result, stats = save_domain(hv, dom, str(image), SAVE_AT_NS)
    console = result.console.decode()
    info = scan_image(image)
    pinned = np.flatnonzero(pfinfo.is_pinned_table(info.nibbles)
                            & (pfinfo.level(info.nibbles) == pfinfo.L4))
    by_pin_all = re.search(r"xen_mm_pin_all: (\d+) unpinned", console)
    # a pgd that was unpinned a moment before, pinned for the save by xen_mm_pin_all
    save_pinned_pgds = [int(p) for p in pinned if not pinned_before[p]]
    pgd = save_pinned_pgds[0] if save_pinned_pgds else int(pinned[-1])
    print(f"saved at {SAVE_AT_NS / 1e6:.0f} ms to {image.name}: {stats.bytes >> 20} MiB, "
          f"{stats.tables} pagetables canonicalised, {stats.pinned} pinned "
          f"({by_pin_all.group(1) if by_pin_all else 0} of them by xen_mm_pin_all), "
          f"{stats.total_s:.2f} s ({stats.canonicalise_s * 1e3:.1f} ms canonicalising)")
    # the pgd as the old machine had it: mfns (the domain is destroyed, but freed
    # frames keep their bytes until they are handed out again)
    old_entries = table_entries(hv, int(before_p2m[pgd]))
    saved = np.frombuffer(_page_in_image(info, pgd), dtype=np.uint64)
    saved_entries = [(i, int(saved[i])) for i, _ in old_entries]
    hv.close()
    return Saved(console, before_p2m, pgd, bool(save_pinned_pgds), old_entries,
                 saved_entries)


def show_frames(saved: Saved, after_p2m: np.ndarray) -> bool:
    """pfn -> mfn on both sides; True if (nearly) every pfn has a new frame."""
    print("\n-- pfn -> mfn: the same guest, other machine frames (restored in a new process)")
    print(f"{'pfn':>8} {'mfn saved':>10} {'mfn restored':>13}")
    n = min(len(after_p2m), len(saved.p2m))
    for pfn in np.linspace(0, n - 1, SHOW_PFNS).astype(int):
        print(f"{pfn:#8x} {int(saved.p2m[pfn]):#10x} {int(after_p2m[pfn]):#13x}")
    same = int((saved.p2m[:len(after_p2m)] == after_p2m).sum())
    print(f"{same} of {len(after_p2m)} pfns kept their mfn")
    return same < len(after_p2m) // 100


def show_pgd(saved: Saved, after_p2m: np.ndarray, restored: list[tuple[int, int]]) -> bool:
    """One pgd's first entries: mfns, pfns in the image, new mfns; True if
    each entry names the same pfn on every side."""
    how = ("unpinned until xen_mm_pin_all pinned it for the save" if saved.save_pinned
           else "pinned")
    print(f"\n-- pgd at pfn {saved.pgd:#x} ({how}): its first present entries")
    print(f"{'slot':>5} {'before (mfn)':>22} {'in the image (pfn)':>22} {'restored (mfn)':>22}")
    ok = True
    for (slot, old), (_, canon), (_, new) in zip(saved.old_entries, saved.saved_entries,
                                                  restored, strict=True):
        row = f"{slot:>5} {old:#22x} {canon:#22x} {new:#22x}"
        if slot in XEN_SLOTS:
            print(f"{row}  the hypervisor's slot: cleared in the image, filled again by "
                  "the new hypervisor")
            continue
        print(row)
        old_pfn = int(np.flatnonzero(saved.p2m == frame(old))[0])
        ok &= frame(canon) == old_pfn and frame(new) == int(after_p2m[old_pfn])
    return ok


def pm_columns(before: str, after: str) -> list[str]:
    """The PM steps side by side, whole: the left column as wide as its
    longest line, so that no step is cut."""
    left = [ln for ln in before.splitlines() if STEPS.search(ln)][-PM_LINES:]
    right = [ln for ln in after.splitlines() if STEPS.search(ln)]
    width = max(map(len, left), default=0)
    rows = max(len(left), len(right))
    left += [""] * (rows - len(left))
    right += [""] * (rows - len(right))
    return [f"{a:<{width}} | {b}".rstrip() for a, b in zip(left, right, strict=True)]


def show_results(reference: list[str], restored: list[str]) -> bool:
    print("\n-- results: uninterrupted run | saved and restored")
    for a, b in zip(reference, restored, strict=False):
        if a.startswith("hashchain"):
            print(f"{a:<40} | {b}{'' if a == b else '   DIFFERENT'}")
    print(f"all {len(reference)} result lines equal: {restored == reference}")
    return restored == reference


def checkpoint_side(cfg: DomainConfig, work: Path, reference: list[str]) -> bool:
    """A checkpoint: the guest goes on (THAW) and finishes; the checkpoint,
    restored in a new process, finishes the same."""
    from hypervisor.toolstack.checkpoint import CheckpointWriter
    from hypervisor.toolstack.control import Request
    print(f"\n-- checkpoint at {CHECKPOINT_AT_NS / 1e6:.0f} ms")
    hv, dom = boot(cfg)
    writer = CheckpointWriter(work)
    r = run_domain(hv, dom, LIMIT_NS, requests=[Request(CHECKPOINT_AT_NS, command="checkpoint")],
                   checkpoints=writer)
    hv.close()
    live = r.console.decode()
    thawed = "PM: dpm_resume_end(THAW)" in live and results(live) == reference
    print(f"the guest went on after the checkpoint (THAW) and finished: {thawed}")
    ck = writer.outcomes[0] if writer.outcomes else None
    again = False
    if ck is not None and ck.ok:
        print(f"checkpoint image: {ck.path.name}")
        facts = restore_elsewhere(ck.path, work / "checkpoint.json", 0)
        again = facts is not None and \
            results(live[:ck.console_bytes] + facts["console"]) == reference
    print(f"the checkpoint, restored in a new process, finished the same: {again}")
    return thawed and again


def run_demo(config: Path = EXAMPLE) -> int:
    """The whole demo; 0 if everything matches, 1 if not."""
    cfg = load_config(config)
    print(f"== {config.name}: {cfg.vcpus} VCPUs, {cfg.memory} MiB, "
          f"tasks {cfg.cmdline.split()[0][4:]}\n")
    hv, dom = boot(cfg)
    r = run_domain(hv, dom, LIMIT_NS)
    hv.close()
    reference = results(r.console.decode())
    print(f"uninterrupted run: {r.reason} at {r.virtual_ns / 1e6:.1f} ms, "
          f"{len(reference)} result lines")
    work = Path(tempfile.mkdtemp(prefix="pvlab-demo-"))
    try:
        ok = _save_and_restore(cfg, work, reference)
        ok = checkpoint_side(cfg, work, reference) and ok
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nsave-restore demo: " + ("everything matches" if ok else "SOMETHING DIFFERS"))
    return 0 if ok else 1


def _save_and_restore(cfg: DomainConfig, work: Path, reference: list[str]) -> bool:
    image = work / "guest.img"
    saved = save_side(cfg, image)
    facts = restore_elsewhere(image, work / "restored.json", saved.pgd)
    if facts is None:
        return False
    after_p2m = np.array(facts["p2m"], dtype=np.uint64)
    ok = show_frames(saved, after_p2m)
    ok &= show_pgd(saved, after_p2m, facts["pgd_entries"])
    print("\n-- PM steps: the saving side (FREEZE) | the restoring side (RESTORE)")
    print("\n".join(pm_columns(saved.console, facts["console"])))
    ok &= "PM: dpm_resume_end(RESTORE)" in facts["console"] and facts["reason"] == "poweroff"
    return show_results(reference, results(saved.console + facts["console"])) and ok


def _page_in_image(info: Any, pfn: int) -> bytes:
    from hypervisor.toolstack.imagetool import page_index
    off = int(page_index(info)[pfn])
    with open(info.path, "rb") as f:
        f.seek(off)
        return f.read(4096)
