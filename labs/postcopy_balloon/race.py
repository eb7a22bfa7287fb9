"""``python -m labs.postcopy_balloon.race (--reference | --dir D)``: the
balloon during a post-copy whose pages are still arriving, on the race
harness (hypervisor/toolstack/balloonrace.py), with the student's device.py
in place of the balloon's (labs/overlay.py), in a process of its own.

A case is a policy and a seed. The seed makes a schedule (``schedule``): a
few pages arrive, then the guest balloons while the rest are still at the
source (inflates, deflates onto fresh frames, frames taken back, writes,
more pages arriving), then post-copy's end: the last pages arrive and the
inhibit is released. After every step the harness's invariants are checked
(``balloonrace.check``); each one that fails is kept with its step. Every
step is kept too, with the pfn and the frame it touched, so that a page
lost or duplicated can be told as a story: where its frame went, when.

``--no-inhibit`` runs post-copy without the inhibit (what a destination
that forgets QEMU's qemu_balloon_inhibit does): with the reference's device
it shows the race the inhibit exists for. ``--rules`` runs the reconcile's
rules one at a time. ``--json`` prints everything as one object, for the
grader; without it, the steps and what failed. Nothing here judges.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import traceback
from pathlib import Path
from typing import Any

# the schedule's shape: pages in before the guest balloons, its steps meanwhile
FIRST_ARRIVALS = 6
BALLOONING_STEPS = 34
WEIGHTS = {"inflate": 4, "deflate": 2, "write": 2, "arrive": 3, "reuse": 1}
SEEDS = (1, 2, 3)
POLICIES = ("none", "drop", "reconcile")  # none: no post-copy at all
CORRUPT = re.compile(r"pfn (0x[0-9a-f]+) holds (.*), not its own version (\d+)")


def schedule(seed: int) -> list[tuple[str, int]]:
    """The steps of one seed's run: (harness step, index), then the release."""
    rng = random.Random(seed)
    steps = [("arrive", rng.randrange(64)) for _ in range(FIRST_ARRIVALS)]
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    steps += [(rng.choices(names, weights)[0], rng.randrange(64))
              for _ in range(BALLOONING_STEPS)]
    return steps + [("release", 0)]


def _stub(e: BaseException) -> str | None:
    m = re.search(r"lab postcopy-balloon: ([\w.]+)", str(e))
    return m.group(1) if isinstance(e, NotImplementedError) and m else None


def _error(e: BaseException) -> dict[str, Any]:
    """What a student's function raised: the stub it was, or the traceback's end."""
    stub = _stub(e)
    if stub:
        return {"stub": stub}
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"raised": f"{type(e).__name__}: {e}", "traceback": "".join(tb)[-2500:]}


