"""Loading a student's file in place of a named module.

The grader's pvlab process puts this finder first on ``sys.meta_path`` before
anything imports the modules a lab replaces, so ``import guestos.pgd`` (or
``from guestos import pgd``) finds the student's pgd.py. The file is loaded
under the module's own name, so its package and its imports are those of the
reference module it replaces.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path


class Overlay(importlib.abc.MetaPathFinder):
    def __init__(self, files: dict[str, Path]) -> None:
        self.files = dict(files)

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def install(files: dict[str, Path]) -> Overlay:
    """Replace each module of ``files`` (name -> file) for this process. A
    module already imported cannot be replaced: that is a caller's bug."""
    loaded = sorted(name for name in files if name in sys.modules)
    if loaded:
        raise RuntimeError(f"already imported, cannot be replaced: {', '.join(loaded)}")
    finder = Overlay(files)
    sys.meta_path.insert(0, finder)
    return finder
