"""Reading a pseudo-terminal in tests: what a person at ``pvlab run
--console`` or ``pvlab console`` would see."""

from __future__ import annotations

import os
import select


def read_until(fd: int, seen: bytearray, want: bytes, polls: int = 240) -> bool:
    """Read the terminal until ``want`` shows, giving up after ``polls``
    half-second waits with nothing to read (a guard against a hang, not a
    timing assertion)."""
    idle = 0
    while want not in seen and idle < polls:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            idle += 1
            continue
        try:
            seen += os.read(fd, 4096)
        except OSError:
            break
    return want in seen