class Recorder:
    """One run on the harness: each step told (pfn, mfn, what happened),
    each invariant that failed with the step it first failed at."""

    def __init__(self, policy: str, no_inhibit: bool = False) -> None:
        from hypervisor.toolstack.balloonrace import Harness
        postcopy = policy != "none"
        self.h = Harness(None if no_inhibit or not postcopy else policy, postcopy)
        self.events: list[dict[str, Any]] = []
        self.violations: list[tuple[int, str]] = []
        self.counts = {"inflated_inhibited": 0, "inflated": 0}

    def close(self) -> None:
        self.h.close()

    def _absent(self, mfn: int) -> bool:
        import numpy as np

        from hypervisor import domctl
        return bool(domctl.mem_paging_absent(self.h.hv, np.array([mfn]))[0])

    def _event(self, step: int, what: str, pfn: int, mfn: int, text: str) -> None:
        self.events.append({"step": step, "what": what, "pfn": pfn, "mfn": mfn, "text": text})

    def step(self, n: int, name: str, i: int) -> None:
        """Harness step ``name`` with index ``i``, told before and after."""
        getattr(self, "_" + name)(n, i)
        for v in self.h.violations():
            if v not in {old for _, old in self.violations}:
                self.violations.append((n, v))

    def _inflate(self, n: int, i: int) -> None:
        h = self.h
        pfn = h._pick(h.mapped(), i)
        if pfn is None:
            return
        mfn = int(h.p2m[pfn])
        where = "its page still at the source" if self._absent(mfn) else "its page here"
        freed = h.bal.metrics.freed
        self.counts["inflated"] += 1
        self.counts["inflated_inhibited"] += h.inhibited
        h.inflate(i)
        did = "the balloon freed it" if h.bal.metrics.freed > freed else "not freed"
        self._event(n, "inflate", pfn, mfn, f"the guest inflates pfn {pfn:#x} (mfn {mfn:#x}, "
                    f"{where}): {did}")

    def _deflate(self, n: int, i: int) -> None:
        h = self.h
        pfn = h._pick(list(h.ballooned), i)
        if pfn is None or h.dom.tot_pages >= h.dom.max_pages:
            return
        h.deflate(i)
        mfn = int(h.p2m[pfn])
        self._event(n, "deflate", pfn, mfn, f"the guest deflates pfn {pfn:#x}: "
                    f"populate_physmap gives it mfn {mfn:#x}, and the guest writes its version "
                    f"{h.versions[pfn]} there")

    def _reuse(self, n: int, i: int) -> None:
        h = self.h
        pfn = h._pick(list(h.ballooned), i)
        if pfn is None or not h.inhibited:
            return
        mfn = h.ballooned[pfn]
        try:
            h.reuse(i)
        except AssertionError:
            # the frame was freed while inhibited: the guest cannot have it back
            h.ballooned[pfn] = mfn
            self._event(n, "reuse", pfn, mfn, f"the guest takes pfn {pfn:#x}'s inflated mfn "
                        f"{mfn:#x} back (a deflate naming it): it is no longer the domain's")
            self.violations.append((n, f"mfn {mfn:#x}, inflated while inhibited, left the "
                                    f"domain: pfn {pfn:#x} cannot have it back"))
            return
        self._event(n, "reuse", pfn, mfn, f"the guest takes pfn {pfn:#x}'s inflated mfn "
                    f"{mfn:#x} back (a deflate naming it) and writes its version "
                    f"{h.versions[pfn]}")

    def _write(self, n: int, i: int) -> None:
        h = self.h
        pfn = h._pick(h.mapped(), i)
        if pfn is None:
            return
        h.write(i)
        self._event(n, "write", pfn, int(h.p2m[pfn]), f"the guest writes pfn {pfn:#x} "
                    f"(mfn {int(h.p2m[pfn]):#x}): its version {h.versions[pfn]}")

    def _arrived(self, n: int, pfn: int) -> None:
        mfn = self.h.pager.mfn_of[pfn]
        self._event(n, "arrive", pfn, mfn, f"pfn {pfn:#x}'s page arrives: the pager places it "
                    f"on mfn {mfn:#x}, by the table it made at the start")

    def _arrive(self, n: int, i: int) -> None:
        h = self.h
        if h.pager is None:
            return
        pfn = h._pick(list(h.pager.outstanding), i)
        if pfn is None:
            return
        self._arrived(n, pfn)
        h.arrive(i)

    def _release(self, n: int, i: int) -> None:
        h = self.h
        if h.pager is None:
            return
        for pfn in sorted(h.pager.outstanding):
            self._arrived(n, pfn)
        h.release(i)
        self._event(n, "release", -1, -1, "post-copy's end: every page is in; the inhibit "
                    "is released" + (" (none was taken)" if h.policy is None else ""))

    def result(self) -> dict[str, Any]:
        h = self.h
        m = h.bal.metrics
        return {"violations": self.violations, "events": self.events,
                "metrics": {k: getattr(m, k) for k in ("freed", "deflated", "refused",
                                                       "dropped", "dropped_deflates", "queued",
                                                       "reconciled", "kept")},
                "queue": len(h.bal.queue), "inhibits": h.bal.inhibits, "left": len(h.left),
                "tot_pages": h.dom.tot_pages, "mapped": len(h.mapped()),
                "freed_logged": h.log.count, **self.counts}


