"""Kernel symbols: how guest memory points at Python code.

Every piece of kernel state lives in guest memory, and guest memory cannot
hold a Python function. So a table entry that points at code (an irq
handler, a device's dev_pm_ops, a xenbus watch's callback, a stop_machine
function, a work item) holds the code's symbol number instead, and
``symbol()`` finds the code again, in this process or in a fresh one that
restored the domain from an image.

Code becomes a symbol with ``export``, when its module is imported: a
driver exports its own handlers and registers them itself (the
registration calls live next to the tables: evtchn.py, pm.py, xenbus.py,
stop_machine.py, workqueue.py), so the code that keeps a table never names
the code it calls.

The ABI with saved images: a symbol's number is the CRC32 of its name
(module and function), whatever the order modules are imported in. A saved
image holds these numbers, so the name of exported code is never changed or
reused for other code; new code gets a new name. This is the only place
the rule is written.
"""

from __future__ import annotations

import zlib
from typing import TypeVar

NO_SYMBOL = 0  # a table entry that points at nothing

T = TypeVar("T")
_by_number: dict[int, object] = {}
_number_of: dict[int, int] = {}   # id(code) -> its symbol number


def export(code: T, name: str | None = None) -> T:
    """Make ``code`` reachable from guest memory. A function is named after
    its module and qualified name; other objects (a dev_pm_ops) are given
    one."""
    if name is None:
        name = f"{code.__module__}.{code.__qualname__}"  # type: ignore[attr-defined]
    number = zlib.crc32(name.encode())
    other = _by_number.get(number)
    if number == NO_SYMBOL or (other is not None and other is not code):
        raise RuntimeError(f"symbol {name!r}: number {number:#x} is taken; rename it")
    _by_number[number] = code
    _number_of[id(code)] = number
    return code


def symbol_number(code: object) -> int:
    """What a table in guest memory holds for ``code`` (exported first)."""
    try:
        return _number_of[id(code)]
    except KeyError:
        raise RuntimeError(f"{code!r} is not exported (guestos.symbols.export)") from None


def symbol(number: int) -> object:
    """The code a table entry names."""
    try:
        return _by_number[number]
    except KeyError:
        raise RuntimeError(f"no exported code has symbol number {number:#x}: is the module "
                           "that registered it not imported?") from None

