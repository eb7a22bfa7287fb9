"""The graded tests of lab balloon-s4.

One run per policy and seed checkpoints the handout's guest, ballooned to
half, at 8 ms; the image is kept and the guest thaws and runs on. The tests
read what the host sees: the image (its size, the device's `actual`), the
host's statistics and counters after the thaw and after a restore in a new
process, and the free pages at power-off against those before the first
task, which must match once the host has given all the memory back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from labs.gradelib import POWER_OFF, Ctx, Result, check, fail, test

# the seeds each policy is graded on: the discard's restore is the lab's centre
SEEDS = {"discard": range(1, 4), "deflate": range(1, 3), "keep": range(1, 2)}
BALLOON = 4096             # pages: mem-set 16 of the guest's 32 MiB
AFTER_THAW = 2048          # pages: the thawed guest's mem-set 24
RING_PAGES = 9             # 3 queues x (descriptors, available ring, used ring)
IMAGE = "s4-checkpoint-001.img"


@dataclass
class Checkpoint:
    run: Result            # the run: checkpoint at 8 ms, thaw, mem-set 24, power-off
    image: Path

    @property
    def ok(self) -> bool:
        return self.run.rc == 0 and self.image.is_file()


class Checkpoints:
    """The checkpoint runs, (policy, seed) -> Checkpoint, each made when it is
    first needed: a test stops at its first failure, so a starting point
    whose runs fail makes only those the tests look at."""

    def __init__(self, t: Ctx, where: dict[tuple[str, int], Path]) -> None:
        self.t = t
        self.where = where
        self.made: dict[tuple[str, int], Checkpoint] = {}

    def args(self, key: tuple[str, int]) -> tuple[object, ...]:
        policy, seed = key
        return ("run", self.t.data(f"{policy}.toml"), "--seed", seed,
                "--checkpoint-dir", self.where[key])

    def __getitem__(self, key: tuple[str, int]) -> Checkpoint:
        if key not in self.made:
            self.made[key] = Checkpoint(self.t.pvlab(*self.args(key)), self.where[key] / IMAGE)
        return self.made[key]

    def make_all(self) -> None:
        """Every run not made yet, ``t.jobs`` at a time."""
        todo = {key: self.args(key) for key in self.where if key not in self.made}
        for key, r in in_parallel(self.t, todo).items():
            self.made[key] = Checkpoint(r, self.where[key] / IMAGE)


# --- reading what pvlab printed ----------------------------------------------------------

def stub_named(r: Result) -> str | None:
    m = re.search(r"NotImplementedError: lab balloon-s4: (\w+)", r.out + r.err)
    return m.group(1) if m else None


def crash_line(r: Result) -> str | None:
    m = re.search(r"^pvlab: .*(?:crashed|hung|failed).*$", r.err + r.out, re.MULTILINE)
    return m.group(0) if m else None


def poweroff(r: Result) -> tuple[int, int] | None:
    """(pages free at power-off, pages free before the first task)."""
    m = POWER_OFF.search(r.out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def image_mib(r: Result) -> float | None:
    m = re.search(r"checkpoint 1: .*: ([\d.]+) MiB image written", r.out)
    return float(m.group(1)) if m else None


@dataclass
class Stats:
    actual: int
    device: dict[str, int]   # the balloon device's counters that moved


def stats_at(r: Result, ms: int) -> Stats | None:
    """The host's balloon-stats request at ``ms``: `actual` and the counters."""
    m = re.search(rf"^\[toolstack\] at {ms}\.000 ms: balloon-stats\n\[toolstack\] balloon of "
                  rf"\S+: target \d+ pages, actual (\d+) pages.*\n((?:  .*\n)*)", r.out,
                  re.MULTILINE)
    if m is None:
        return None
    dev = re.search(r"^  device: (.*)$", m.group(2), re.MULTILINE)
    counters = dict(re.findall(r"(\w+) (\d+)", dev.group(1))) if dev else {}
    return Stats(int(m.group(1)), {k: int(v) for k, v in counters.items()})


def counted(device: dict[str, int]) -> str:
    """The device's counters as balloon-stats prints them."""
    return ", ".join(f"{k} {v}" for k, v in device.items()) or "nothing"


def ram_pages(r: Result) -> int | None:
    """The kernel's RAM count when the balloon last met its target."""
    found = re.findall(r"balloon at its target: \d+ pages \((\d+) pages of RAM", r.out)
    return int(found[-1]) if found else None


