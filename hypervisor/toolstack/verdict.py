"""Judging a test guest's run as the Xen Test Framework's runner does, when the
domain's configuration asks for it (``verdict = "xtf"``).

xtf-runner reads the guest's console to its end and interprets the last line
(``interpret_result``): without ``Test result:`` it is a CRASH, otherwise the
first of SUCCESS, SKIP, ERROR, FAILURE, CRASH it names. The runner's exit codes
are kept (it avoids 1 and 2, which Python uses). A domain that did not shut
down of its own accord (crashed, hung, or stopped by a time limit) has no
verdict to read: a CRASH. The hypervisor knows nothing of this; only the
toolstack reads the console.
"""

from __future__ import annotations

RESULTS = ("SUCCESS", "SKIP", "ERROR", "FAILURE", "CRASH")
EXIT_CODES = {"SUCCESS": 0, "SKIP": 3, "ERROR": 4, "FAILURE": 5, "CRASH": 6}
VERDICTS = ("xtf",)  # the ways a configuration may ask for its run to be judged


def interpret_result(line: str) -> str:
    """xtf-runner's reading of the console's last line."""
    if "Test result:" not in line:
        return "CRASH"
    return next((r for r in RESULTS if r in line), "CRASH")


def xtf_result(console: bytes, reason: str) -> str:
    """The verdict of a run that ended with ``reason`` (a shutdown reason,
    "hung" or "running") and wrote ``console``."""
    if reason != "poweroff":
        return "CRASH"
    lines = console.decode(errors="replace").splitlines()
    return interpret_result(lines[-1]) if lines else "CRASH"
