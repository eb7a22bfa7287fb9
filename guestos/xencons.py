"""The console: printk and the write syscall go out through the console ring
(start_info's console page, Xen's xencons_interface), as Linux's hvc_xen
does: copy into ``out`` up to the consumer, publish the producer index, kick
the console's event channel. The console daemon drains the ring inside that
kick, so a full ring frees up after one."""

from __future__ import annotations

import struct
from typing import Any

from guestos.hypercall import with_args
from guestos.kdata import kernel
from guestos.mm import va
from hypervisor.public.event_channel import EVTCHNOP_send
from hypervisor.public.io.console import (
    OUT_CONS_OFF,
    OUT_OFF,
    OUT_PROD_OFF,
    XENCONS_OUT_SIZE,
    mask_out,
)
from hypervisor.public.xen import Hypercall


def read_u32(cpu: Any, addr: int) -> int:
    return struct.unpack("<I", cpu.read(addr, 4))[0]


def notify(cpu: Any, port: int) -> None:
    cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_send,
                  with_args(cpu, struct.pack("<I", port)))


def hvc_write(cpu: Any, data: bytes) -> int:
    """Write all of ``data`` (or what a stuck console lets through): bytes sent."""
    k = kernel(cpu)
    ring, port = va(k.console_pfn), k.console_port
    sent = 0
    stuck = 0
    while sent < len(data) and stuck < 2:
        cons = read_u32(cpu, ring + OUT_CONS_OFF)
        prod = read_u32(cpu, ring + OUT_PROD_OFF)
        room = XENCONS_OUT_SIZE - ((prod - cons) & 0xFFFFFFFF)
        n = min(room, len(data) - sent)
        while n > 0:
            off = mask_out(prod)
            chunk = min(n, XENCONS_OUT_SIZE - off)
            cpu.write(ring + OUT_OFF + off, data[sent:sent + chunk])
            prod, sent, n = (prod + chunk) & 0xFFFFFFFF, sent + chunk, n - chunk
        cpu.write(ring + OUT_PROD_OFF, struct.pack("<I", prod))  # after the data
        notify(cpu, port)
        stuck = stuck + 1 if room == 0 else 0
    return sent
