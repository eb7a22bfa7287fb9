"""Durations on the command line: ``20ms``, ``1.5s``, ``300us``, ``1000ns``."""

from __future__ import annotations

import re

_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s)\s*$")


def parse_duration(text: str) -> int:
    """Nanoseconds in ``text``; ValueError with a hint if it is not a duration."""
    m = _RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration: write a number and a unit, "
                         "e.g. 20ms, 1.5s, 300us")
    return round(float(m.group(1)) * _UNITS[m.group(2)])


def format_duration(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.3f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.3f} ms"
    if ns >= 1_000:
        return f"{ns / 1e3:.1f} us"
    return f"{ns} ns"
