"""What a lab is: the functions a student writes, where, and how it is graded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# the checkout (or site-packages) that holds labs/, guestos/ and hypervisor/ side by side
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Lab:
    name: str                 # as the student types it: pvlab lab start NAME
    order: int                # its place in the course
    title: str
    handout: str              # the handout's path from the top of the checkout
    # module -> {function or Class.method -> the rule, written where its body was}
    todo: dict[str, dict[str, str]] = field(default_factory=dict)
    tests: str = ""           # the module of its graded tests

    def files(self) -> dict[str, str]:
        """Module -> the file name the student edits (the module's last part)."""
        return {module: module.rsplit(".", 1)[-1] + ".py" for module in self.todo}

    def functions(self) -> int:
        return sum(len(fns) for fns in self.todo.values())


def reference_path(module: str) -> Path:
    """The reference source of a module named by a lab, found beside labs/
    without importing it (importing a guest kernel module is the guest's
    business)."""
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def student_dir(lab: Lab, parent: Path) -> Path:
    """Where ``pvlab lab start`` puts a lab's starting point under ``parent``."""
    return parent / lab.name