def run_case(policy: str, seed: int, no_inhibit: bool = False) -> dict[str, Any]:
    """One policy on one seed's schedule; what happened, or what raised."""
    steps = schedule(seed)
    rec = None
    try:
        rec = Recorder(policy, no_inhibit)
        for n, (name, i) in enumerate(steps, 1):
            rec.step(n, name, i)
        return rec.result()
    except Exception as e:  # noqa: BLE001 - the student's code, reported
        out = _error(e)
        if rec is not None:
            out["events"] = rec.events
            out["at_step"] = len(rec.events)
        return out
    finally:
        if rec is not None:
            rec.close()


# --- the reconcile's rules, one at a time ----------------------------------------------------

def _rule(name: str, policy: str, body) -> dict[str, Any]:
    from hypervisor.toolstack.balloonrace import Harness
    h = Harness(policy, postcopy=True)
    try:
        found = body(h)
        m = h.bal.metrics
        found.update(freed=m.freed, kept=m.kept, reconciled=m.reconciled, queued=m.queued,
                     dropped=m.dropped, freed_twice=h.log.wrong, violations=h.violations())
        return found
    except Exception as e:  # noqa: BLE001 - the student's code, reported
        return _error(e)
    finally:
        h.close()


def _arrived_then_released(h) -> dict[str, Any]:
    h.inflate(5)
    h.arrive(5)
    before = h.bal.metrics.freed
    h.release()
    return {"freed_before_release": before}


def _taken_back(h) -> dict[str, Any]:
    h.inflate(5)
    mfn = h.ballooned[5]
    h.reuse(0)
    h.release()
    return {"same_frame": int(h.p2m[5]) == mfn}


def _pfn_back_in_m2p(h) -> dict[str, Any]:
    import numpy as np

    from hypervisor import domctl
    h.inflate(5)
    h.arrive(5)
    mfn = h.ballooned.pop(5)
    domctl.mmu_machphys_update(h.hv, h.dom, np.array([mfn]), np.array([5]))
    h.p2m[5] = mfn  # the guest maps it again, without a deflate naming it
    h.release()
    return {}


def _inflated_twice(h) -> dict[str, Any]:
    h.inflate(5)
    h.bal.inflate_frame(h.ballooned[5])
    h.release()
    return {}


def _absent_at_release(h) -> dict[str, Any]:
    """The release before the page came (no post-copy ends so; the check
    is there all the same)."""
    import numpy as np

    from hypervisor import domctl
    from hypervisor.toolstack import balloonctl
    h.inflate(5)
    mfn = h.ballooned[5]
    balloonctl.postcopy_release(h.dom)
    return {"still_absent": bool(domctl.mem_paging_absent(h.hv, np.array([mfn]))[0])}


def _drop_untouched(h) -> dict[str, Any]:
    from hypervisor.toolstack import balloonctl
    h.inflate(5)
    mfn = h.ballooned[5]
    line = balloonctl.postcopy_release(h.dom)
    return {"m2p_kept": int(h.hv.machine.m2p[mfn]) == 5, "queue": len(h.bal.queue),
            "release_line": line, "tot_pages": h.dom.tot_pages}


RULES = {
    "arrived_then_released": ("reconcile", _arrived_then_released),
    "taken_back": ("reconcile", _taken_back),
    "pfn_back_in_m2p": ("reconcile", _pfn_back_in_m2p),
    "inflated_twice": ("reconcile", _inflated_twice),
    "absent_at_release": ("reconcile", _absent_at_release),
    "drop_untouched": ("drop", _drop_untouched),
}


