"""``pvlab lab``: list the labs, start one, grade it, run pvlab with it.

pvlab's command line is given this verb through the ``pvlab.verbs`` entry
point (setup.cfg): the toolstack does not know the labs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

from labs import LabError, all_labs, find_lab
from labs.gradelib import Settings
from labs.grading import grade, score, write_json
from labs.lab import Lab, student_dir
from labs.run import student_files
from labs.starter import start

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
Verb = Callable[[argparse.Namespace], int]


def cmd_list(args: argparse.Namespace) -> int:
    labs = all_labs()
    width = max(len(lab.name) for lab in labs)
    for lab in labs:
        mark = "started" if student_dir(lab, Path(args.dir)).exists() else ""
        print(f"{lab.name:{width}} {lab.title}  ({lab.handout}) {mark}".rstrip())
    return EXIT_OK


def cmd_start(args: argparse.Namespace) -> int:
    lab = find_lab(args.name)
    where = start(lab, Path(args.dir))
    print(f"lab {lab.name}: {lab.functions()} functions to write in "
          f"{', '.join(str(where / f) for f in lab.files().values())}")
    print(f"the handout: {lab.handout}; grade with: pvlab lab grade {lab.name}")
    return EXIT_OK


def _scratch(lab: Lab, args: argparse.Namespace) -> tuple[Path, bool]:
    """Where the graded runs write (kept to look at), and whether it is ours to remove."""
    if args.scratch:
        return Path(args.scratch), False
    if args.reference:
        return Path(tempfile.mkdtemp(prefix=f"pvlab-grade-{lab.name}-")), True
    where = student_dir(lab, Path(args.dir)) / ".grade"
    shutil.rmtree(where, ignore_errors=True)
    return where, False


def _compiles(files: Iterable[Path]) -> None:
    """A file that does not parse is one clear error before any test runs."""
    for f in files:
        try:
            compile(f.read_text(), str(f), "exec")
        except SyntaxError as e:
            raise LabError(f"{f}:{e.lineno}: {e.msg}: fix it, then grade again") from None


def cmd_grade(args: argparse.Namespace) -> int:
    lab = find_lab(args.name)
    if args.gdb is not None and not 0 < args.gdb < 65536:
        raise LabError(f"--gdb {args.gdb}: name a TCP port (1-65535) for gdb to attach to")
    if not args.reference:
        _compiles(student_files(lab, Path(args.dir)).values())
    scratch, ours = _scratch(lab, args)
    settings = Settings(lab, None if args.reference else Path(args.dir), scratch,
                        seed=args.seed, verbose=args.verbose_runs, gdb=args.gdb)
    g = grade(settings, sys.stdout, only=args.test)
    if args.json:
        write_json(g, Path(args.json))
    earned, total = score(g)
    if ours and earned == total:
        shutil.rmtree(scratch, ignore_errors=True)
    elif earned < total:
        print(f"the graded runs' files are in {scratch}")
    if any(o.bug for o in g.outcomes.values()):
        return EXIT_USAGE
    return EXIT_OK if earned == total else EXIT_FAILED


class _OwnOptions(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise LabError(f"{self.prog}: before --, only --dir D or --reference ({message})")


def _lab_options(args: argparse.Namespace) -> list[str]:
    """pvlab's arguments, after ``--``; ``--dir``/``--reference`` written between
    the lab's name and ``--`` are the lab's (argparse leaves them in the remainder)."""
    rest = list(args.args)
    if "--" not in rest:
        return rest
    cut = rest.index("--")
    own = _OwnOptions(prog=f"pvlab lab run {args.name}", add_help=False)
    own.add_argument("--dir")
    own.add_argument("--reference", action="store_true")
    mine = own.parse_args(rest[:cut])
    args.dir = mine.dir or args.dir
    args.reference = mine.reference or args.reference
    return rest[cut + 1:]


def cmd_run(args: argparse.Namespace) -> int:
    lab = find_lab(args.name)
    rest = _lab_options(args)
    if not rest:
        raise LabError("name what to run after --, e.g. pvlab lab run "
                       f"{lab.name} -- run examples/smp.toml")
    who = ["--reference"] if args.reference else ["--dir", args.dir]
    return subprocess.call([sys.executable, "-m", "labs.run", "--lab", lab.name, *who,
                            "--", *rest])


def _guarded(fn: Verb) -> Verb:
    """A verb whose LabError is one line on stderr and exit status 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LabError as e:
            print(f"pvlab: {e}", file=sys.stderr)
            return EXIT_USAGE
    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=".", metavar="D",
                   help="the directory that holds the lab's directory (default: here)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``lab`` and its verbs to pvlab's command line."""
    lab = sub.add_parser("lab", help="teaching labs: list, start, grade, run",
                         description="Teaching labs: a starting point to complete, a grader "
                                     "with points per test, and pvlab run with your code.")
    verbs = lab.add_subparsers(dest="lab_verb", metavar="LABVERB", required=True)
    ls = verbs.add_parser("list", help="the labs, in the course's order")
    _common(ls)
    ls.set_defaults(func=_guarded(cmd_list))
    st = verbs.add_parser("start", help="put a lab's starting point in D/NAME")
    st.add_argument("name", metavar="NAME")
    _common(st)
    st.set_defaults(func=_guarded(cmd_start))
    _add_grade(verbs)
    rn = verbs.add_parser("run", help="run any pvlab verb with your lab's files in place",
                          description="pvlab lab run NAME -- VERB ARGS: pvlab VERB ARGS, "
                                      "with D/NAME's files loaded in place of the reference's")
    rn.add_argument("name", metavar="NAME")
    _common(rn)
    rn.add_argument("--reference", action="store_true", help="the reference's modules")
    rn.add_argument("args", nargs=argparse.REMAINDER, metavar="-- VERB ARGS",
                    help="pvlab's arguments, after --")
    rn.set_defaults(func=_guarded(cmd_run))


def _add_grade(verbs: argparse._SubParsersAction) -> None:
    gr = verbs.add_parser("grade", help="grade a lab: points per test, Score: N/M",
                          description="Run the lab's graded tests against D/NAME. Exit 0 "
                                      "at full marks, 1 otherwise, 2 for bad input.")
    gr.add_argument("name", metavar="NAME")
    _common(gr)
    gr.add_argument("--reference", action="store_true",
                    help="grade the reference's own code (full marks)")
    gr.add_argument("--test", metavar="TEST", help="only this test (and what it needs)")
    gr.add_argument("--seed", type=int, metavar="N", help="only this seed (a failure's replay)")
    gr.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    gr.add_argument("--scratch", metavar="DIR", help="where the graded runs write their files")
    gr.add_argument("--gdb", type=int, metavar="PORT",
                    help="serve gdb on PORT in the first run of each test (with --test)")
    gr.add_argument("--show-runs", dest="verbose_runs", action="store_true",
                    help="print each pvlab command as it runs")
    gr.set_defaults(func=_guarded(cmd_grade))
