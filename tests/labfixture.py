"""A grade module for tests/test_labs.py: tests that pass, fail and need a
parent, without running pvlab."""

from labs.gradelib import Ctx, test


@test(0, "a parent that gives a value")
def parent(t: Ctx) -> int:
    return 41


@test(3, "a child that uses it", parent=parent)
def child(t: Ctx) -> None:
    t.check(t.parent + 1 == 42, "arithmetic")


@test(4, "fails on seed 3")
def seeded(t: Ctx) -> None:
    for seed in t.seeds(range(1, 6)):
        t.check(seed != 3, "seed 3 is the bad one")


@test(2, "a child of a failed test", parent=seeded)
def orphan(t: Ctx) -> None:
    pass
