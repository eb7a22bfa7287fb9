"""The layers of DESIGN.md: guestos imports only hypervisor.public; the
hypervisor never imports guestos (it loads whatever kernel an image names)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(package: str) -> list[tuple[Path, str]]:
    out = []
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(path, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.append((path, node.module))
    return out


def test_guestos_imports_only_the_public_abi():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("guestos")
           if m.split(".")[0] == "hypervisor" and not m.startswith("hypervisor.public")]
    assert bad == []


def test_hypervisor_never_imports_guestos():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("hypervisor")
           if m.split(".")[0] == "guestos"]
    assert bad == []


def test_public_abi_imports_nothing_else_of_the_hypervisor():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("hypervisor/public")
           if m.split(".")[0] == "hypervisor" and not m.startswith("hypervisor.public")]
    assert bad == []
