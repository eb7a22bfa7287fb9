"""Constants the portable hypercall cases share (tests/hypercalls/portable.py
describes a step)."""

RW = 0x67  # present, rw, user, accessed, dirty
RO = 0x25  # present, user, accessed
OWN_DOMID = 1  # the test guest is the first domain
ANY = object()  # a result that is not fixed (e.g. max_ram_page)
