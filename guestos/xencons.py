"""The console: printk and the write syscall go out through the console ring
(start_info's console page, Xen's xencons_interface), as Linux's hvc_xen
does: copy into ``out`` up to the consumer, publish the producer index, kick
the console's event channel. The console daemon drains the ring inside that
kick, so a full ring frees up after one. Input comes the other way, in the
``in`` half: ``domU_read_console`` takes it (the tty's interrupt handler
calls it, guestos/tty.py) and kicks the daemon, which may have more."""

from __future__ import annotations

import struct

from guestos.evtchn import notify_remote_via_evtchn
from guestos.kdata import AREAS
from guestos.layout import Layout, Ref
from guestos.mm import mfn_to_pfn, read_u32, va
from hypervisor.public.io.console import (
    IN_CONS_OFF,
    IN_OFF,
    IN_PROD_OFF,
    OUT_CONS_OFF,
    OUT_OFF,
    OUT_PROD_OFF,
    XENCONS_IN_SIZE,
    XENCONS_OUT_SIZE,
)
from hypervisor.public.io.ring import ring_spans, ring_used
from hypervisor.public.native import NativeCpu
from hypervisor.public.xen import start_info

XENCONS = Layout("xencons", [
    ("pfn", "u64"),            # the console ring's page (start_info)
    ("port", "u64"),           #   and its event channel (0: not known yet)
])
assert XENCONS.size <= AREAS["xencons"].size


def xencons(cpu: NativeCpu) -> Ref:
    return XENCONS.at(cpu, AREAS["xencons"].va(cpu))


def hvc_write(cpu: NativeCpu, data: bytes) -> int:
    """Write all of ``data`` (or what a stuck console lets through): bytes sent."""
    cons = xencons(cpu)
    ring, port = va(cons.pfn), cons.port
    sent = 0
    stuck = 0
    while sent < len(data) and stuck < 2:
        cons, prod = read_u32(cpu, ring + OUT_CONS_OFF), read_u32(cpu, ring + OUT_PROD_OFF)
        room = XENCONS_OUT_SIZE - ring_used(cons, prod)
        n = min(room, len(data) - sent)
        for off, chunk in ring_spans(prod, n, XENCONS_OUT_SIZE):
            cpu.write(ring + OUT_OFF + off, data[sent:sent + chunk])
            sent += chunk
        cpu.write(ring + OUT_PROD_OFF, struct.pack("<I", (prod + n) & 0xFFFFFFFF))  # after the data
        notify_remote_via_evtchn(cpu, port)
        stuck = stuck + 1 if room == 0 else 0
    return sent


def domU_read_console(cpu: NativeCpu) -> bytes:
    """What the daemon put in ``in``: taken, in_cons published after the
    copy, and the daemon kicked (it may hold more than the ring had room
    for). Indices further apart than the ring is long take nothing."""
    cons = xencons(cpu)
    ring = va(cons.pfn)
    in_cons, in_prod = read_u32(cpu, ring + IN_CONS_OFF), read_u32(cpu, ring + IN_PROD_OFF)
    n = ring_used(in_cons, in_prod)
    if n == 0 or n > XENCONS_IN_SIZE:
        return b""
    data = b"".join(cpu.read(ring + IN_OFF + off, chunk)
                    for off, chunk in ring_spans(in_cons, n, XENCONS_IN_SIZE))
    cpu.write(ring + IN_CONS_OFF, struct.pack("<I", in_prod))
    notify_remote_via_evtchn(cpu, cons.port)
    return data


def xencons_init(cpu: NativeCpu, si: start_info) -> None:
    """The console's ring and port, from start_info: at boot, and in a new
    domain (where the restorer wrote the new ones) before anything is printed."""
    cons = xencons(cpu)
    cons.pfn = mfn_to_pfn(cpu, si.console.domU.mfn)
    cons.port = si.console.domU.evtchn
