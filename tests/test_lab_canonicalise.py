"""Lab canonicalise's grader tells the classic mistakes apart. Each mutant is
the reference with one mistake a student makes, graded as a student's files
are: the test written for that mistake fails and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from labs.lab import reference_path
from tests.conftest import checkout_env

ROOT = Path(__file__).resolve().parent.parent


def mutant(tmp_path: Path, module: str, old: str, new: str) -> Path:
    """A starting point holding the reference's save.py and restore.py, with
    ``old`` replaced by ``new`` in ``module``'s file."""
    where = tmp_path / "canonicalise"
    where.mkdir()
    for name in ("save", "restore"):
        text = reference_path(f"hypervisor.toolstack.{name}").read_text()
        if name == module:
            assert old in text
            text = text.replace(old, new)
        (where / f"{name}.py").write_text(text)
    return tmp_path


def grade(student: Path, test: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", "lab", "grade",
                           "--dir", str(student), "canonicalise", "--test", test],
                          cwd=student, env=checkout_env(), capture_output=True, text=True,
                          timeout=300)


def test_a_save_that_trusts_the_m2p_alone_is_caught(tmp_path):
    d = mutant(tmp_path, "save", "    ok[ok] = p2m[pfns[ok].astype(np.int64)] == mfns[ok]\n", "")
    r = grade(d, "foreign_frame_refused")
    assert r.returncode == 1 and "Score: 0/5" in r.stdout, r.stdout + r.stderr
    assert "canonicalise accepted an L1 entry holding mfn 0x17" in r.stdout


def test_a_localise_that_keeps_only_the_low_flags_is_caught(tmp_path):
    d = mutant(tmp_path, "restore", "(tables & ~PTE_FRAME_MASK) | (mfns <<",
               "(tables & np.uint64(0xFFF)) | (mfns <<")
    r = grade(d, "keeps_every_other_bit")
    assert r.returncode == 1 and "Score: 0/10" in r.stdout, r.stdout + r.stderr
    assert "(NX and bit 52 set, pfn 3): expected 0x801000000000d067, yours " \
           "0x000000000000d067" in r.stdout
