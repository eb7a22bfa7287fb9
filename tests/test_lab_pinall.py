"""Lab pinall's grader catches a pgd_list kept in a Python list: within one
run it works, so the save is right; the restore runs in a new process, where
the list is empty. The grader's runs are forked from a warm server
(labs/forkserver.py): this checks that each run is still a process of its
own, with nothing left from the run before it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from labs.lab import reference_path
from tests.conftest import checkout_env

# the three functions of the list, on a Python list instead of kernel data
IN_PYTHON = '''
_PGDS: list[int] = []


def pgd_list(cpu: NativeCpu) -> list[int]:
    return list(_PGDS)


def pgd_list_add(cpu: NativeCpu, pfn: int) -> None:
    _PGDS.append(pfn)


def pgd_list_del(cpu: NativeCpu, pfn: int) -> None:
    if pfn not in _PGDS:
        raise KernelPanic(f"pgd {pfn:#x} is not on the pgd_list")
    _PGDS.remove(pfn)


def pgd_pinned('''


@pytest.mark.slow
def test_a_pgd_list_kept_in_python_fails_the_restore_only(tmp_path):
    ref = reference_path("guestos.pgd").read_text()
    head, _, rest = ref.partition("\ndef pgd_list(")
    _, _, tail = rest.partition("\ndef pgd_pinned(")
    (tmp_path / "pinall").mkdir()
    (tmp_path / "pinall" / "pgd.py").write_text(head + IN_PYTHON + tail)
    p = subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", "lab", "grade",
                        "pinall", "--test", "restore_unpins", "--seed", "2", "--json", "g.json"],
                       cwd=tmp_path, env=checkout_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    earned = {t["name"]: t["earned"]
              for t in json.loads((tmp_path / "g.json").read_text())["tests"]}
    # the run without a save and the save each began with an empty list
    assert earned == {"pgd_list_at_save": 10, "save_pins_all": 10, "restore_unpins": 0}, \
        p.stdout
    assert "new process" in p.stdout and "guest memory" in p.stdout, p.stdout
