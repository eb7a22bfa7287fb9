"""``pvlab lab start``: the starting point, the reference with bodies removed.

For each function a lab names, the copy keeps the signature and the docstring
and puts, where the body was, the rule the body must follow and a
NotImplementedError, so that the student's kernel or toolstack fails at the
first call, saying which function is missing.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from labs import LabError
from labs.lab import Lab, reference_path, student_dir

README = """\
Lab {name}: {title}

The handout: {handout} (in the pvlab checkout).
Write the functions marked "LAB {name}" in {files}, then grade:

    pvlab lab grade {name}          (or: make grade LAB={name})

Try your code in any pvlab run:  pvlab lab run {name} -- run CONFIG ...
"""


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """Top-level functions and class methods by name (``Class.method``)."""
    found: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    found[f"{node.name}.{sub.name}"] = sub
    return found


def _has_docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = fn.body[0]
    return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str))


def _stub(lab: str, name: str, rule: str, indent: str) -> list[str]:
    lines = textwrap.wrap(rule, 96 - len(indent), initial_indent=f"# LAB {lab}: ",
                          subsequent_indent="#   ")
    return [indent + line for line in lines] + [
        f'{indent}raise NotImplementedError("lab {lab}: {name}")']


def strip(source: str, lab: str, rules: dict[str, str]) -> str:
    """``source`` with each function of ``rules`` emptied, its rule in its place."""
    lines = source.splitlines()
    fns = _functions(ast.parse(source))
    missing = sorted(set(rules) - set(fns))
    if missing:
        raise LabError(f"lab {lab}: the reference has no function {', '.join(missing)}")
    # from the bottom up, so that earlier line numbers stay right
    for name in sorted(rules, key=lambda n: fns[n].lineno, reverse=True):
        fn = fns[name]
        body = fn.body[1:] if _has_docstring(fn) else fn.body
        indent = " " * (fn.body[0].col_offset)
        start = body[0].lineno - 1 if body else fn.body[0].end_lineno
        lines[start:fn.end_lineno] = _stub(lab, name, rules[name], indent)
    return "\n".join(lines) + "\n"


def header(lab: Lab, module: str) -> str:
    return (f"# The starting point of lab {lab.name}: {module} with the functions marked\n"
            f"# \"LAB {lab.name}\" to write. The handout: {lab.handout}\n")


def start(lab: Lab, parent: Path) -> Path:
    """Write the lab's starting point under ``parent``; refuse to overwrite one."""
    where = student_dir(lab, parent)
    if where.exists():
        raise LabError(f"{where} exists already: your work is kept (grade it with "
                       f"`pvlab lab grade {lab.name}`, or move it away to start again)")
    sources = {}
    for module, name in lab.files().items():
        text = reference_path(module).read_text()
        sources[name] = header(lab, module) + strip(text, lab.name, lab.todo[module])
    where.mkdir(parents=True)
    for name, text in sources.items():
        (where / name).write_text(text)
    (where / "README").write_text(README.format(
        name=lab.name, title=lab.title, handout=lab.handout,
        files=", ".join(lab.files().values())))
    return where
