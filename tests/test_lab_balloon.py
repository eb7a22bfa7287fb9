"""Lab balloon-s4: its handout runs exactly as written, and its grader names
the leak of Linux e562966 when a student's discard only moves the counters.

The handout's commands (its ```sh blocks, in order) run in a directory laid
out as the top of a checkout, with the handout's configuration in
lab/discard.toml; every console line a block quotes (the plain ``` block
after it) must appear in that block's output, in the order quoted. Blocks
that run the student's own code are left out (what they print depends on
the student); the picture's commands run, so that they work as written.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, checkout_env

HANDOUT = ROOT / "docs" / "labs" / "balloon-s4.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
NOT_RUN = ("pvlab lab run", "make grade")
SECONDS = re.compile(r"\(\d+\.\d+s\)")


def blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the handout, in order."""
    return BLOCK.findall(HANDOUT.read_text())


def run_sh(script: str, cwd) -> str:
    """A block of the handout under bash, `pvlab` being this checkout's."""
    prelude = f'set -e\npvlab() {{ "{sys.executable}" -m hypervisor.toolstack.cli "$@"; }}\n'
    p = subprocess.run(["bash", "-c", prelude + script], cwd=cwd, env=checkout_env(),
                       capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode in (0, 1), f"{script}\n{out[-3000:]}"  # 1: a grade below full marks
    return out


def missing_lines(quoted: str, out: str) -> list[str]:
    """The quoted lines that do not appear in ``out`` in the quoted order."""
    got = [SECONDS.sub("(s)", line.rstrip()) for line in out.splitlines()]
    pos, missing = 0, []
    for want in quoted.splitlines():
        want = SECONDS.sub("(s)", want.rstrip())
        try:
            pos = got.index(want, pos) + 1
        except ValueError:
            missing.append(want)
    return missing


@pytest.mark.slow
def test_the_handout_runs_as_written(tmp_path):
    (tmp_path / "firmware").symlink_to(ROOT / "firmware")
    (tmp_path / "lab").mkdir()
    out, checked = None, 0
    for lang, text in blocks():
        if lang == "toml":
            (tmp_path / "lab" / "discard.toml").write_text(text)
        elif lang == "sh":
            out = None if any(s in text for s in NOT_RUN) else run_sh(text, tmp_path)
        elif lang == "" and out is not None:
            assert missing_lines(text, out) == [], out[-4000:]
            checked += 1
            out = None
    assert checked >= 8  # every console quote of the steps, the image and the grade


def test_a_quote_must_appear_in_order():
    out = "a\nb (1.5s)\nc\n"
    assert missing_lines("a\nb (0.3s)\nc", out) == []
    assert missing_lines("c\na", out) == ["a"]


@pytest.mark.slow
def test_the_grader_names_the_leak_of_a_discard_that_only_moves_the_counters(tmp_path):
    """The student's discard is e562966's: the grade of the restore says so."""
    ref = (ROOT / "guestos" / "drivers" / "virtio_balloon.py").read_text()
    body = "    if vb.leak_bug:\n        _discard_as_shipped(cpu)\n        return\n"
    assert body in ref
    (tmp_path / "balloon-s4").mkdir()
    (tmp_path / "balloon-s4" / "virtio_balloon.py").write_text(
        ref.replace(body, "    _discard_as_shipped(cpu)\n    return\n"))
    p = subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", "lab", "grade",
                        "balloon-s4", "--test", "restore_discard", "--seed", "2"],
                       cwd=tmp_path, env=checkout_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    text = " ".join(p.stdout.split())
    assert "restored in a new process under discard" in text and "FAIL" in text
    assert "lost 4096 pages" in text and "the leak of Linux e562966" in text
    assert "seed 2; replay: pvlab lab grade balloon-s4 --test restore_discard --seed 2" in text
    assert "Score: 0/15" in text
