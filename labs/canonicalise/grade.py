"""The graded tests of lab canonicalise.

Real runs: the student's save must write the reference's image bit for bit
(the canonical form is unique); the reference's image restored by the
student's restore, on other frames, must finish the guest's work; the
student's save and restore together must, on more seeds; a guest whose
driver leaves device memory mapped must not be saved. Hand-made tables
(probe.py, in a process with the student's files): every bit but the frame
number kept, the Xen slots cleared, a frame that is not the domain's refused
at the save, a pfn with no frame refused at the restore.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from labs.canonicalise import probe
from labs.gradelib import Ctx, Result, diff_lines, test

GUEST, KEEPMAP = "guest.toml", "keepmap.toml"
OUTCOME = re.compile(r"^(hashchain digest|counter |hello|spawner|.*all programs exited).*$",
                     re.MULTILINE)


def data(t: Ctx, name: str) -> str:
    """A file beside the grader, named from the current directory when it is
    below it (so that a failure's replay command reads as the student types it)."""
    path = t.data(name)
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def save_at(seed: int) -> str:
    """When the grader saves the guest of this seed: 2..12 ms, tasks in flight."""
    return f"{2 + (3 * seed) % 11}ms"


def outcome(console: str) -> list[str]:
    """What the guest's programs printed of their results, order-free; the
    power-off line with its free-page count (a leak shows there)."""
    lines = [m.group(0) for m in OUTCOME.finditer(console)]
    return sorted(re.sub(r"^\[cpu\d+\] ", "", line) for line in lines)


# --- the reference's runs, made once a grade --------------------------------------------

def _reference(t: Ctx, name: str, *args: object) -> str:
    """Run the repo's own pvlab once a grade (kept in the scratch directory)
    and return its console; a failure is the grader's bug."""
    where = t.settings.scratch / "reference"
    where.mkdir(parents=True, exist_ok=True)
    log = where / f"{name}.txt"
    if not log.exists():
        r = t.pvlab(*args, timeout=300, reference=True)
        if r.rc != 0:
            raise RuntimeError(f"the reference's pvlab {args} failed: {r.err[-2000:]}")
        log.write_text(r.out)
    return log.read_text()


def reference_image(t: Ctx, seed: int) -> tuple[Path, str]:
    """The reference's image of the guest saved with ``seed``, and the
    console up to the save."""
    img = t.settings.scratch / "reference" / f"seed{seed}.img"
    console = _reference(t, f"save{seed}", "save", data(t, GUEST), img, "--at", save_at(seed),
                         "--seed", seed)
    return img, console


def expected_outcome(t: Ctx) -> list[str]:
    """The guest's results run without a save (the same on every seed)."""
    return outcome(_reference(t, "run", "run", data(t, GUEST)))


def _failed(what: str, r: Result, fn: str, advice: str = "") -> str:
    """A failed run in words: a function not written yet, an exception the
    toolstack does not expect, or the run's own last lines and the advice."""
    out = r.out + r.err
    missing = re.search(r"NotImplementedError: lab canonicalise: (\w+)", out)
    if missing:
        return f"{what}: {missing.group(1)} is not written yet (it raises NotImplementedError)."
    if "Traceback" in out:
        return (f"{what}: an exception the toolstack does not expect (the traceback names "
                f"the line):\n{r.tail(8)}\nA save or a restore may fail only with SaveError "
                f"or RestoreError: is it your {fn}?")
    return f"{what}:\n{r.tail(6)}\n{advice}".rstrip()


# --- real runs ------------------------------------------------------------------------------

@test(15, "your save writes the reference's image, bit for bit (seeds 1-3)")
def save_is_canonical(t: Ctx) -> None:
    for seed in t.seeds(range(1, 4)):
        img = t.out(f"seed{seed}.img")
        r = t.pvlab("save", data(t, GUEST), img, "--at", save_at(seed), "--seed", seed)
        t.check(r.rc == 0, _failed("the save failed", r, "canonicalise", "A guest whose "
                "tables are all its own must save: is your ownership check right "
                "(m2p[mfn] < p2m.size and p2m[m2p[mfn]] == mfn), and did you clear an L4's "
                "Xen slots (256..271) before looking at its entries?"))
        ref, _ = reference_image(t, seed)
        r = t.pvlab("image", "diff", ref, img)
        if r.rc == 0:
            continue
        diff = r.tail(4)
        r = t.pvlab("image", "show", img)
        t.check(r.rc == 0, f"the image check refuses your image:\n{r.tail(3)}\nIn a canonical "
                "table, every present entry names a pfn of the image, and an L4/L3/L2 entry "
                "names a table one level down: bits 12..51 must hold the pfn, m2p[mfn].")
        t.fail(f"your image differs from the reference's (made from the same run):\n{diff}\n"
               "The canonical form is unique: in each present entry only bits 12..51 change "
               "(mfn -> pfn), every flag, bit 52..63 included, stays; non-present entries "
               "stay as they are; an L4's slots 256..271 become 0. The VCPU records hold cr3 "
               "and the user L4 as pfns (_mfn_to_pfn).")


@test(15, "the reference's image, restored by your code on other frames, finishes its work "
          "(seeds 1-3)")
def restore_localises(t: Ctx) -> None:
    for seed in t.seeds(range(1, 4)):
        ref, before = reference_image(t, seed)
        for frames in (seed + 10, seed + 20):
            r = t.pvlab("restore", ref, "--seed", frames)
            t.check(r.rc == 0, _failed(f"the restore (frame seed {frames}) failed", r,
                                       "localise_page", "Every present entry of a saved table "
                                       "holds a pfn; the new domain's frame for it is p2m[pfn]. "
                                       "If Xen refused a table (pinning failed) or the guest "
                                       "crashed, an entry names a frame that is not the new "
                                       "domain's, or lost a flag (bits 0..11 and 52..63 stay)."))
            got, want = outcome(before + r.out), expected_outcome(t)
            t.check(got == want, "the restored guest did not finish as it would have without "
                    f"the save (frame seed {frames}); its results, sorted:\n"
                    + diff_lines(want, got) + "\nA table localised wrongly runs the guest on "
                    "frames that are not its own: compare p2m[pfn] with what you wrote.")


@test(10, "your save, then your restore: the guest finishes its work (seeds 4-7)")
def round_trip(t: Ctx) -> None:
    for seed in t.seeds(range(4, 8)):
        img = t.out(f"seed{seed}.img")
        r = t.pvlab("save", data(t, GUEST), img, "--at", save_at(seed), "--seed", seed)
        t.check(r.rc == 0, _failed("the save failed", r, "canonicalise"))
        before = r.out
        r = t.pvlab("restore", img, "--seed", seed + 100)
        t.check(r.rc == 0, _failed("the restore failed", r, "localise_page"))
        got, want = outcome(before + r.out), expected_outcome(t)
        t.check(got == want, "after your save and your restore the guest's results differ "
                "from a run without the save:\n" + diff_lines(want, got))


@test(10, "a table that maps device memory stops the save, naming the entry")
def device_page_refused(t: Ctx) -> None:
    img = t.out("keepmap.img")
    r = t.pvlab("save", data(t, KEEPMAP), img, "--at", "6ms")
    t.check(r.rc == 1 and "pvlab: save failed:" in r.err and "Traceback" not in r.err,
            _failed("the balloon driver left its register page mapped (balloonbug=keepmap): "
                    "an L1 entry holds mfn 0xd0000, device memory, which has no pfn. The save "
                    "must fail with a SaveError (exit status 1, one line); it ended with "
                    f"status {r.rc}", r, "canonicalise"))
    line = r.err.strip().splitlines()[-1]
    ref = t.pvlab("save", data(t, KEEPMAP), t.out("reference.img"), "--at", "6ms",
                  reference=True)
    m = re.search(r"pfn (0x[0-9a-f]+) \(L(\d)\) slot (\d+)", ref.err)
    if m is None:  # the grader's own bug: reported as such, not as the student's
        raise RuntimeError(f"the reference's save did not refuse the device mapping:\n"
                           f"{ref.tail()}")
    pfn, level, slot = m.groups()
    for part, what in ((r"0xd0000\b", "the mfn (0xd0000)"),
                       (rf"pfn {pfn}\b", f"the table's pfn ({pfn})"),
                       (rf"\(L{level}\)", f"its level (L{level})"),
                       (rf"slot {slot}\b", f"the slot ({slot})"),
                       (rf"bad mfn for L{level}\[{slot}\]",
                        f"Xen's words, 'bad mfn for L{level}[{slot}]'")):
        t.check(re.search(part, line), f"the save failed, but its message does not name "
                f"{what}:\n      {line}\nA student of the image must find the entry from "
                "the message alone: 'pagetable pfn P (Ln) slot S: entry E holds mfn M, which "
                "is not the domain's (bad mfn for Ln[S])'.")
    t.check(not img.exists(), "the save failed but left a file at the destination")


# --- hand-made tables -----------------------------------------------------------------------

def probed(t: Ctx, reference: bool = False) -> dict:
    """probe.py's findings with the student's files (or the reference's),
    once a grade."""
    who = "reference" if reference or t.settings.student is None else "student"
    cache = t.settings.scratch / f"probe-{who}.json"
    if not cache.exists():
        flags = ["--reference"] if who == "reference" else ["--dir", str(t.settings.student)]
        try:
            p = subprocess.run([sys.executable, "-m", "labs.canonicalise.probe", "--json",
                                *flags], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            t.fail("your functions did not return within 120 s on tables of two or three "
                   f"rows: a loop that never ends?\n{_replay(t)}")
        if p.returncode:
            t.fail(f"the probe of your functions did not run:\n{p.stderr[-1500:]}")
        cache.write_text(p.stdout)
    found = json.loads(cache.read_text())
    if "import" in found:
        t.fail(f"your save.py or restore.py does not import: {found['import']}")
    return found


def _replay(t: Ctx) -> str:
    where = t.settings.student or Path(".")
    return ("run the cases yourself: .venv/bin/python -m labs.canonicalise.probe "
            + ("--reference" if t.settings.student is None else f"--dir {where}"))


def _not_written(t: Ctx, fn: str, case: dict) -> None:
    t.check(case.get("raised") != "NotImplementedError",
            f"{fn} is not written yet (it raises NotImplementedError).\n{_replay(t)}")


def _entries(case: dict) -> dict[tuple[int, int], str]:
    return {(r, s): v for r, s, v in case.get("out", [])}


def _compare(t: Ctx, fn: str, got: dict, want: dict, names: dict[tuple[int, int], str],
             levels: list[int], pfns: list[int]) -> None:
    _not_written(t, fn, got)
    if "raised" in got:
        t.fail(f"{fn} raised {got['raised']} on tables that must pass (every frame in them "
               f"the domain's, but in Xen's L4 slots, which are cleared): {got['message']}\n"
               f"{_replay(t)}")
    t.check("out" in got, f"{fn} returned an array of shape {got.get('shape')}, not the "
            f"shape of the tables it was given\n{_replay(t)}")
    t.check(not got["changed_input"], f"{fn} changed the tables it was given: work on a copy "
            "(at the save they are the guest's own pages, read through a foreign mapping)")
    have, need = _entries(got), _entries(want)
    wrong = []
    for key in sorted(set(have) | set(need)):
        if have.get(key) != need.get(key):
            row, slot = key
            wrong.append(f"    L{levels[row]} pfn {pfns[row]:#x} slot {slot} "
                         f"({names.get(key, 'an entry that was 0')}): expected "
                         f"{need.get(key, '0')}, yours {have.get(key, '0')}")
    t.check(not wrong, f"{fn} wrote entries other than the reference's:\n" + "\n".join(wrong)
            + "\nOnly bits 12..51 of a present entry change; everything else is kept.\n"
            + _replay(t))


CANON_NAMES = {(0, 0): "present, mfn 12", (0, 5): "NX and bit 52 set, mfn 13",
               (0, 6): "not present, other bits set", (1, 3): "present, mfn 11",
               (1, 256): "Xen's slot 256", (1, 271): "Xen's slot 271",
               (1, 272): "slot 272, the guest's, mfn 10 -> pfn 0", (2, 7): "present, mfn 13"}
LOCAL_NAMES = {(0, 0): "NX and bit 52 set, pfn 3", (0, 6): "not present, other bits set",
               (0, 7): "present, pfn 0", (1, 3): "present, pfn 1"}


@test(10, "only the frame number changes: flags, NX, non-present entries, Xen's L4 slots")
def keeps_every_other_bit(t: Ctx) -> None:
    got, want = probed(t), probed(t, reference=True)
    _compare(t, "canonicalise", got["canonicalise"]["good"], want["canonicalise"]["good"],
             CANON_NAMES, probe.CANON_LEVELS, probe.CANON_PFNS)
    _compare(t, "localise_page", got["localise_page"]["good"], want["localise_page"]["good"],
             LOCAL_NAMES, probe.LOCAL_LEVELS, probe.LOCAL_PFNS)


def _refused(t: Ctx, fn: str, case: dict, error: str, must: list[tuple[str, str]],
             story: str) -> None:
    _not_written(t, fn, case)
    if "raised" not in case:
        t.fail(f"{fn} accepted {story}: it must raise {error}.\n{_replay(t)}")
    t.check(case["raised"] == error, f"{fn}, given {story}, raised {case['raised']} "
            f"({case['message']}); it must raise {error}, the error the toolstack reports "
            f"as one line.\n{_replay(t)}")
    for regex, what in must:
        t.check(re.search(regex, case["message"]), f"{fn} refused {story}, but its message "
                f"does not name {what}:\n      {case['message']}\n{_replay(t)}")


@test(5, "a frame the M2P and the p2m do not agree on, or a superpage, stops the save")
def foreign_frame_refused(t: Ctx) -> None:
    cases = probed(t)["canonicalise"]
    where = [(r"pfn 0x1\b", "the table's pfn (0x1)"), (r"\(L1\)", "its level (L1)"),
             (r"slot 9\b", "the slot (9)")]
    _refused(t, "canonicalise", cases["device"], "SaveError", where + [(r"0xd0000", "the mfn")],
             "an L1 entry holding mfn 0xd0000, beyond the M2P")
    _refused(t, "canonicalise", cases["beyond_p2m"], "SaveError", where + [(r"0x16", "the mfn")],
             "an L1 entry holding mfn 0x16, whose M2P entry is pfn 7, beyond the p2m's 4 pfns")
    _refused(t, "canonicalise", cases["foreign"], "SaveError", where + [(r"0x17", "the mfn")],
             "an L1 entry holding mfn 0x17: the M2P says pfn 1, but the domain's p2m puts "
             "pfn 1 on mfn 11 (the M2P and the p2m must agree both ways)")
    _refused(t, "canonicalise", cases["superpage"], "SaveError", [(r"superpage", "a superpage")],
             "an L2 entry with _PAGE_PSE (a 2 MiB superpage: Xen cannot migrate one)")


@test(10, "a pfn with no frame stops the restore, naming the entry")
def no_frame_refused(t: Ctx) -> None:
    cases = probed(t)["localise_page"]
    where = [(r"pfn 0x9\b", "the table's pfn (0x9)"), (r"\(L4\)", "its level (L4)"),
             (r"slot 9\b", "the slot (9)")]
    _refused(t, "localise_page", cases["no_frame"], "RestoreError",
             where + [(r"pfn 0x2\b", "the pfn (0x2)")],
             "an L4 entry naming pfn 2, whose p2m entry is INVALID_MFN")
    _refused(t, "localise_page", cases["beyond_p2m"], "RestoreError",
             where + [(r"pfn 0x4\b", "the pfn (0x4)")],
             "an L4 entry naming pfn 4, beyond the p2m's 4 pfns")
    _refused(t, "localise_page", cases["far_beyond"], "RestoreError",
             where + [(r"0x8000000000", "the pfn (0x8000000000)")],
             "an L4 entry naming pfn 0x8000000000, far beyond the p2m")