# --- the failures every test explains alike ---------------------------------------------

def ended(t: Ctx, r: Result, what: str) -> None:
    """The run powered off cleanly, or the failure says why in the lab's terms."""
    t.last = r
    if r.rc == 0 and poweroff(r):
        return
    if (fn := stub_named(r)) is not None:
        fail(t, f"{what}: the guest stopped in {fn}, which is still the starting point's "
             f"stub (NotImplementedError): write it (the handout, 'What to build').")
    pm_failed(t, r, what)
    line = crash_line(r) or "the run did not power off"
    hint = (" The kernel touched a page its linear map does not map: did a page of the "
            "balloon (no frame, unmapped) go back to the allocator as it was?"
            if "not present" in line else "")
    fail(t, f"{what}: {line}\n{r.tail()}\nA guest kernel oops names the function that "
         f"faulted; the run below repeats it.{hint}")


def pm_failed(t: Ctx, r: Result, what: str) -> None:
    m = re.search(r"PM: device virtio_balloon\d* failed to (\w+): error (-?\d+)", r.out)
    if m:
        fail(t, f"{what}: the balloon's {m.group(1)} callback returned {m.group(2)}, so the "
             f"PM core gave up on it. A callback returns 0 when the device is done (the "
             "thaw and the restore: what _restore_common returned).")


def no_deleted_queue(t: Ctx, r: Result, what: str) -> None:
    """Nothing is sent on a queue between the freeze and the set-up again."""
    if "which the freeze deleted: not sent" in r.out:
        fail(t, f"{what}: the driver sent a request on a queue the freeze had deleted (the "
             "console says 'which the freeze deleted'); in Linux that is a use after free. "
             "Before _restore_common there are no queues. And under discard the host has "
             "forgotten the balloon, so the discard tells it nothing: leak_balloon tells "
             "the host, the discard uses only its helpers (_populate, _give_back).")


def pages_short(t: Ctx, r: Result, expected_free: int, what: str) -> None:
    """The free pages at power-off are what the host's last target leaves."""
    free, before = poweroff(r)
    short = expected_free - free
    if short == 0:
        return
    if short > 0 and short % RING_PAGES == 0 and short < BALLOON // 4:
        fail(t, f"{what}: {short} pages short at power-off: {short // RING_PAGES} set(s) of "
             f"the queues' {RING_PAGES} ring pages were never freed. The freeze must "
             "delete the queues (_del_vqs) once the device is reset: the thaw and the "
             "restore make new ones.")
    fail(t, f"{what}: the guest powered off with {free} pages free where {expected_free} "
         f"were expected ({before} before the first task, less the balloon the host "
         f"last asked for): {abs(short)} pages {'short' if short > 0 else 'too many'}.")


# --- the runs --------------------------------------------------------------------------------

def each(t: Ctx, runs: Checkpoints,
         policies: tuple[str, ...]) -> Iterator[tuple[str, Checkpoint]]:
    """The parent's runs of these policies, each while its seed is the test's."""
    for policy in policies:
        for seed in t.seeds(SEEDS[policy]):
            yield policy, runs[policy, seed]


def image_of(t: Ctx, policy: str, ck: Checkpoint) -> Path:
    """The checkpoint's image, or a failure that says why there is none."""
    if ck.image.is_file():
        return ck.image
    t.last = ck.run
    refused = re.search(r"^\[toolstack\] checkpoint 1 failed: (.*)$", ck.run.out, re.MULTILINE)
    if refused and "is live" in refused.group(1):
        fail(t, f"under {policy} the save refused the balloon: {refused.group(1)}. "
             "virtballoon_freeze must reset the device (virtio_reset_device) before the image is "
             "written: a live device may still use rings in frames that the restore "
             "moves, and a device forgets its rings only at a reset.")
    if refused:
        fail(t, f"under {policy} the checkpoint failed: {refused.group(1)}")
    pm_failed(t, ck.run, f"the checkpoint under {policy}")
    ended(t, ck.run, f"the checkpoint under {policy}")
    fail(t, f"the checkpoint under {policy} wrote no image:\n{ck.run.tail()}")
    return ck.image


def in_parallel(t: Ctx, runs: dict[tuple[str, int], tuple[object, ...]]
                ) -> dict[tuple[str, int], Result]:
    """pvlab with each set of arguments, ``t.jobs`` at a time (each run is a
    process of its own, and deterministic)."""
    with ThreadPoolExecutor(max(1, t.jobs)) as pool:
        started = {key: pool.submit(t.pvlab, *args) for key, args in runs.items()}
        return {key: f.result() for key, f in started.items()}


