"""The graded tests of lab postcopy-balloon.

One process (race.py, with the student's device.py in place) runs every
case: each seed's schedule with no post-copy, under drop and under
reconcile, and the reconcile's rules one at a time. The tests read what it
found: the invariants that failed and at which step, the device's counters,
and the story of any page lost or duplicated (its pfn, its frame, whose data
it holds, and the steps that brought it there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from labs.gradelib import Ctx, check, fail, test
from labs.postcopy_balloon import race

TIMEOUT = 120


def replay(t: Ctx, policy: str, seed: int) -> str:
    """The command that runs one case and prints its every step."""
    who = t.settings.who()
    return (f"Every step of this run: .venv/bin/python -m labs.postcopy_balloon.race "
            f"{' '.join(who)} --policy {policy} --seed {seed}")


@test(0, "the balloon on the race harness: every schedule, every rule")
def races(t: Ctx) -> dict[str, Any]:
    """race.py's findings with the student's device.py, once a grade."""
    argv = [sys.executable, "-m", "labs.postcopy_balloon.race", "--json", "--rules",
            *t.settings.who()]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        fail(t, f"the runs did not end within {TIMEOUT} s (a few dozen steps each): a loop "
             "that never ends?")
    if p.returncode:
        fail(t, f"the runs did not start:\n{p.stderr[-1500:]}")
    found = json.loads(p.stdout)
    if "import" in found:
        fail(t, f"your device.py does not import: {found['import']}")
    return found


# --- what every test says alike ----------------------------------------------------------

def ran(t: Ctx, case: dict[str, Any], what: str) -> None:
    """The case ran to its end, or a failure that says where it stopped."""
    if "stub" in case:
        fail(t, f"{what}: the run stopped in {case['stub']}, which is still the starting "
             "point's stub (NotImplementedError): write it (the handout, 'What to write').")
    if "raised" in case:
        fail(t, f"{what}: your code raised {case['raised']}\n"
             + textwrap.indent(case["traceback"].rstrip()[-1200:], "      "))


def invariants(t: Ctx, case: dict[str, Any], policy: str, seed: int) -> None:
    """No invariant failed; else the first ones, the page's story, and the rule."""
    found = case["violations"]
    if not found:
        return
    head = "\n".join(f"      after step {step}: {v}" for step, v in found[:6])
    story = "\n".join("      " + line for line in race.story(case, limit=2))
    kinds = " ".join(v for _, v in found)
    rule = []
    if "freed while absent" in kinds:
        rule.append("The balloon freed a frame whose page was still at the source. While "
                    "post-copy's inhibit is held no frame may leave the domain: the pager "
                    "still holds it for its pfn, the allocator hands it to the next "
                    "populate_physmap, and the page that arrives later is placed on it over "
                    "the new owner's data (QEMU's reason to inhibit the balloon during "
                    "post-copy). inflate_frame gives the frame to _hold while "
                    "self.inhibits, and reconcile frees nothing still absent (_kept).")
    if "holds" in kinds:
        rule.append("A page holds another's data (or its own old copy): the guest's write "
                    "is lost and the arriving page is there twice over, once where the "
                    "guest wanted it and once on a frame that is no longer its pfn's.")
    if "freed twice" in kinds:
        rule.append("A frame was freed twice: the reconcile frees each frame at most once, "
                    "however many requests named it.")
    if "lost" in kinds or "gone" in kinds:
        rule.append("The account does not close: the domain's frames must be its mapped "
                    "pages plus what the policy left it (under drop the inflates it "
                    "dropped, under reconcile nothing once it is released).")
    if "disagree" in kinds or "not the domain's" in kinds or "two pfns" in kinds:
        rule.append("A pfn the guest maps lost its frame or its M2P entry: only a queued "
                    "inflate's frame loses its M2P entry, and a frame the guest took back "
                    "or uses is never freed.")
    fail(t, f"under {policy}, seed {seed}, the invariants failed:\n{head}\n"
         + (f"The page, step by step:\n{story}\n" if story else "")
         + " ".join(rule) + "\n" + replay(t, policy, seed))


def counters(case: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in case["metrics"].items() if v) or "nothing"


# --- the tests -------------------------------------------------------------------------------

@test(5, "no post-copy: an inflate frees its frame at once, a deflate is counted",
      parent=races)
def no_postcopy(t: Ctx) -> None:
    for seed in t.seeds(race.SEEDS):
        case = t.parent[f"none-{seed}"]
        ran(t, case, f"with no post-copy (seed {seed})")
        invariants(t, case, "none", seed)
        m = case["metrics"]
        check(t, m["freed"] == case["inflated"] and m["deflated"] > 0
              and not m["dropped"] + m["queued"],
              f"with no post-copy and no inhibit the guest inflated {case['inflated']} pages, "
              f"and the device counted {counters(case)}. With no inhibit held, "
              "inflate_frame frees every frame it may (_free: counted freed) and deflate_frame "
              "counts every frame of the domain's (deflated); nothing is dropped or "
              f"queued.\n{replay(t, 'none', seed)}")


