"""The lab machinery (labs/): starting points, the grader's score and
messages, and for every lab that its grader can fail: the reference earns
every test's points and a fresh starting point earns none."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from labs import LabError, all_labs, find_lab
from labs.forkserver import ForkServer
from labs.gradelib import QUICK_ENV, Ctx, Result, Settings, diff_lines
from labs.gradelib import tests_of as graded_tests
from labs.grading import grade, score
from labs.lab import Lab, reference_path
from labs.starter import strip
from tests.conftest import checkout_env

ROOT = Path(__file__).resolve().parent.parent
LABS = all_labs()
FIXTURE = Lab(name="fixture", order=0, title="t", handout="docs/labs/none.md",
              tests="tests.labfixture")


def pvlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", *args],
                          cwd=cwd, capture_output=True, text=True,
                          env=checkout_env(**{QUICK_ENV: "1"}))


def test_strip_keeps_signature_and_docstring_and_puts_the_rule_in_the_body():
    src = 'def f(a: int) -> int:\n    """Doc."""\n    x = a\n    return x\n\n\n' \
          'class C:\n    def m(self):\n        return 1\n\n\ndef g():\n    return 2\n'
    out = strip(src, "demo", {"f": "add one " * 20, "C.m": "one"})
    tree = ast.parse(out)
    f, c, g = tree.body
    assert ast.get_docstring(f) == "Doc."
    assert "# LAB demo: add one" in out and 'raise NotImplementedError("lab demo: f")' in out
    assert all(len(line) <= 100 for line in out.splitlines())
    assert isinstance(c.body[0].body[-1], ast.Raise)
    assert ast.unparse(g) == "def g():\n    return 2"


def test_strip_names_a_function_the_reference_lacks():
    with pytest.raises(LabError, match="no function nope"):
        strip("def f():\n    pass\n", "demo", {"nope": "x"})


def test_grade_scores_points_follows_parents_and_says_how_to_replay(tmp_path):
    out = io.StringIO()
    g = grade(Settings(FIXTURE, None, tmp_path), out)
    assert score(g) == (3, 9)
    text = out.getvalue()
    assert "seed 3 is the bad one" in text
    assert "replay: pvlab lab grade fixture --reference --test seeded --seed 3" in text
    assert 'needs "fails on seed 3", which failed' in text
    assert text.rstrip().endswith("Score: 3/9")


def test_a_seed_narrows_a_test_to_it(tmp_path):
    g = grade(Settings(FIXTURE, None, tmp_path, seed=4), io.StringIO(), only="seeded")
    assert score(g) == (4, 4)


def test_gdb_is_served_in_the_first_run_or_restore_of_a_test_only(tmp_path, capsys):
    ctx = Ctx(Settings(FIXTURE, None, tmp_path, gdb=1234), graded_tests(FIXTURE.tests)[0])
    assert ctx._with_gdb(["image", "show", "g.img"]) == ["image", "show", "g.img"]
    assert ctx._with_gdb(["run", "a.toml"]) == ["run", "--gdb", "1234", "a.toml"]
    assert ctx._with_gdb(["restore", "g.img"]) == ["restore", "g.img"]
    assert "waiting for gdb on 127.0.0.1:1234" in capsys.readouterr().out


def test_diff_lines_marks_good_bad_missing():
    text = diff_lines(["a", "b", "c"], ["a", "x"])
    assert "GOOD     a" in text and "BAD      x" in text and "MISSING  c" in text


def test_lab_verbs_give_one_line_errors(tmp_path):
    for args in (["lab", "start", "nosuchlab"], ["lab", "grade", "nosuchlab"]):
        r = pvlab(*args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("pvlab: no lab named 'nosuchlab'")
        assert "Traceback" not in r.stderr


def test_grade_needs_a_starting_point_that_parses(tmp_path):
    lab = LABS[0]
    r = pvlab("lab", "grade", lab.name, cwd=tmp_path)
    assert r.returncode == 2 and f"pvlab lab start {lab.name}" in r.stderr
    assert pvlab("lab", "start", lab.name, cwd=tmp_path).returncode == 0
    name = next(iter(lab.files().values()))
    with open(tmp_path / lab.name / name, "a") as f:
        f.write("def broken(:\n")
    r = pvlab("lab", "grade", lab.name, cwd=tmp_path)
    assert r.returncode == 2 and f"{name}:" in r.stderr and "invalid syntax" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_lab_run_takes_its_own_options_before_the_double_dash(tmp_path):
    lab = LABS[0].name
    r = pvlab("lab", "run", lab, "--reference", "--", "image", "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: pvlab image"), r.stderr
    r = pvlab("lab", "run", lab, "--bogus", "--", "run", "x.toml", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--bogus" in r.stderr


def test_a_forked_run_prints_and_ends_as_a_new_process_does(tmp_path):
    config = str(ROOT / "labs" / "pmorder" / "pmorder.toml")
    server = ForkServer("pmorder", ["--reference"])
    try:
        for argv in (["run", config, "--until", "1ms"], ["run", str(tmp_path / "no.toml")],
                     ["image", "--help"]):
            forked = Result(*server.run(argv, 60), argv)
            fresh = Ctx._fresh(Settings(find_lab("pmorder"), None, tmp_path).run_prefix(),
                               argv, 60)
            assert forked == fresh
            assert forked.rc is not None and forked.out + forked.err
    finally:
        server.close()


def test_a_forked_run_past_its_time_is_killed_and_the_server_goes_on():
    config = str(ROOT / "labs" / "pmorder" / "pmorder.toml")
    server = ForkServer("pmorder", ["--reference"])
    try:
        rc, _, _ = server.run(["run", config, "--gdb", "0"], 2)   # waits for gdb for ever
        assert rc is None
        rc, out, _ = server.run(["image", "--help"], 60)
        assert rc == 0 and out.startswith("usage: pvlab image")
    finally:
        server.close()


def test_a_server_that_cannot_start_leaves_the_run_to_a_new_process(tmp_path):
    settings = Settings(find_lab("pinall"), tmp_path, tmp_path)   # no starting point there
    ctx = Ctx(settings, graded_tests(FIXTURE.tests)[0])
    r = ctx.pvlab("image", "--help")
    settings.close()
    assert r.rc == 2 and "pvlab lab start pinall" in r.err


@pytest.mark.parametrize("lab", LABS, ids=[lab.name for lab in LABS])
def test_every_lab_is_complete(lab: Lab):
    assert find_lab(lab.name) is lab
    assert (ROOT / lab.handout).is_file()
    assert len(set(lab.files().values())) == len(lab.files())
    for module, rules in lab.todo.items():
        out = strip(reference_path(module).read_text(), lab.name, rules)
        assert out.count("raise NotImplementedError") >= len(rules)
        ast.parse(out)


def pvlab_here(*args: str, cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``pvlab ARGS`` run by this process in ``cwd``, for the verbs whose
    work is in processes of their own (a grade's runs): a Python of its own
    for the verb would only add its start. The verbs' one-line errors as a
    process prints them are test_lab_verbs_give_one_line_errors's."""
    from hypervisor.toolstack.cli import main
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(QUICK_ENV, "1")  # as pvlab() gives it: a grade's few seeds
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("lab", LABS, ids=[lab.name for lab in LABS])
def test_the_reference_earns_every_point(lab: Lab, tmp_path, monkeypatch, capsys):
    ref = pvlab_here("lab", "grade", lab.name, "--reference", "--json", "ref.json",
                     cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    got = json.loads((tmp_path / "ref.json").read_text())
    assert got["score"] == got["total"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("lab", LABS, ids=[lab.name for lab in LABS])
def test_a_fresh_starting_point_earns_no_point(lab: Lab, tmp_path, monkeypatch, capsys):
    def here(*args: str) -> subprocess.CompletedProcess:
        return pvlab_here(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    r = here("lab", "start", lab.name)
    assert r.returncode == 0, r.stderr
    again = here("lab", "start", lab.name)
    assert again.returncode == 2 and "exists already" in again.stderr
    stub = here("lab", "grade", lab.name, "--json", "stub.json")
    assert stub.returncode == 1, stub.stdout + stub.stderr
    tests = json.loads((tmp_path / "stub.json").read_text())["tests"]
    earned = {t["name"]: t["earned"] for t in tests if t["points"]}
    assert earned and not any(earned.values()), earned
    assert "Score: 0/" in stub.stdout