@test(0, "checkpoints of the ballooned guest under each policy")
def checkpoints(t: Ctx) -> Checkpoints:
    """The first run alone; if it went well, all the others at once."""
    runs = Checkpoints(t, {(policy, seed): t.out(f"{policy}-{seed}")
                           for policy, seeds in SEEDS.items() for seed in t.seeds(seeds)})
    if runs[next(iter(runs.where))].ok:
        runs.make_all()
    return runs


@test(15, "the freeze: device reset, the balloon in the image as the policy says",
      parent=checkpoints)
def freeze(t: Ctx) -> None:
    for policy, ck in each(t, t.parent, tuple(SEEDS)):
        image_of(t, policy, ck)
        t.last = ck.run
        mib = image_mib(ck.run)
        check(t, mib is not None, "the image is there, but the run did not say it wrote "
              "it:\n" + ck.run.tail())
        if policy != "deflate":
            check(t, mib < 24, f"under {policy} the freeze keeps the balloon inflated (Linux "
                  "e562966: no pages asked of the host just to be discarded), so the "
                  f"balloon's pfns have no frames and the image is half the guest; it is "
                  f"{mib} MiB: your freeze gave the pages back.")
            continue
        check(t, mib > 24, "under deflate the freeze empties the balloon before the image is "
              "written (leak_balloon until num_pages is 0, as Linux's remove_common does), "
              f"so the image is the whole guest; it is {mib} MiB: the balloon's pfns "
              "still had no frames.")
        show = t.pvlab("image", "show", ck.image)
        m = re.search(r"device 0 \(EMULATOR_CONTEXT\): actual (\d+)", show.out)
        check(t, m is not None and m.group(1) == "0", "under deflate the host must hear that "
              "the balloon is empty before the image is written: the image's device record "
              f"says actual {m.group(1) if m else '?'}. Write `actual` with "
              "update_balloon_size once the balloon is empty (remove_common does).")


@test(15, "the thaw: the running guest keeps its balloon as the policy says and obeys "
      "the host", parent=checkpoints)
def thaw(t: Ctx) -> None:
    for policy, ck in each(t, t.parent, tuple(SEEDS)):
        r = ck.run
        pm_failed(t, r, f"the run with a checkpoint under {policy}")
        ended(t, r, f"the run with a checkpoint under {policy}")
        no_deleted_queue(t, r, f"the run with a checkpoint under {policy}")
        s = stats_at(r, 10)
        check(t, s is not None, "the host's balloon-stats at 10 ms printed nothing\n" + r.tail())
        deflate = policy == "deflate"
        want = {"deflated": BALLOON, "freed": 2 * BALLOON} if deflate else {"freed": BALLOON}
        rule = ("Under deflate the freeze gave the balloon back through the deflate queue, "
                "and the thawed guest fills it again to the host's target: the thaw sets the "
                "device up again (_restore_common queues the work)." if deflate else
                f"Under {policy} the thaw leaves the balloon as the freeze left it: the same "
                "domain goes on and the host remembers the balloon, so no page of it comes "
                "back (a page given back costs the host a frame to balloon again).")
        check(t, (s.actual, s.device) == (BALLOON, want),
              f"at 10 ms, after the thaw, the host saw actual {s.actual} and its device "
              f"counted {counted(s.device)}; it should see actual {BALLOON} and "
              f"{counted(want)}. {rule}")
        free, before = poweroff(r)
        if f"balloon at its target: {AFTER_THAW} pages" not in r.out:
            fail(t, "the host's mem-set 24 at 11 ms, after the thaw, was never carried out: "
                 f"the balloon never came to {AFTER_THAW} pages. The thaw must set the "
                 "device up again with its interrupt and config changes on "
                 "(_restore_common).")
        pages_short(t, r, before - AFTER_THAW, f"after the thaw under {policy}")


def restores(t: Ctx, policies: tuple[str, ...]) -> Iterator[tuple[str, Result]]:
    """Each image of these policies restored in a new process (all at once,
    then looked at in order): statistics at 12 ms, then the host gives the
    guest all its memory back."""
    images = {(policy, t.seed): image_of(t, policy, ck)
              for policy, ck in each(t, t.parent, policies)}
    done = in_parallel(t, {key: ("restore", image, "--request", "12ms balloon-stats",
                                 "--request", "13ms mem-set 32")
                           for key, image in images.items()})
    for policy, _ in each(t, t.parent, policies):
        yield policy, restored(t, policy, done[policy, t.seed])


