"""Lab postcopy-balloon: its race tool prints what the handout quotes, runs
the same on every run, and its grader tells the lost page, step by step,
when a student's inflate ignores post-copy's inhibit."""

from __future__ import annotations

import re
import subprocess
import sys

from labs.postcopy_balloon import race
from tests.conftest import ROOT, checkout_env

HANDOUT = ROOT / "docs" / "labs" / "postcopy-balloon.md"
INHIBIT = "        if self.inhibits:\n            self._hold(mfn, inflate=True)\n" \
          "            return False\n"


def quoted_race() -> list[str]:
    """The handout's quote of ``race --reference --no-inhibit --seed 2``."""
    block = re.search(r"^```\n(== no-inhibit-2\n.*?)^```$", HANDOUT.read_text(), re.S | re.M)
    return [line for line in block.group(1).splitlines() if line != "..."]


def test_the_race_without_the_inhibit_is_as_the_handout_quotes_it():
    got = race.report("no-inhibit-2", race.run_case("drop", 2, no_inhibit=True))
    pos = 0
    for want in quoted_race():
        pos = got.index(want, pos) + 1  # each quoted line, in the quoted order


def test_a_case_runs_the_same_every_time_and_holds_under_the_reference():
    first, again = race.run_case("reconcile", 3), race.run_case("reconcile", 3)
    assert first == again and first["violations"] == []
    assert first["metrics"]["reconciled"] > 0 and first["inflated_inhibited"] > 0


def test_the_grader_tells_the_lost_page_of_an_inflate_that_ignores_the_inhibit(tmp_path):
    """The student's inflate_frame frees while inhibited: the grade of drop
    says which pfn holds whose page, on which frame, and at which steps."""
    ref = (ROOT / "hypervisor" / "devices" / "balloon" / "device.py").read_text()
    assert INHIBIT in ref
    (tmp_path / "postcopy-balloon").mkdir()
    (tmp_path / "postcopy-balloon" / "device.py").write_text(ref.replace(INHIBIT, ""))
    p = subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", "lab", "grade",
                        "postcopy-balloon", "--test", "drop", "--seed", "2"],
                       cwd=tmp_path, env=checkout_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    text = p.stdout
    assert "FAIL" in text and "Score: 0/15" in text
    assert re.search(r"after step \d+: mfn 0x[0-9a-f]+ freed while absent", text)
    lost = re.search(r"at step (\d+): pfn (0x[0-9a-f]+) holds pfn (0x[0-9a-f]+)'s version 1, "
                     r"not its own version \d+ \(on mfn (0x[0-9a-f]+)\)", text)
    assert lost, text
    step, pfn, whose, mfn = lost.groups()
    assert f"the guest inflates pfn {whose} (mfn {mfn}, its page still at the source): " \
           "the balloon freed it" in text
    assert f"the guest deflates pfn {pfn}: populate_physmap gives it mfn {mfn}" in text
    assert f"step {step}: pfn {whose}'s page arrives: the pager places it on mfn {mfn}" in text
    assert "race --dir . --policy drop --seed 2" in " ".join(text.split())
