"""Functions short enough to read at a glance: none in guestos/ or
hypervisor/ runs past LONGEST lines unless it is listed here with the reason
its length serves the reader (a table read top to bottom, say). A new long
function fails this test until it is split or its reason is written down."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

LONGEST = 60

# file::function -> why it is longer
ALLOWED: dict[str, str] = {}


def long_functions() -> dict[str, int]:
    out = {}
    for package in ("guestos", "hypervisor"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > LONGEST:
                        out[f"{path.relative_to(ROOT)}::{node.name}"] = lines
    return out


def test_no_function_is_longer_than_a_screen_without_a_reason():
    assert {name: n for name, n in long_functions().items() if name not in ALLOWED} == {}


def test_every_allowed_long_function_is_still_long():
    """A function split since keeps no entry here."""
    assert set(ALLOWED) <= set(long_functions())