def run_rules() -> dict[str, Any]:
    return {name: _rule(name, policy, body) for name, (policy, body) in RULES.items()}


# --- what a person reads ---------------------------------------------------------------------

def story(case: dict[str, Any], limit: int = 3) -> list[str]:
    """Each page found holding another's data, told from its frame's history."""
    lines = []
    for step, v in case.get("violations", []):
        m = CORRUPT.match(v)
        if m is None:
            continue
        pfn = int(m.group(1), 16)
        mfn = next((e["mfn"] for e in reversed(case["events"]) if e["step"] <= step
                    and e["pfn"] == pfn and e["what"] in ("deflate", "write", "reuse")), None)
        lines.append(f"at step {step}: {v}" + (f" (on mfn {mfn:#x})" if mfn is not None else ""))
        if mfn is not None:
            lines += [f"    step {e['step']}: {e['text']}" for e in case["events"]
                      if e["mfn"] == mfn and e["step"] <= step]
        if len(lines) > 4 * limit:
            break
    return lines


def report(name: str, case: dict[str, Any], verbose: bool = True) -> list[str]:
    lines = [f"== {name}"]
    if verbose:
        lines += [f"  step {e['step']}: {e['text']}" for e in case.get("events", [])]
    if "stub" in case:
        return lines + [f"  stopped in {case['stub']}: still the starting point's stub"]
    if "raised" in case:
        return lines + [f"  raised {case['raised']}", case["traceback"]]
    found = case["violations"]
    lines += [f"  after step {step}: {v}" for step, v in found] or ["  every invariant held"]
    lines += ["  " + line for line in story(case)]
    if "metrics" in case:
        lines.append("  device: " + ", ".join(f"{k} {v}" for k, v in case["metrics"].items()
                                              if v))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labs.postcopy_balloon.race",
                                description="the balloon during a post-copy whose pages are "
                                            "still arriving, on the race harness: every step "
                                            "and every invariant that failed")
    p.add_argument("--dir", default=".", help="the directory holding postcopy-balloon/")
    p.add_argument("--reference", action="store_true", help="the repo's own device.py")
    p.add_argument("--policy", choices=POLICIES, help="one policy (default: all)")
    p.add_argument("--seed", type=int, help="one seed (default: 1, 2 and 3)")
    p.add_argument("--no-inhibit", action="store_true",
                   help="post-copy without the inhibit (--policy has no say): the race the "
                        "inhibit exists for")
    p.add_argument("--rules", action="store_true", help="the reconcile's rules one at a time")
    p.add_argument("--json", action="store_true", help="JSON, for the grader")
    args = p.parse_args(argv)
    from labs import LabError, find_lab
    from labs.overlay import install
    from labs.run import student_files
    try:
        if not args.reference:
            install(student_files(find_lab("postcopy-balloon"), Path(args.dir)))
    except LabError as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return 2
    try:
        import hypervisor.toolstack.balloonrace  # noqa: F401 - the student's file imports
    except Exception as e:  # noqa: BLE001 - a student's file that does not import
        found: dict[str, Any] = {"import": f"{type(e).__name__}: {e}"}
    else:
        seeds = [args.seed] if args.seed else list(SEEDS)
        if args.no_inhibit:  # post-copy, and no policy: none is ever asked
            found = {f"no-inhibit-{seed}": run_case("drop", seed, True) for seed in seeds}
        else:
            policies = [args.policy] if args.policy else list(POLICIES)
            found = {f"{pol}-{seed}": run_case(pol, seed) for pol in policies for seed in seeds}
        if args.rules:
            found["rules"] = run_rules()
    try:
        if args.json:
            print(json.dumps(found))
        elif "import" in found:
            print(f"device.py does not import: {found['import']}")
        else:
            for name, case in found.items():
                if name != "rules":
                    print("\n".join(report(name, case, verbose=len(found) == 1)))
    except BrokenPipeError:
        pass  # the reader went away (| head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
