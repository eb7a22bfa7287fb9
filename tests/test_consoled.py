"""The console daemon's side of a guest's console ring, as xenconsoled's
buffer_append (xen.git tools/console/daemon/io.c): it takes what lies
between out_cons and out_prod and then notifies the guest; a kick that finds
the ring empty, or indices further apart than the ring is long, is ignored:
nothing consumed, no notification. A notification for nothing would wake a
guest that waits for the ring to drain, which kicks again: a livelock."""

from __future__ import annotations

from hypervisor.domctl import map_shared_info
from hypervisor.public.io.console import OUT_CONS_OFF, OUT_OFF, OUT_PROD_OFF, XENCONS_OUT_SIZE
from hypervisor.toolstack.context import domain_of


def _u32(page, off: int) -> int:
    return int.from_bytes(page[off:off + 4].tobytes(), "little")


def _set_u32(page, off: int, value: int) -> None:
    page[off:off + 4] = list((value & 0xFFFFFFFF).to_bytes(4, "little"))


def _kick(hv, dom):
    """The guest's kick of its console port, seen from the daemon: (pending
    after it, out_cons after it, what reached the console)."""
    backend = domain_of(hv, dom).console
    shinfo = map_shared_info(hv, dom)
    word, bit = divmod(backend.port, 64)
    shinfo.evtchn_pending[word] &= ~(1 << bit)
    before = len(dom.console_out)
    backend.notify()
    pending = bool(shinfo.evtchn_pending[word] >> bit & 1)
    return pending, _u32(backend.page, OUT_CONS_OFF), bytes(dom.console_out[before:])


def test_an_empty_ring_is_not_notified(booted):
    hv, dom = booted()
    page = domain_of(hv, dom).console.page
    _set_u32(page, OUT_CONS_OFF, 7)
    _set_u32(page, OUT_PROD_OFF, 7)
    assert _kick(hv, dom) == (False, 7, b"")


def test_output_is_consumed_then_notified(booted):
    hv, dom = booted()
    page = domain_of(hv, dom).console.page
    _set_u32(page, OUT_CONS_OFF, 0)
    page[OUT_OFF:OUT_OFF + 3] = list(b"hi\n")
    _set_u32(page, OUT_PROD_OFF, 3)
    assert _kick(hv, dom) == (True, 3, b"hi\n")


def test_indices_further_apart_than_the_ring_are_ignored(booted):
    hv, dom = booted()
    page = domain_of(hv, dom).console.page
    _set_u32(page, OUT_CONS_OFF, 0)
    _set_u32(page, OUT_PROD_OFF, XENCONS_OUT_SIZE + 1)
    assert _kick(hv, dom) == (False, 0, b"")
