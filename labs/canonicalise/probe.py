"""``python -m labs.canonicalise.probe (--reference | --dir D)``: the lab's
functions called on small hand-made pagetables, in a process of their own
with the student's save.py and restore.py in place of the toolstack's
(labs/overlay.py), as pvlab runs them.

Prints, for each case, what came back (every nonzero entry by row and slot)
and whether the tables given were changed, or what was raised (its class
and message); ``--json`` prints it as one JSON object, which the grader
compares with the reference's. Nothing here judges.

The machine of the cases: pfns 0..3 of the domain are on mfns 10..13 (the
p2m), the M2P names them back; mfn 22 belongs to pfn 7, beyond the p2m; the
M2P says mfn 23 is pfn 1, but the domain's p2m puts pfn 1 on mfn 11 (a frame
of another domain's, or a stale M2P entry); mfn 0xd0000 is device memory,
beyond the M2P.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

INVALID = 0xFFFFFFFFFFFFFFFF
PRESENT, RW, USER, PSE = 0x1, 0x2, 0x4, 0x80
NX, BIT52 = 1 << 63, 1 << 52
JUNK = 0x7FF0_0000_0001_2340   # a non-present entry that holds other bits (a swap entry)
DEVICE_MFN = 0xD0000

# canonicalise's tables: row 0 an L1 (pfn 1), row 1 an L4 (pfn 0), row 2 an L2 (pfn 2)
CANON_LEVELS, CANON_PFNS = [1, 4, 2], [1, 0, 2]
CANON_ENTRIES = {                                     # (row, slot): entry
    (0, 0): (12 << 12) | 0x67,                        # present, mfn 12 -> pfn 2
    (0, 5): NX | BIT52 | (13 << 12) | 0x25,           # NX and bit 52 kept, mfn 13 -> pfn 3
    (0, 6): JUNK,                                     # not present: copied as it is
    (1, 3): (11 << 12) | RW | PRESENT,                # mfn 11 -> pfn 1
    (1, 256): (20 << 12) | RW | PRESENT,              # Xen's slots: cleared
    (1, 271): (21 << 12) | RW | PRESENT,
    (1, 272): (10 << 12) | USER | RW | PRESENT,       # the guest's again: mfn 10 -> pfn 0
    (2, 7): (13 << 12) | 0x27,                        # an L2 entry, no PSE: mfn 13 -> pfn 3
}
CANON_BAD = {                                          # case: (row, slot, entry)
    "device": (0, 9, (DEVICE_MFN << 12) | 0x67),
    "beyond_p2m": (0, 9, (22 << 12) | PRESENT),
    "foreign": (0, 9, (23 << 12) | PRESENT),
    "superpage": (2, 9, (11 << 12) | PSE | RW | PRESENT),
}

# localise_page's tables: row 0 an L1 (pfn 5), row 1 an L4 (pfn 9); pfn 2 has no frame
LOCAL_LEVELS, LOCAL_PFNS = [1, 4], [5, 9]
LOCAL_P2M = [10, 11, INVALID, 13]
LOCAL_ENTRIES = {
    (0, 0): NX | BIT52 | (3 << 12) | 0x67,            # pfn 3 -> mfn 13, NX and bit 52 kept
    (0, 6): JUNK,                                     # not present: copied as it is
    (0, 7): (0 << 12) | 0x25,                         # present, pfn 0 -> mfn 10
    (1, 3): (1 << 12) | RW | PRESENT,                 # pfn 1 -> mfn 11
}
LOCAL_BAD = {
    "no_frame": (1, 9, (2 << 12) | PRESENT),
    "beyond_p2m": (1, 9, (4 << 12) | PRESENT),
    "far_beyond": (1, 9, ((1 << 39) << 12) | PRESENT),
}


def tables_of(rows: int, entries: dict[tuple[int, int], int]) -> np.ndarray:
    out = np.zeros((rows, 512), dtype=np.uint64)
    for (row, slot), value in entries.items():
        out[row, slot] = value
    return out


def canon_machine() -> tuple[np.ndarray, np.ndarray]:
    p2m = np.array([10, 11, 12, 13], dtype=np.uint64)
    m2p = np.full(64, INVALID, dtype=np.uint64)
    m2p[[10, 11, 12, 13, 22, 23]] = [0, 1, 2, 3, 7, 1]
    return p2m, m2p


def outcome(call: Callable[[np.ndarray], object], tables: np.ndarray) -> dict:
    """What ``call(tables)`` did: its nonzero entries, or what it raised."""
    given = tables.copy()
    try:
        out = np.asarray(call(tables), dtype=np.uint64)
    except Exception as e:  # noqa: BLE001 - the student's code may raise anything
        return {"raised": type(e).__name__, "message": str(e)}
    if out.shape != tables.shape:
        return {"shape": list(out.shape)}
    entries = [[int(r), int(s), f"{int(out[r, s]):#018x}"] for r, s in np.argwhere(out)]
    return {"out": entries, "changed_input": bool((tables != given).any())}


def canonicalise_cases(save: object) -> dict[str, dict]:
    p2m, m2p = canon_machine()
    levels, pfns = np.array(CANON_LEVELS), np.array(CANON_PFNS)

    def call(tables: np.ndarray) -> object:
        return save.canonicalise(tables, levels, pfns, p2m, m2p)  # type: ignore[attr-defined]

    cases = {"good": outcome(call, tables_of(3, CANON_ENTRIES))}
    for name, (row, slot, entry) in CANON_BAD.items():
        cases[name] = outcome(call, tables_of(3, {**CANON_ENTRIES, (row, slot): entry}))
    return cases


def localise_cases(restore: object) -> dict[str, dict]:
    p2m = np.array(LOCAL_P2M, dtype=np.uint64)
    levels, pfns = np.array(LOCAL_LEVELS), np.array(LOCAL_PFNS)

    def call(tables: np.ndarray) -> object:
        return restore.localise_page(tables, levels, pfns, p2m)  # type: ignore[attr-defined]

    cases = {"good": outcome(call, tables_of(2, LOCAL_ENTRIES))}
    for name, (row, slot, entry) in LOCAL_BAD.items():
        cases[name] = outcome(call, tables_of(2, {**LOCAL_ENTRIES, (row, slot): entry}))
    return cases


def probe() -> dict:
    try:
        from hypervisor.toolstack import restore, save
    except Exception as e:  # noqa: BLE001 - a student's file that does not import
        return {"import": f"{type(e).__name__}: {e}"}
    return {"canonicalise": canonicalise_cases(save), "localise_page": localise_cases(restore)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labs.canonicalise.probe",
                                description="call canonicalise and localise_page on "
                                            "hand-made tables; print what they did (JSON)")
    p.add_argument("--dir", default=".", help="the directory holding canonicalise/")
    p.add_argument("--reference", action="store_true", help="the repo's own modules")
    p.add_argument("--json", action="store_true", help="JSON, for the grader")
    args = p.parse_args(argv)
    from labs import LabError, find_lab
    from labs.overlay import install
    from labs.run import student_files
    try:
        if not args.reference:
            install(student_files(find_lab("canonicalise"), Path(args.dir)))
    except LabError as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return 2
    found = probe()
    try:
        print(json.dumps(found) if args.json else "\n".join(report(found)))
    except BrokenPipeError:
        pass  # the reader went away (| head)
    return 0


def report(found: dict) -> list[str]:
    """The findings for a person: a line per case, then the entries returned."""
    if "import" in found:
        return [f"save.py or restore.py does not import: {found['import']}"]
    lines = []
    for fn, cases in found.items():
        for name, case in cases.items():
            if "raised" in case:
                lines.append(f"{fn} {name}: raised {case['raised']}: {case['message']}")
            elif "shape" in case:
                lines.append(f"{fn} {name}: returned an array of shape {case['shape']}")
            else:
                changed = " (and changed the tables it was given)" if case["changed_input"] \
                    else ""
                lines.append(f"{fn} {name}: returned{changed}")
                lines += [f"    row {r} slot {s}: {v}" for r, s, v in case["out"]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
