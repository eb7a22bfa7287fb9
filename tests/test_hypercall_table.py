"""docs/hypercalls.md and the suite cannot drift: every row names a test that
exists, and every hypercall case module is cited by the table."""

from __future__ import annotations

import importlib
import re

from tests.conftest import ROOT

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
        assert len(cells) == 6, cells
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
