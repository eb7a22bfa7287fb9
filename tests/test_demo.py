"""The save/restore demo (`make demo`, the main job) runs, from any directory,
and finds everything equal."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, checkout_env


@pytest.mark.slow
def test_the_save_restore_demo_finds_everything_equal(tmp_path):
    """Run from another directory than the checkout's (a new user's defect:
    `pvlab demo` found its configuration only from the top of the checkout)."""
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "save-restore-demo")],
                       cwd=tmp_path, env=checkout_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    for want in ("0 of 16384 pfns kept their mfn", "in the image (pfn)",
                 "PM: dpm_resume_end(RESTORE)", "all 26 result lines equal: True",
                 "the checkpoint, restored in a new process, finished the same: True",
                 "save-restore demo: everything matches",
                 "shared_info unmapped | [cpu0]"):  # a whole step, then the other side
        assert want in p.stdout
