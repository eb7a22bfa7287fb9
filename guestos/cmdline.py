"""Kernel command line options (Linux's lib/cmdline.c): ``name=VALUE`` words."""

from __future__ import annotations


def parse_int(cmdline: str, name: str, default: int = 0) -> int:
    """The value of option ``name=N`` (0x.. too); default if it is absent or no number."""
    for word in cmdline.split():
        if word.startswith(name + "="):
            try:
                return int(word.split("=", 1)[1], 0)
            except ValueError:
                return default
    return default


def parse_word(cmdline: str, name: str, default: str = "") -> str:
    """The value of option ``name=VALUE``; default if it is absent."""
    for word in cmdline.split():
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return default
