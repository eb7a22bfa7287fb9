"""A test guest's run judged as xtf-runner judges it, when its configuration
asks (``verdict = "xtf"``): the console's last line sets pvlab run's exit
status, 0 SUCCESS, 3 SKIP, 4 ERROR, 5 FAILURE, 6 CRASH."""

from __future__ import annotations

import pytest

import hypervisor.core
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.verdict import interpret_result, xtf_result
from tests.conftest import FIRMWARE, ROOT

EXAMPLE = ROOT / "examples/hypercalls.toml"


def config(tmp_path, image: str, vcpus: int = 2, verdict: str = "xtf") -> str:
    path = tmp_path / "guest.toml"
    path.write_text(f'name = "t"\nmemory = 16\nvcpus = {vcpus}\nimage = "{FIRMWARE / image}"\n'
                    f'verdict = "{verdict}"\n')
    return str(path)


def test_the_last_line_is_read_as_xtf_runner_reads_it():
    assert interpret_result("Test result: SUCCESS") == "SUCCESS"
    assert interpret_result("Test result: SKIP") == "SKIP"
    assert interpret_result("Test result: ERROR") == "ERROR"
    assert interpret_result("Test result: FAILURE") == "FAILURE"
    assert interpret_result("SUCCESS") == "CRASH"
    assert xtf_result(b"Test result: SUCCESS\nlater\n", "poweroff") == "CRASH"
    assert xtf_result(b"", "poweroff") == "CRASH"
    assert xtf_result(b"Test result: SUCCESS\n", "crash") == "CRASH"


def test_hypercalls_example_succeeds(capsys):
    assert main(["run", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out.rstrip().endswith("Test result: SUCCESS") and err == ""


def test_a_failure_exits_5_and_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys):
    real = hypervisor.core.do_xen_version
    monkeypatch.setattr(hypervisor.core, "do_xen_version",
                        lambda vcpu, cmd, *args: real(vcpu, cmd, *args) ^ (cmd == 0))
    assert main(["run", str(EXAMPLE)]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pvlab: domain hypercalls: test result FAILURE (exit 5, as xtf-runner)"]


def test_a_skip_exits_3(tmp_path, capsys):
    assert main(["run", config(tmp_path, "tests/hcall.elf", vcpus=1)]) == 3
    assert "test result SKIP" in capsys.readouterr().err


def test_a_guest_that_prints_no_result_is_a_crash(tmp_path, capsys):
    assert main(["run", config(tmp_path, "guest.elf")]) == 6
    assert "test result CRASH" in capsys.readouterr().err


def test_an_unknown_verdict_is_a_config_error(tmp_path, capsys):
    assert main(["run", config(tmp_path, "tests/hcall.elf", verdict="tap")]) == 2
    assert "verdict" in capsys.readouterr().err