@test(15, "drop (QEMU's): inflates and deflates while pages are in flight are acknowledged "
      "and not acted on; no page lost", parent=races)
def drop(t: Ctx) -> None:
    for seed in t.seeds(race.SEEDS):
        case = t.parent[f"drop-{seed}"]
        ran(t, case, f"under drop (seed {seed})")
        invariants(t, case, "drop", seed)
        m = case["metrics"]
        check(t, m["freed"] == 0 and m["dropped"] == case["inflated_inhibited"]
              and m["dropped_deflates"] > 0 and not m["deflated"] + m["queued"],
              f"under drop the guest inflated {case['inflated_inhibited']} pages while "
              f"inhibited, and the device counted {counters(case)}. QEMU's drop acts on "
              "nothing: each inflate counted dropped, each deflate dropped_deflates (not "
              f"deflated), nothing freed or queued, then or at the release.\n"
              f"{replay(t, 'drop', seed)}")
    rule = t.parent["rules"]["drop_untouched"]
    ran(t, rule, "an inflate under drop")
    check(t, rule["m2p_kept"] and rule["queue"] == 0 and rule["tot_pages"] == 48,
          "an inflate under drop must leave the frame as it was: still the domain's, its M2P "
          "entry untouched, nothing queued (QEMU's virtio_balloon_handle_output does nothing "
          f"while inhibited); the run found M2P kept {rule['m2p_kept']}, queue "
          f"{rule['queue']}, the domain's frames {rule['tot_pages']} of 48.")


@test(15, "reconcile: requests queued while pages are in flight, applied at the release; "
      "no page lost, nothing left", parent=races)
def reconcile(t: Ctx) -> None:
    for seed in t.seeds(race.SEEDS):
        case = t.parent[f"reconcile-{seed}"]
        ran(t, case, f"under reconcile (seed {seed})")
        invariants(t, case, "reconcile", seed)
        m = case["metrics"]
        check(t, case["queue"] == 0 and m["dropped"] + m["dropped_deflates"] == 0
              and m["queued"] >= case["inflated_inhibited"] > 0,
              f"under reconcile the guest inflated {case['inflated_inhibited']} pages while "
              f"inhibited; the device counted {counters(case)} and has {case['queue']} "
              "requests still queued after the release. Each checked request is queued "
              "(_hold: counted queued), none dropped, and the release (reconcile) empties "
              f"the queue.\n{replay(t, 'reconcile', seed)}")
        check(t, m["freed"] == m["reconciled"] > 0 and case["left"] == 0,
              f"under reconcile the release applied the queue: {counters(case)}. Every "
              "frame the reconcile frees is counted reconciled (and freed); the queued "
              "inflates of pages that arrived meanwhile are freed at the release.\n"
              f"{replay(t, 'reconcile', seed)}")


RULES = {   # rule: (what the run must show, the rule as the handout says it)
    "arrived_then_released": (
        lambda r: r["freed_before_release"] == 0 and r["freed"] == r["reconciled"] == 1,
        "an inflate of a page that arrived meanwhile is applied at the release: nothing "
        "freed before it, the frame freed (reconciled 1) at it"),
    "taken_back": (
        lambda r: r["same_frame"] and r["freed"] == 0 and r["kept"] == 1,
        "an inflate then a deflate of one frame (the guest took its own frame back) is "
        "nothing: the frame stays, counted kept"),
    "pfn_back_in_m2p": (
        lambda r: r["freed"] == 0 and r["kept"] == 1,
        "a frame whose pfn is back in the M2P at the release is used by the guest again: "
        "kept, not freed"),
    "inflated_twice": (
        lambda r: r["freed"] == 1 and not r["freed_twice"],
        "a frame named by two inflates is freed once"),
    "absent_at_release": (
        lambda r: r["freed"] == 0 and r["kept"] == 1 and r["still_absent"],
        "a frame still absent at the release (its page not arrived) is never freed: kept"),
}


@test(10, "the reconcile's rules, one frame at a time", parent=races)
def reconcile_rules(t: Ctx) -> None:
    for name, (ok, rule) in RULES.items():
        r = t.parent["rules"][name]
        ran(t, r, f"the rule '{rule}'")
        shown = {k: v for k, v in r.items() if k not in ("violations", "freed_twice")
                 and v not in (0, None)}
        check(t, ok(r) and not r["violations"], f"the rule: {rule}. The run of that one "
              f"case found {shown or 'nothing'}"
              + (f", and these invariants failed: {r['violations']}" if r["violations"]
                 else "") + ".")
