"""Constants and step builders the portable hypercall cases share
(tests/hypercalls/portable.py describes a step)."""

from hypervisor.public.xen import Hypercall

RW = 0x67  # present, rw, user, accessed, dirty
RO = 0x25  # present, user, accessed
OWN_DOMID = 1  # the test guest is the first domain
ANY = object()  # a result that is not fixed (e.g. max_ram_page)
BUF = ("buf", 0)  # the guest's argument buffer


def _pair(lo: object, hi: object) -> object:
    if isinstance(lo, int) and isinstance(hi, int):
        return (lo & 0xFFFFFFFF) | (hi & 0xFFFFFFFF) << 32
    return ("pair", lo, hi)


def fields(items: list[object]) -> list[object]:
    """A C struct's fields as a ``mem`` step's 64-bit words: each item is a
    32-bit field (a number or an expression), ``("q", e)`` a 64-bit one at an
    8-byte offset."""
    out: list[object] = []
    low: object = None  # a 32-bit field waiting for its upper half
    for item in items:
        if isinstance(item, tuple) and item[0] == "q":
            assert low is None, "a 64-bit field must be 8-byte aligned"
            out.append(item[1])
        elif low is None:
            low = item
        else:
            out.append(_pair(low, item))
            low = None
    return out + ([_pair(low, 0)] if low is not None else [])


def struct(items: list[object], nr: int, *args_and_want: object) -> tuple:
    """Write a struct's fields at BUF, then ``nr(*args)``: ("mem", ...)."""
    *args, want = args_and_want
    return ("mem", nr, list(args), fields(items), want)


def word(i: int, want: object) -> tuple:
    """The 32-bit field i of BUF as the last ``mem`` step left it."""
    return ("last", 4 * i, want)


MEMOP_BUF = 256  # a memop step's buffer: zeroed, then the words given


def memop(cmd: int, words: tuple[tuple[int, object], ...], want: object) -> tuple:
    """memory_op(cmd, BUF) with a zeroed buffer holding ``words`` (byte
    offset, value) pairs: a ``mem`` step."""
    buf: list[object] = [0] * (MEMOP_BUF // 8)
    for off, value in words:
        assert off % 8 == 0 and off < MEMOP_BUF, off
        buf[off // 8] = value
    return ("mem", Hypercall.memory_op, [cmd, BUF], buf, want)
