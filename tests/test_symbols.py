"""Kernel symbols (guestos/symbols.py): what guest memory holds for code must
name the same code in any process that restores the image, whatever order
it imported the kernel's modules in."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest

from tests.conftest import ROOT

SCRIPT = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from guestos.symbols import symbol_number
from guestos.drivers.virtio_balloon import stats_request, virtio_balloon_driver
from guestos.manage import shutdown_handler
print(symbol_number(stats_request), symbol_number(virtio_balloon_driver),
      symbol_number(shutdown_handler))
"""


def numbers_after_importing(*modules: str) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *modules], cwd=ROOT, check=True,
                         capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return out.stdout


def test_symbol_numbers_do_not_depend_on_the_import_order():
    assert numbers_after_importing("guestos") == numbers_after_importing(
        "guestos.drivers.virtio_balloon", "guestos.manage", "guestos")


def test_a_symbol_is_the_crc32_of_its_name():
    from guestos.manage import shutdown_handler
    from guestos.symbols import symbol, symbol_number
    n = symbol_number(shutdown_handler)
    assert n == zlib.crc32(b"guestos.manage.shutdown_handler")
    assert symbol(n) is shutdown_handler


def test_two_pieces_of_code_cannot_share_a_name():
    from guestos.symbols import export

    def one() -> None: ...

    def other() -> None: ...

    export(one, "tests.test_symbols.the_same_name")
    with pytest.raises(RuntimeError, match="is taken"):
        export(other, "tests.test_symbols.the_same_name")


def test_code_that_was_never_exported_cannot_go_into_a_table():
    from guestos.symbols import symbol_number
    with pytest.raises(RuntimeError, match="not exported"):
        symbol_number(lambda cpu: None)
