"""Constants the portable hypercall cases share (tests/hypercalls/portable.py
describes a step)."""

RW = 0x67  # present, rw, user, accessed, dirty
RO = 0x25  # present, user, accessed
OWN_DOMID = 1  # the test guest is the first domain
ANY = object()  # a result that is not fixed (e.g. max_ram_page)
BUF = ("buf", 0)  # the guest's argument buffer


def fields(items: list[object]) -> list[object]:
    """A C struct's fields as a ``mem`` step's words: each int is a 32-bit
    field, ``("q", e)`` a 64-bit one (at an 8-byte offset) that may be any
    expression."""
    out: list[object] = []
    raw = b""
    for item in items:
        if isinstance(item, tuple) and item[0] == "q":
            assert len(raw) % 8 == 0, "a 64-bit field must be 8-byte aligned"
            if raw:
                out.append(raw)
                raw = b""
            out.append(item[1])
        else:
            raw += (item & 0xFFFFFFFF).to_bytes(4, "little")  # type: ignore[operator]
    return out + ([raw] if raw else [])


def struct(items: list[object], nr: int, *args_and_want: object) -> tuple:
    """Write a struct's fields at BUF, then ``nr(*args)``: ("mem", ...)."""
    *args, want = args_and_want
    return ("mem", nr, list(args), fields(items), want)


def word(i: int, want: object) -> tuple:
    """The 32-bit field i of BUF as the last ``mem`` step left it."""
    return ("last", 4 * i, want)
