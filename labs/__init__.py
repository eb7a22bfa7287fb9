"""pvlab's teaching labs: break-and-fix exercises with graders.

Each lab is a subpackage of this package whose ``LAB`` names the functions a
student writes, the handout, and the module of its graded tests
(labs/gradelib.py). ``pvlab lab list|start|grade|run`` (labs/cli.py) works
on them. Graders run pvlab in subprocesses with the student's files loaded in
place of the reference modules (labs/overlay.py), so nothing here imports the
guest kernel.
"""

from __future__ import annotations

import importlib
import pkgutil

from labs.lab import Lab


class LabError(Exception):
    """A user error about labs: printed as one line."""


def all_labs() -> list[Lab]:
    """Every lab of this package, in the order the course takes them."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            lab = getattr(importlib.import_module(f"{__name__}.{info.name}"), "LAB", None)
            if isinstance(lab, Lab):
                found.append(lab)
    return sorted(found, key=lambda lab: (lab.order, lab.name))


def find_lab(name: str) -> Lab:
    labs = all_labs()
    for lab in labs:
        if lab.name == name:
            return lab
    names = ", ".join(lab.name for lab in labs)
    raise LabError(f"no lab named {name!r} (the labs: {names})")
