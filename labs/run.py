"""``python -m labs.run --lab NAME --dir D -- ARGS``: pvlab with a student's files.

The process replaces the lab's modules with the files of the starting point
in D/NAME (labs/overlay.py), then runs ``pvlab ARGS``. ``--reference`` runs
the repo's own modules (what full marks look like). ``pvlab lab run`` and the
graders start this; a student may too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from labs import LabError, find_lab
from labs.lab import Lab, student_dir
from labs.overlay import install


def student_files(lab: Lab, parent: Path) -> dict[str, Path]:
    """The student's file for each module the lab replaces; a clear error if
    the starting point is not there."""
    where = student_dir(lab, parent)
    files = {module: where / name for module, name in lab.files().items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise LabError(f"{', '.join(missing)}: no such file (make the starting point with "
                       f"`pvlab lab start {lab.name}`, or name its directory with --dir)")
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labs.run",
                                description="run pvlab with a lab's student files in place")
    p.add_argument("--lab", required=True)
    p.add_argument("--dir", default=".", help="the directory holding the lab's directory")
    p.add_argument("--reference", action="store_true", help="the repo's own modules")
    p.add_argument("args", nargs=argparse.REMAINDER, help="pvlab's arguments, after --")
    args = p.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    try:
        overlay(args.lab, None if args.reference else Path(args.dir))
    except LabError as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return 2
    return pvlab(rest)


def overlay(name: str, parent: Path | None) -> None:
    """Put the student's files of lab ``name`` under ``parent`` in place of
    the reference modules for this process (``parent`` None: the reference)."""
    lab = find_lab(name)
    if parent is not None:
        install(student_files(lab, parent))
    from hypervisor.toolstack.explore import REPLAY_AS_ENV  # the replaced modules are in
    os.environ[REPLAY_AS_ENV] = replay_as(name, parent)


def replay_as(name: str, parent: Path | None) -> str:
    """How a replay printed by these runs (explore's) spells pvlab: with this
    lab's modules again."""
    who = (["--reference"] if parent is None
           else [] if parent == Path(".") else ["--dir", str(parent)])
    return shlex.join(["pvlab", "lab", "run", name, *who, "--"])


def pvlab(argv: list[str]) -> int:
    """``pvlab ARGV`` in this process, once the overlay is in place."""
    from hypervisor.toolstack import cli  # after the overlay: it imports the replaced modules
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