def restored(t: Ctx, policy: str, r: Result) -> Result:
    """A restore's run: it ended, sent nothing on a deleted queue, leaked
    nothing, and went back to the host's target."""
    ended(t, r, f"the guest restored under {policy}")
    no_deleted_queue(t, r, f"the guest restored under {policy}")
    no_leak(t, r, policy)
    s = stats_at(r, 12)
    check(t, s is not None, "the host's balloon-stats at 12 ms printed nothing\n" + r.tail())
    check(t, s.actual == BALLOON, f"the restored guest did not go back to the host's target: "
          f"at 12 ms the host saw actual {s.actual}, not {BALLOON}. The target came through "
          "the image; the restore sets the device up again (_restore_common), which "
          "queues the work when the balloon is not at the target.")
    return r


def no_leak(t: Ctx, r: Result, policy: str) -> None:
    """The leak of Linux e562966: after mem-set 32 all the memory is RAM
    again, yet pages are missing from the free count."""
    free, before = poweroff(r)
    ram = ram_pages(r)
    short = before - free
    if short >= RING_PAGES * 2 and ram == 2 * BALLOON:
        puff = (" On the way the refill ran out of puff: the balloon can only take pages "
                "that are really free." if "Out of puff!" in r.out else "")
        fail(t, f"the restored guest under {policy} lost {short} pages. After mem-set 32 gave "
             f"it all its memory back it counted {ram} pages of RAM, but only {free} were "
             f"free at power-off, where {before} were free before the first task. Pages "
             "counted back as RAM but never freed: the leak of Linux e562966, whose "
             "restore only moved the counters (\"just a fancy way of leaking lots of "
             "memory\"). In a PV guest a ballooned pfn has no frame at all, so each page "
               "needs a fresh frame (_populate: XENMEM_populate_physmap) before it can be "
               "mapped and freed (_give_back)." + puff)


def nothing_lost(t: Ctx, r: Result, policy: str) -> None:
    """After mem-set 32 the guest has all its memory: every page is free
    again that was free before the first task, and all of it is RAM."""
    free, before = poweroff(r)
    ram = ram_pages(r)
    check(t, ram is not None, f"the guest restored under {policy} never said its balloon "
          "was at the host's target:\n" + r.tail())
    check(t, ram == 2 * BALLOON, f"after mem-set 32 the restored guest under {policy} counted "
            f"{ram} pages of RAM, not {2 * BALLOON}: pages that left the balloon did not "
            "come back to the RAM count (_give_back moves num_pages and the RAM count).")
    pages_short(t, r, before, f"the guest restored under {policy}, then given all its memory")


@test(15, "restored in a new process under discard: the pages back, the target again, "
      "no page lost (seeds 1-3)", parent=checkpoints)
def restore_discard(t: Ctx) -> None:
    for policy, r in restores(t, ("discard",)):
        freed = stats_at(r, 12).device.get("freed", 0)
        check(t, freed == BALLOON, "under discard the restored guest forgets its balloon "
                "(the host has forgotten it) and the host's target makes it inflate again: "
                f"the new device should have freed {BALLOON} frames by 12 ms, and it freed "
                f"{freed}. Under this policy virtballoon_restore calls _discard before it sets "
             "the device up again (_restore_common), so that the work finds the balloon "
             "empty and inflates it to the host's target.")
        nothing_lost(t, r, policy)


@test(10, "restored in a new process under deflate and keep: the target again, no page "
      "lost", parent=checkpoints)
def restore_deflate_keep(t: Ctx) -> None:
    for policy, r in restores(t, ("deflate", "keep")):
        freed = stats_at(r, 12).device.get("freed", 0)
        if policy == "keep":
            check(t, freed == 0, "under keep the balloon's pages and the device's `actual` "
                    "came through the image, so the restore has nothing to do to the balloon; "
                    f"yet the new device freed {freed} frames by 12 ms: the restore gave the "
                    "pages back and the work ballooned them again.")
        else:
            check(t, freed == BALLOON, "under deflate the balloon was empty in the image, and "
                    f"the restored guest fills it again to the host's target: the new device "
                    f"should have freed {BALLOON} frames by 12 ms, and it freed {freed}.")
        nothing_lost(t, r, policy)
