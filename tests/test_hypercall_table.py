"""docs/hypercalls.md and the suite cannot drift: every row names a test that
exists, every hypercall case module is cited by the table, and every row says
how the x86 suite reaches it: by portable cases that exist and make the row's
hypercall, by a self-checking x86 test guest, or why it cannot."""

from __future__ import annotations

import importlib
import re

from hypervisor.public.xen import Hypercall
from tests.conftest import FIRMWARE, ROOT
from tests.hypercalls.kinds import hypercall_of
from tests.hypercalls.portable import CASES

ROW = re.compile(r"^\|(?P<cells>.+)\|\s*$")


def rows() -> list[list[str]]:
    out = []
    for line in (ROOT / "docs/hypercalls.md").read_text().splitlines():
        m = ROW.match(line)
        if not m or line.startswith("|---") or line.startswith("| hypercall"):
            continue
        out.append([c.strip() for c in re.split(r"(?<!\\)\|", m.group("cells"))])
    return out


def test_every_row_names_an_existing_test():
    table = rows()
    assert len(table) > 50
    for cells in table:
        assert len(cells) == 7, cells
        path, _, name = cells[5].partition("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name, None)), f"{cells[5]} does not exist"


def test_every_case_is_in_the_table():
    cited = {cells[5] for cells in rows()}
    for path in sorted((ROOT / "tests/hypercalls").glob("test_*.py")):
        module = importlib.import_module(f"tests.hypercalls.{path.stem}")
        for name in dir(module):
            if name.startswith("test_"):
                assert f"tests/hypercalls/{path.name}::{name}" in cited, \
                    f"{path.name}::{name} is not in docs/hypercalls.md"


def cited_cases(cell: str) -> list[str]:
    """The portable cases an x86 cell names ("case_a, case_b"), or [] for
    "no: why", "n/a: why" and "guest: name.elf"."""
    if cell.split(":")[0] in ("no", "n/a", "guest"):
        return []
    return [name.strip().strip("`") for name in cell.split(",")]


def made_by(names: list[str]) -> set[int]:
    return {hypercall_of(kind, list(rest)) for name in names
            for kind, *rest in CASES[name] if kind != "needs"}


def test_every_row_says_how_x86_reaches_it():
    """A row x86 can reach names portable cases (which exist and make the
    row's hypercall) or a test guest of firmware/tests that reports its own
    verdict; a row it cannot reach says why."""
    for cells in rows():
        hypercall, x86 = cells[0], cells[6]
        kind, _, why = x86.partition(":")
        if kind in ("no", "n/a"):
            assert why.strip(), f"{cells[:3]}: say why x86 does not reach it"
        elif kind == "guest":
            source = (FIRMWARE / "tests" / why.strip()).with_suffix(".S")
            assert "xtf_" in source.read_text(), f"{source.name} reports no verdict"
        else:
            names = cited_cases(x86)
            missing = [n for n in names if n not in CASES]
            assert not missing, f"{cells[:3]}: no portable case {missing}"
            if hypercall in Hypercall.__members__:
                assert Hypercall[hypercall] in made_by(names), \
                    f"{cells[:3]}: {names} never make {hypercall}"


def test_every_portable_case_is_cited_by_a_row():
    cited = {name for cells in rows() for name in cited_cases(cells[6])}
    assert sorted(CASES.keys() - cited) == [], "cases no row of docs/hypercalls.md cites"
