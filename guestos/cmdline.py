"""Kernel command line options (Linux's lib/cmdline.c): ``name=VALUE`` words."""

from __future__ import annotations

# run=prog[:a0[:a1[:a2]]]: a program takes at most three numbers (rdi, rsi, rdx)
MAX_RUN_ARGS = 3


class BadOption(ValueError):
    """An option the kernel cannot obey: boot stops with its one-line reason
    (the domain crashes with it), as Linux panics on an init= it cannot run."""


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


def parse_run(word: str) -> list[tuple[str, tuple[int, int, int]]]:
    """``run=prog[:a0[:a1[:a2]]],...``: each program and its three numbers,
    missing ones 0. BadOption for a word that is not of that form."""
    out = []
    for item in word.split("=", 1)[1].split(","):
        name, *nums = item.split(":")
        if not name:
            raise BadOption(f"option {word}: a program name is missing")
        if len(nums) > MAX_RUN_ARGS:
            raise BadOption(f"option {word}: {name} is given {len(nums)} numbers; a "
                            f"program takes at most {MAX_RUN_ARGS}")
        try:
            args = [int(n, 0) for n in nums]
        except ValueError:
            raise BadOption(f"option {word}: {item!r}: the numbers after the program "
                            "name must be integers (0x.. too)") from None
        args += [0] * (MAX_RUN_ARGS - len(args))
        out.append((name, (args[0], args[1], args[2])))
    return out
