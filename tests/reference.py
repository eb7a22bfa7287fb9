"""Pure-Python references for the firmware's workloads."""

from __future__ import annotations

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def hashchain_digest(rounds: int = 100, pages: int = 64) -> int:
    """What firmware/user/hashchain.S computes: word i of the buffer starts as
    (i + 1) * GOLDEN; then for each round r and word i,
    h = rotl((h ^ buf[i]) * FNV_PRIME, 17) and buf[i] = h ^ r."""
    words = pages * 512
    buf = [((i + 1) * GOLDEN) & MASK for i in range(words)]
    h = FNV_OFFSET
    for r in range(rounds):
        for i in range(words):
            h = ((h ^ buf[i]) * FNV_PRIME) & MASK
            h = ((h << 17) | (h >> 47)) & MASK
            buf[i] = h ^ r
    return h


def hashchain_line(rounds: int = 100, pages: int = 64) -> str:
    return f"hashchain digest {hashchain_digest(rounds, pages):016x}\n"
