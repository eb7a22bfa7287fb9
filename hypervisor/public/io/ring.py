"""Free-running ring indices (xen/include/public/io/ring.h's convention for
the console and xenstore rings): producer and consumer count up and wrap at
2**32; an index masked by the ring size is an offset in the ring."""

from __future__ import annotations


def ring_spans(idx: int, n: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) pieces of ``n`` bytes starting at index ``idx`` in a
    ring of ``size`` (a power of two) bytes: one, or two where they wrap."""
    spans = []
    while n > 0:
        off = idx & (size - 1)
        chunk = min(n, size - off)
        spans.append((off, chunk))
        idx, n = idx + chunk, n - chunk
    return spans


def ring_used(cons: int, prod: int) -> int:
    return (prod - cons) & 0xFFFFFFFF
