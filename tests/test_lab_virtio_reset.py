"""Lab virtio-reset: its handout runs as written (with the reference's
reset as the student's files), explore's replay lines run the lab's files
again, and the grader finds out a reset that does not break the queues and
a flush that only prints its line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from labs.gradelib import QUICK_ENV
from tests.conftest import ROOT, checkout_env
from tests.test_lab_balloon import BLOCK, missing_lines

HANDOUT = ROOT / "docs" / "labs" / "virtio-reset.md"
NOT_RUN = ("pvlab lab grade",)   # the grade: tests/test_labs.py grades the reference
DRIVERS = ROOT / "guestos" / "drivers"


def run_sh(script: str, cwd) -> str:
    prelude = f'set -e\npvlab() {{ "{sys.executable}" -m hypervisor.toolstack.cli "$@"; }}\n'
    p = subprocess.run(["bash", "-c", prelude + script], cwd=cwd, env=checkout_env(),
                       capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode in (0, 1), f"{script}\n{out[-3000:]}"  # 1: explore found outcomes differ
    return out


def one_line(script: str) -> str:
    return " ".join(script.replace("\\\n", " ").split())


def student(where, virtio: str, mmio: str) -> None:
    (where / "virtio-reset").mkdir(exist_ok=True)
    (where / "virtio-reset" / "virtio.py").write_text(virtio)
    (where / "virtio-reset" / "virtio_mmio.py").write_text(mmio)


@pytest.mark.slow
def test_the_handout_runs_as_written(tmp_path):
    (tmp_path / "firmware").symlink_to(ROOT / "firmware")
    (tmp_path / "labs").symlink_to(ROOT / "labs")
    out, previous, checked = None, "", 0
    for lang, text in BLOCK.findall(HANDOUT.read_text()):
        if lang == "sh":
            if any(s in text for s in NOT_RUN):
                out = None
                continue
            if text.startswith("pvlab lab run virtio-reset -- run "):  # a replay explore gave
                assert f"replay: {one_line(text)}" in previous, previous[-3000:]
            out = previous = run_sh(text, tmp_path)
            if "pvlab lab start" in text:   # the student's files, written as the reference's
                student(tmp_path, (DRIVERS / "virtio.py").read_text(),
                        (DRIVERS / "virtio_mmio.py").read_text())
        elif lang == "" and out is not None:
            assert missing_lines(text, out) == [], out[-4000:]
            checked += 1
            out = None
    assert checked >= 1


def grade(tmp_path, test: str) -> str:
    p = subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", "lab", "grade",
                        "virtio-reset", "--test", test], cwd=tmp_path,
                       env=checkout_env(**{QUICK_ENV: "1"}), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    return " ".join(p.stdout.split())


@pytest.mark.slow
def test_the_grader_finds_a_reset_that_does_not_break_the_queues(tmp_path):
    virtio = (DRIVERS / "virtio.py").read_text()
    body = "    for vq in dev_vqs(cpu, dev):\n        vq.broken = 1\n"
    assert body in virtio
    student(tmp_path, virtio.replace(body, "    pass\n"), (DRIVERS / "virtio_mmio.py").read_text())
    text = grade(tmp_path, "breaks")
    assert "its thread handed the queues to their callbacks" in text
    assert "Score: 0/4" in text


@pytest.mark.slow
def test_the_grader_finds_a_flush_that_only_prints_its_line(tmp_path):
    mmio = (DRIVERS / "virtio_mmio.py").read_text()
    call = "if dev.irq != NO_IRQ and run_irq_thread(cpu, dev.irq):"
    assert call in mmio
    mmio = mmio.replace(call, "if dev.irq != NO_IRQ and irq_info(cpu, dev.irq).thread_pending:")
    mmio = re.sub(r"^from guestos.evtchn import ", "from guestos.evtchn import irq_info, ", mmio,
                  flags=re.M)
    student(tmp_path, (DRIVERS / "virtio.py").read_text(), mmio)
    text = grade(tmp_path, "flushes")
    assert "and yet cpu1 ran that interrupt's thread afterwards" in text
    assert "refused on cpu1" in text and "Score: 0/8" in text
