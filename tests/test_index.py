"""docs/INDEX.md cannot go stale: every row names a pvlab file that defines the
function it names, every Linux, Xen or pvlab name the docs put in backticks and
pvlab defines is in the index, every Xen function docs/hypercalls.md cites is in
it, and no name is there twice."""

from __future__ import annotations

import ast
import re
from functools import cache

from tests.conftest import ROOT

ROW = re.compile(r"^\|(?P<cells>.+)\|\s*$")
TICKED = re.compile(r"`([^`\n]+)`")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def index_rows() -> list[list[str]]:
    """The cells of every row of the index's tables (headers and rules left out)."""
    out = []
    for line in (ROOT / "docs/INDEX.md").read_text().splitlines():
        m = ROW.match(line)
        if not m or line.startswith("|---") or line.startswith("| name "):
            continue
        out.append([c.strip() for c in m.group("cells").split("|")])
    return out


def ticked(cell: str) -> str:
    """The one backticked text of a cell."""
    found = TICKED.findall(cell)
    assert len(found) == 1, f"{cell!r}: one `name` per cell"
    return found[0]


@cache
def code(path: str) -> frozenset[str]:
    """A module's top-level functions and classes, and each class's methods as
    ``Class.method``."""
    tree = ast.parse((ROOT / path).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{m.name}" for m in node.body
                         if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return frozenset(names)


@cache
def defined(path: str) -> frozenset[str]:
    """What a row may name in a module: its code, and its top-level assigned
    names (a constant, a layout)."""
    tree = ast.parse((ROOT / path).read_text())
    names = set(code(path))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                elts = target.elts if isinstance(target, ast.Tuple) else [target]
                names.update(t.id for t in elts if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return frozenset(names)


@cache
def pvlab_code_names() -> frozenset[str]:
    """Every top-level function and class, and every method, of the guest
    kernel and the hypervisor, by its own name (dunder methods left out)."""
    names: set[str] = set()
    for path in sorted([*ROOT.glob("guestos/**/*.py"), *ROOT.glob("hypervisor/**/*.py")]):
        for name in code(str(path.relative_to(ROOT))):
            last = name.rpartition(".")[2]
            if not last.startswith("__"):
                names.add(last)
    return frozenset(names)


def indexed() -> set[str]:
    """The names the index knows: its name column, and its function column
    both whole and by its last part (``Vcpu.copy_from_guest`` gives
    ``copy_from_guest`` too)."""
    names = set()
    for cells in index_rows():
        names.add(ticked(cells[0]))
        fn = ticked(cells[3])
        names.update({fn, fn.rpartition(".")[2]})
    return names


def doc_words() -> set[str]:
    """The identifiers inside inline backticks of the docs and the labs (fenced
    blocks, which quote consoles and configurations, left out)."""
    words = set()
    for path in sorted([*ROOT.glob("docs/*.md"), *ROOT.glob("docs/labs/*.md")]):
        if path.name == "INDEX.md":
            continue
        text = FENCE.sub("", path.read_text())
        for span in TICKED.findall(text):
            words.update(WORD.findall(span))
    return words


def worth_indexing(word: str) -> bool:
    return "_" in word.strip("_") or re.fullmatch(r"[A-Z][a-z0-9]+[A-Z]\w*", word) is not None


def test_every_row_resolves():
    rows = index_rows()
    assert len(rows) > 150
    for cells in rows:
        assert len(cells) == 4, cells
        name, where, path, fn = ticked(cells[0]), cells[1], ticked(cells[2]), ticked(cells[3])
        assert WORD.fullmatch(name), f"{name}: not an identifier"
        assert where, f"{name}: say where it lives in Linux or Xen, or 'pvlab'"
        assert (ROOT / path).is_file(), f"{name}: {path} does not exist"
        assert path.endswith(".py") and path.startswith(("guestos/", "hypervisor/")), path
        assert fn in defined(path), f"{name}: {path} defines no {fn}"


def test_every_name_the_docs_use_is_indexed():
    known = indexed()
    code = pvlab_code_names()
    missing = sorted(w for w in doc_words() & code if worth_indexing(w) and w not in known)
    assert not missing, f"named in docs/ and defined in pvlab, but not in docs/INDEX.md: {missing}"


def test_every_xen_source_of_the_hypercall_table_is_indexed():
    names = {ticked(cells[0]) for cells in index_rows()}
    cited = set()
    for line in (ROOT / "docs/hypercalls.md").read_text().splitlines():
        m = ROW.match(line)
        if not m or line.startswith("|---") or line.startswith("| hypercall"):
            continue
        cells = re.split(r"(?<!\\)\|", m.group("cells"))
        cited.update(TICKED.findall(cells[4]))
    assert len(cited) > 30
    missing = sorted(cited - names)
    assert not missing, f"docs/hypercalls.md cites these, docs/INDEX.md lacks them: {missing}"


def test_no_row_twice():
    """One row per name: a name that two rows gave would leave the reader to
    guess which is meant."""
    seen: dict[str, list[str]] = {}
    for cells in index_rows():
        name = ticked(cells[0])
        assert name not in seen, f"{name} listed twice: {cells} and {seen[name]}"
        seen[name] = cells
