"""The pvlab command: help, exit codes, one-line errors (never a traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hypervisor.toolstack.cli import main
from tests.conftest import ROOT, checkout_env


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "Exit codes" in out


def test_run_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--until", "--seed", "--fast", "--trace"):
        assert flag in out


def test_run_hello_exits_zero(capsys):
    assert main(["run", str(ROOT / "examples/hello.toml")]) == 0
    assert "hello from user space" in capsys.readouterr().out


def test_bad_config_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pvlab: ") and "no such configuration" in err[0]


def test_not_an_elf_image(capsys, tmp_path):
    (tmp_path / "bad.elf").write_bytes(b"not an elf")
    (tmp_path / "d.toml").write_text('name="x"\nmemory=16\nimage="bad.elf"\n')
    assert main(["run", str(tmp_path / "d.toml")]) == 2
    assert "not a valid ELF image" in capsys.readouterr().err


def test_trace_prints_disassembly(capsys):
    assert main(["run", str(ROOT / "examples/hello.toml"), "--trace", "5"]) == 0
    out = capsys.readouterr().out
    assert "python guestos.boot.start_kernel" in out
    assert "mov eax, 1" in out


def test_console_script_entry_point():
    cmd = [sys.executable, "-m", "hypervisor", "run", str(ROOT / "examples/hello.toml")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hello from user space" in r.stdout


def test_until_stops_a_running_guest(capsys):
    assert main(["run", str(ROOT / "examples/smp.toml"), "--until", "2ms"]) == 0
    captured = capsys.readouterr()
    assert "hashchain start" in captured.out
    assert "hashchain digest ef1035920e1827ec" not in captured.out  # the long one
    assert "stopped at 2.000 ms of virtual time" in captured.err


def test_frames_shows_pagetables_and_pinned_l4s(capsys):
    assert main(["frames", str(ROOT / "examples/smp.toml"), "--at", "3ms",
                 "--type", "L1,L2,L3,L4"]) == 0
    out = capsys.readouterr().out
    assert "invariants: all hold" in out
    summary = out[out.index("summary:"):]
    # the bootstrap L4 and each live task's user L4, all pinned
    l4 = next(line.split() for line in summary.splitlines() if line.split()[:1] == ["L4"])
    assert int(l4[1]) >= 5 and l4[1] == l4[2]
    table = out[:out.index("summary:")]
    assert " L1 " in table and " pinned" in table and "writable" not in table


def test_frames_rejects_an_unknown_type(capsys):
    assert main(["frames", str(ROOT / "examples/hello.toml"), "--type", "L5"]) == 2
    assert "--type takes" in capsys.readouterr().err


def test_an_image_or_binary_file_given_as_config_is_one_line_and_exit_2(capsys, tmp_path):
    """Regression: a guest ELF passed where a config belongs gave a traceback."""
    assert main(["run", str(ROOT / "firmware/tests/xsa.elf")]) == 2
    err = capsys.readouterr().err
    assert "is a guest image, not a domain configuration" in err and "Traceback" not in err
    blob = tmp_path / "blob.toml"
    blob.write_bytes(b"\x80\xff\x00binary")
    assert main(["run", str(blob)]) == 2
    assert "not a TOML text file" in capsys.readouterr().err


def test_xsa_example_succeeds(capsys):
    assert main(["run", str(ROOT / "examples/xsa.toml")]) == 0
    assert "Test result: SUCCESS" in capsys.readouterr().out
