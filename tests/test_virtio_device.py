"""The virtio-mmio balloon, driven from the host side with a fake driver.

A real hypervisor and a built (not started) domain with a balloon device; a
small driver in this file programs the registers through the MMIO bus (the
path a VCPU's loads and stores take), lays its rings out in frames the domain
owns, adds buffers and notifies. Covered: the register file and config space,
the status handshake, the notify rules, inflate/deflate and what may be
freed, inhibit, statistics and their host poll, and ring validation: every
ring rule the driver breaks ends in DEVICE_NEEDS_RESET, never in an exception
of the host, a write outside the domain's frames, or a broken frame count;
the last tests throw random rings and register writes at the device.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unicorn import UcError

from hypervisor.devices.balloon import (
    QUEUE_SIZE,
    REQUEST_MAX_BYTES,
    STATE_KEYS,
    Balloon,
    BalloonError,
    BalloonHost,
    BalloonMetrics,
    restore_state,
)
from hypervisor.devices.bus import MMIO_BASE, MMIO_NONE, MmioBus
from hypervisor.devices.kinds import PLACE_KEYS, check_entry, save_entry
from hypervisor.devices.virtio.mmio import PVLAB_VENDOR_ID, VirtioMmio, VirtioMmioMetrics
from hypervisor.devices.virtio.queue import DomainMemory
from hypervisor.mm.frames import FREE, FrameTable, PageType
from hypervisor.mm.memory import PAGE_SHIFT, PAGE_SIZE, MachineMemory
from hypervisor.public.io.virtio import (
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_STAT,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BALLOON,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_IDX_OFF,
    VRING_RING_OFF,
    VRING_USED_ELEM,
)
from hypervisor.public.xen import INVALID_MFN
from hypervisor.toolstack.builder import build_domain
from hypervisor.toolstack.config import parse_config
from hypervisor.toolstack.context import audit
from tests.conftest import booting

ROOT = Path(__file__).resolve().parent.parent
INTERVAL_NS = 5_000_000

ACK = VIRTIO_CONFIG_S_ACKNOWLEDGE
DRIVER = VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = VIRTIO_CONFIG_S_DRIVER_OK
NEEDS_RESET = VIRTIO_CONFIG_S_NEEDS_RESET
ALL_OK = ACK | DRIVER | FEATURES_OK | DRIVER_OK
INFLATE, DEFLATE, STATS = 0, 1, 2
OFFERED = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST
           | 1 << VIRTIO_BALLOON_F_STATS_VQ)  # DEFLATE_ON_OOM only if configured
WANTED = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_STATS_VQ
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


# --- the machine and the fake driver ---------------------------------------------------

def boot_balloon(boot, interval: str = "5ms", memory: int = 16, seed: int = 1,
                 deflate_on_oom: bool = False, postcopy: str = "drop"):
    """A guest with a balloon device, booted by ``boot`` (the ``booted``
    fixture, or ``booting()``'s function)."""
    balloon: dict = {"stats_interval": interval, "postcopy": postcopy}
    if deflate_on_oom:
        balloon["deflate_on_oom"] = True
    cfg = parse_config({"name": "vb", "memory": memory, "image": "firmware/guest.elf",
                        "seed": seed, "balloon": balloon}, ROOT / "vb.toml")
    return boot(cfg)


class Ring:
    """The driver's view of one queue: where its three areas are, its shadows."""

    def __init__(self, index: int, num: int, desc: int, avail: int, used: int) -> None:
        self.index, self.num = index, num
        self.desc, self.avail, self.used = desc, avail, used
        self.next_desc = 0   # descriptors are handed out round-robin
        self.avail_idx = 0   # shadow of avail->idx


class Driver:
    """A minimal virtio-mmio driver working through ``hv.bus``."""

    def __init__(self, hv, dom) -> None:
        self.hv, self.dom = hv, dom
        self.t = dom.devices[0]
        self.mem = hv.machine.memory
        self.rings: dict[int, Ring] = {}
        self.data = 0  # the fuzz's payload page
        self.pool: list[int] = []  # pages for buffers, taken before a test counts frames

    # registers
    def read(self, offset: int, size: int = 4) -> int:
        return self.hv.bus.read(self.dom, self.t.base + offset, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.hv.bus.write(self.dom, self.t.base + offset, size, value)

    @property
    def status(self) -> int:
        return self.read(VIRTIO_MMIO_STATUS)

    @property
    def isr(self) -> int:
        return self.read(VIRTIO_MMIO_INTERRUPT_STATUS)

    # memory
    def frame(self) -> int:
        """A fresh frame of the domain, mapped nowhere (only its allocation ref)."""
        return self.hv.machine.frames.alloc(self.dom.domid)

    def page(self) -> int:
        return self.frame() << PAGE_SHIFT

    def buffer(self, data: bytes) -> int:
        addr = self.pool.pop() if self.pool else self.page()
        self.mem.write(addr, data)
        return addr

    # the handshake
    def set_features(self, features: int) -> None:
        for sel in (0, 1):
            self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
            self.write(VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)

    def negotiate(self, features: int = WANTED) -> None:
        self.write(VIRTIO_MMIO_STATUS, 0)
        self.write(VIRTIO_MMIO_STATUS, ACK)
        self.write(VIRTIO_MMIO_STATUS, ACK | DRIVER)
        self.set_features(features)
        self.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK)
        assert self.status == ACK | DRIVER | FEATURES_OK

    def setup_queue(self, index: int, num: int = QUEUE_SIZE, desc: int | None = None,
                    avail: int | None = None, used: int | None = None,
                    ready: bool = True) -> Ring:
        ring = Ring(index, num, self.page() if desc is None else desc,
                    self.page() if avail is None else avail,
                    self.page() if used is None else used)
        self.write(VIRTIO_MMIO_QUEUE_SEL, index)
        self.write(VIRTIO_MMIO_QUEUE_NUM, num)
        for low, addr in ((VIRTIO_MMIO_QUEUE_DESC_LOW, ring.desc),
                          (VIRTIO_MMIO_QUEUE_AVAIL_LOW, ring.avail),
                          (VIRTIO_MMIO_QUEUE_USED_LOW, ring.used)):
            self.write(low, addr & 0xFFFFFFFF)
            self.write(low + 4, addr >> 32)
        if ready:
            self.write(VIRTIO_MMIO_QUEUE_READY, 1)
        self.rings[index] = ring
        return ring

    def driver_ok(self) -> None:
        self.write(VIRTIO_MMIO_STATUS, ALL_OK)

    def start(self, queues: tuple[int, ...] = (INFLATE, DEFLATE, STATS), num: int = QUEUE_SIZE,
              driver_ok: bool = True) -> None:
        self.negotiate()
        for i in queues:
            self.setup_queue(i, num)
        self.pool = [self.page() for _ in range(16)]
        if driver_ok:
            self.driver_ok()
            assert self.status == ALL_OK

    # buffers
    def write_desc(self, ring: Ring, i: int, addr: int, length: int, flags: int,
                   nxt: int) -> None:
        self.mem.write(ring.desc + VRING_DESC.size * i, VRING_DESC.pack(addr, length, flags, nxt))

    def publish(self, ring: Ring, head: int) -> None:
        """Put ``head`` in the avail ring and bump avail->idx."""
        self.mem.write(ring.avail + VRING_RING_OFF + 2 * (ring.avail_idx % ring.num),
                       _U16.pack(head))
        ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(ring, ring.avail_idx)

    def set_avail_idx(self, ring: Ring, idx: int) -> None:
        self.mem.write(ring.avail + VRING_IDX_OFF, _U16.pack(idx))

    def add(self, ring: Ring, bufs: list[tuple[int, int, bool]]) -> int:
        """A chain of (addr, len, device-writable) buffers; returns its head."""
        ids = [(ring.next_desc + k) % ring.num for k in range(len(bufs))]
        ring.next_desc = (ring.next_desc + len(bufs)) % ring.num
        for k, (addr, length, writable) in enumerate(bufs):
            flags = (VRING_DESC_F_WRITE if writable else 0) | \
                (VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0)
            self.write_desc(ring, ids[k], addr, length, flags, ids[(k + 1) % len(ids)])
        self.publish(ring, ids[0])
        return ids[0]

    def notify(self, index: int) -> None:
        self.write(VIRTIO_MMIO_QUEUE_NOTIFY, index)

    def used(self, ring: Ring) -> tuple[int, list[tuple[int, int]]]:
        """used->idx and the used elements so far (up to num of them)."""
        idx = _U16.unpack(self.mem.read(ring.used + VRING_IDX_OFF, 2))[0]
        elems = [VRING_USED_ELEM.unpack(self.mem.read(
            ring.used + VRING_RING_OFF + VRING_USED_ELEM.size * k, VRING_USED_ELEM.size))
            for k in range(min(idx, ring.num))]
        return idx, elems

    def request(self, index: int, mfns: list[int]) -> int:
        """An inflate or deflate request: one readable buffer of le32 mfns."""
        ring = self.rings[index]
        data = b"".join(_U32.pack(m) for m in mfns)
        head = self.add(ring, [(self.buffer(data), len(data), False)])
        self.notify(index)
        return head


def stats_bytes(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(VIRTIO_BALLOON_STAT.pack(tag, val) for tag, val in entries)


class Guard:
    """What the device must leave alone, recorded now, checked later: the
    bytes of every frame that is not the domain's (the M2P apart: freeing a
    frame invalidates its entry), the domain's pagetables, and which frames
    could leave the domain at all (those with only their allocation ref)."""

    def __init__(self, hv, dom) -> None:
        self.hv, self.dom = hv, dom
        ft = hv.machine.frames
        self.pages = hv.machine.memory.u8.reshape(-1, PAGE_SIZE)
        first = hv.machine.xen.m2p_first_mfn
        self.m2p_frames = np.arange(first, first + -(-ft.nr_frames * 8 // PAGE_SIZE))
        self.owned = ft.owner == dom.domid
        self.foreign = ~self.owned
        self.foreign[self.m2p_frames] = False
        self.foreign_bytes = self.pages[self.foreign].copy()
        self.tables = np.flatnonzero(self.owned & (ft.type >= PageType.l1)
                                     & (ft.type <= PageType.l4) & (ft.type_count > 0))
        assert self.tables.size >= 4  # L4, L3, L2 and the L1s of the bootstrap tables
        self.table_bytes = self.pages[self.tables].copy()
        self.table_counts = (ft.type[self.tables].copy(), ft.type_count[self.tables].copy(),
                             ft.ref_count[self.tables].copy())
        self.unused = self.owned & (ft.ref_count == 1) & (ft.type_count == 0) & ~ft.pinned \
            & ft.allocated & ~ft.xenheap
        self.m2p = hv.machine.m2p.copy()

    def check(self) -> None:
        hv, ft = self.hv, self.hv.machine.frames
        changed = np.flatnonzero((self.pages[self.foreign] != self.foreign_bytes).any(axis=1))
        assert changed.size == 0, \
            f"frames not the domain's were written: {np.flatnonzero(self.foreign)[changed][:8]}"
        assert np.array_equal(self.pages[self.tables], self.table_bytes), \
            "a pagetable of the domain changed"
        assert np.array_equal(ft.type[self.tables], self.table_counts[0])
        assert np.array_equal(ft.type_count[self.tables], self.table_counts[1])
        assert np.array_equal(ft.ref_count[self.tables], self.table_counts[2])
        gone = self.owned & (ft.owner != self.dom.domid)
        assert not (gone & ~self.unused).any(), "a frame in use left the domain"
        assert (ft.owner[gone] == FREE).all()
        balloon = self.dom.devices[0].device
        m2p_changed = set(np.flatnonzero(hv.machine.m2p != self.m2p).tolist())
        queued = {r.mfn for r in balloon.queue if r.inflate}
        assert m2p_changed <= set(np.flatnonzero(gone).tolist()) | queued
        assert audit(hv, p2m=False) == []


@pytest.fixture
def env(booted):
    hv, dom = boot_balloon(booted)
    return hv, dom, Driver(hv, dom)


def other_domain(hv):
    """A second domain on the machine, with no device."""
    return build_domain(hv, parse_config({"name": "other", "memory": 4,
                                          "image": "firmware/guest.elf"}, ROOT / "o.toml"))


def mapped_frame(hv, dom) -> int:
    """A guest frame the bootstrap tables map (ref 2: allocation and mapping)."""
    ft = hv.machine.frames
    return int(np.flatnonzero((ft.owner == dom.domid) & (ft.ref_count == 2)
                              & (ft.type == PageType.writable) & ~ft.xenheap)[0])


def l1_frame(hv, dom) -> int:
    """An L1 pagetable of the domain's bootstrap tables."""
    ft = hv.machine.frames
    return int(np.flatnonzero((ft.owner == dom.domid) & (ft.type == PageType.l1))[0])


def xenheap_frame(hv) -> int:
    """A hypervisor page shared with a domain (its shared_info)."""
    return int(np.flatnonzero(hv.machine.frames.xenheap)[0])


def frame_kinds(hv, dom, drv) -> dict[str, int]:
    """A frame of each kind the device must never free or write: in use by
    the domain, its pagetables, the hypervisor's, free, beyond RAM, MMIO."""
    return {"mapped": mapped_frame(hv, dom), "l4": dom.vcpus[0].guest_table,
            "l1": l1_frame(hv, dom), "m2p": 1, "zero": 0, "free": free_frame(hv),
            "xenheap": xenheap_frame(hv), "beyond": hv.machine.frames.nr_frames,
            "mmio": drv.t.base >> PAGE_SHIFT}


def free_frame(hv) -> int:
    """A free frame, at the bottom of the free stack (allocated last)."""
    return int(hv.machine.frames.free_mfns()[0])


def pending_event(dom, port: int) -> bool:
    return bool(dom.shared_info.evtchn_pending[port // 64] >> (port % 64) & 1)


def count_flushes(hv, dom) -> list[int]:
    calls: list[int] = []
    real = dom.flush_tlbs

    def flush():
        calls.append(dom.domid)
        real()

    dom.flush_tlbs = flush
    return calls


# --- 1. registers ------------------------------------------------------------------------

def test_identity_registers(env):
    hv, dom, drv = env
    assert drv.t.base == MMIO_BASE
    assert drv.read(VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC == 0x74726976
    assert drv.read(VIRTIO_MMIO_VERSION) == 2
    assert drv.read(VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_BALLOON == 5
    assert drv.read(VIRTIO_MMIO_VENDOR_ID) == PVLAB_VENDOR_ID
    for q in (INFLATE, DEFLATE, STATS):
        drv.write(VIRTIO_MMIO_QUEUE_SEL, q)
        assert drv.read(VIRTIO_MMIO_QUEUE_NUM_MAX) == QUEUE_SIZE == 256
        assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 0
    drv.write(VIRTIO_MMIO_QUEUE_SEL, 3)
    assert drv.read(VIRTIO_MMIO_QUEUE_NUM_MAX) == 0  # no fourth queue
    assert drv.read(VIRTIO_MMIO_STATUS) == 0
    assert drv.read(VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert drv.t.metrics.bad_accesses == 0


@pytest.mark.parametrize("oom", [False, True])
def test_device_feature_words(booted, oom):
    hv, dom = boot_balloon(booted, deflate_on_oom=oom)
    drv = Driver(hv, dom)
    drv.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
    low = drv.read(VIRTIO_MMIO_DEVICE_FEATURES)
    drv.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    high = drv.read(VIRTIO_MMIO_DEVICE_FEATURES)
    # MUST_TELL_HOST, STATS_VQ, and DEFLATE_ON_OOM if configured
    assert low == (0b111 if oom else 0b011)
    assert high == 1     # VIRTIO_F_VERSION_1 is bit 32
    assert low | high << 32 == OFFERED | oom << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    assert not low >> VIRTIO_F_INDIRECT_DESC & 1
    drv.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2)
    assert drv.read(VIRTIO_MMIO_DEVICE_FEATURES) == 0
    drv.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0xFFFFFFFF)
    assert drv.read(VIRTIO_MMIO_DEVICE_FEATURES) == 0


@pytest.mark.parametrize("offset,size", [(VIRTIO_MMIO_MAGIC_VALUE, 1), (VIRTIO_MMIO_MAGIC_VALUE, 2),
                                         (VIRTIO_MMIO_MAGIC_VALUE, 8), (0x2, 4), (0x1, 1),
                                         (VIRTIO_MMIO_STATUS + 2, 2),
                                         (VIRTIO_MMIO_QUEUE_NOTIFY, 4),  # write-only
                                         (0x0F8, 4)])                  # nothing there
def test_bad_register_reads_give_zero_and_are_counted(env, offset, size):
    _, _, drv = env
    assert drv.read(offset, size) == 0
    assert drv.t.metrics.bad_accesses == 1


BAD_STATUS_WRITES = [(VIRTIO_MMIO_STATUS, 1), (VIRTIO_MMIO_STATUS, 2),  # registers take 32 bits
                     (VIRTIO_MMIO_STATUS + 1, 4),                        # misaligned
                     (VIRTIO_MMIO_STATUS, 8)]
BAD_REGISTER_WRITES = [(VIRTIO_MMIO_MAGIC_VALUE, 0), (VIRTIO_MMIO_QUEUE_NUM_MAX, 8),  # read-only
                       (VIRTIO_MMIO_INTERRUPT_STATUS, 3),
                       (0x0F8, 1)]                                         # nothing there


def test_bad_register_writes_are_ignored_and_counted(env):
    _, _, drv = env
    t = drv.t
    for offset, size in BAD_STATUS_WRITES:
        drv.write(offset, ACK, size=size)
    assert t.status == 0 and drv.status == 0
    for offset, value in BAD_REGISTER_WRITES:
        drv.write(offset, value)
    assert t.metrics.bad_accesses == 8
    assert drv.read(VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC
    assert drv.read(VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_BALLOON


def test_config_space_reads(env):
    hv, dom, drv = env
    bal = drv.t.device
    bal.set_target(0x12345678)
    bal.actual = 0x0A0B0C0D
    cfg = VIRTIO_MMIO_CONFIG
    good = {(0, 4): 0x12345678,                        # num_pages, le32
            (4, 4): 0x0A0B0C0D,                        # actual, le32
            (0, 2): 0x5678, (2, 2): 0x1234, (6, 2): 0x0A0B}
    assert {key: drv.read(cfg + key[0], key[1]) for key in good} == good
    assert [drv.read(cfg + i, 1) for i in range(8)] == \
        [0x78, 0x56, 0x34, 0x12, 0x0D, 0x0C, 0x0B, 0x0A]
    assert drv.t.metrics.bad_accesses == 0
    bad = [(cfg + 1, 2), (cfg + 2, 4),                 # misaligned
           (cfg + 8, 4),                               # beyond the balloon's 8 bytes
           (cfg + 6, 4),                               # runs past them
           (0x200, 4)]                                 # beyond the register window
    assert [drv.read(offset, size) for offset, size in bad] == [0] * 5
    assert drv.t.metrics.bad_accesses == 5


@pytest.mark.parametrize("size", [0, 3, 5, 16])
def test_odd_access_sizes_are_bad_accesses(env, size):
    """A Python guest kernel's readl/writel passes its own size through: an
    odd one is a bad access, counted, never an exception (a size of 0 would
    divide by zero in the config space's alignment check)."""
    _, _, drv = env
    drv.write(VIRTIO_MMIO_STATUS, ACK)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER)
    for offset in (VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG + 3, VIRTIO_MMIO_STATUS):
        assert drv.read(offset, size) == 0
        drv.write(offset, 0, size)
    assert drv.t.metrics.bad_accesses == 6
    assert drv.status == ACK | DRIVER and drv.t.device.actual == 0


def test_config_space_writes(env):
    _, _, drv = env
    bal = drv.t.device
    cfg = VIRTIO_MMIO_CONFIG
    bal.set_target(100)
    drv.write(cfg + 4, 7)                               # before DRIVER: refused
    assert bal.actual == 0 and drv.t.metrics.bad_accesses == 1
    drv.write(VIRTIO_MMIO_STATUS, ACK)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER)
    drv.write(cfg + 4, 0x11223344)
    assert bal.actual == 0x11223344 and drv.read(cfg + 4) == 0x11223344
    drv.write(cfg + 5, 0xAA, size=1)                    # one byte of actual
    assert bal.actual == 0x1122AA44
    drv.write(cfg + 6, 0xBEEF, size=2)
    assert bal.actual == 0xBEEFAA44
    before = drv.t.metrics.bad_accesses
    drv.write(cfg, 5)                                   # num_pages is the host's
    drv.write(cfg + 2, 5, size=2)
    drv.write(cfg + 3, 0xFFFF, size=2)                  # misaligned
    drv.write(cfg + 8, 1)                               # beyond
    assert bal.num_pages == 100 and drv.read(cfg) == 100
    assert bal.actual == 0xBEEFAA44
    assert drv.t.metrics.bad_accesses == before + 4


def test_config_generation_and_interrupt_on_target_change(env):
    hv, dom, drv = env
    bal, t = drv.t.device, drv.t
    g0 = drv.read(VIRTIO_MMIO_CONFIG_GENERATION)
    bal.set_target(10)                                 # before DRIVER_OK: no interrupt
    assert drv.read(VIRTIO_MMIO_CONFIG_GENERATION) == g0 + 1
    assert drv.isr == 0 and t.metrics.interrupts == 0
    assert not pending_event(dom, t.port)
    drv.start()
    bal.set_target(20)
    assert drv.read(VIRTIO_MMIO_CONFIG_GENERATION) == g0 + 2
    assert drv.read(VIRTIO_MMIO_CONFIG) == 20
    assert drv.isr == VIRTIO_MMIO_INT_CONFIG
    assert t.metrics.interrupts == 1
    assert pending_event(dom, t.port)
    drv.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG)
    assert drv.isr == 0
    with pytest.raises(BalloonError):
        bal.set_target(1 << 32)
    assert drv.read(VIRTIO_MMIO_CONFIG_GENERATION) == g0 + 2


def test_address_with_no_device_reads_all_ones(env):
    hv, dom, drv = env
    nowhere = drv.t.base + PAGE_SIZE
    before = hv.bus.unclaimed
    assert hv.bus.read(dom, nowhere, 4) == MMIO_NONE == 0xFFFFFFFF
    assert hv.bus.read(dom, nowhere + 2, 2) == 0xFFFF
    assert hv.bus.read(dom, MMIO_BASE - PAGE_SIZE, 1) == 0xFF
    hv.bus.write(dom, nowhere, 4, 0)
    assert hv.bus.unclaimed == before + 4
    assert drv.t.metrics.bad_accesses == 0


def test_another_domain_cannot_reach_the_device(env):
    hv, dom, drv = env
    other = other_domain(hv)
    t = drv.t
    before = hv.bus.unclaimed
    assert hv.bus.read(other, t.base + VIRTIO_MMIO_MAGIC_VALUE, 4) == 0xFFFFFFFF
    hv.bus.write(other, t.base + VIRTIO_MMIO_STATUS, 4, ACK)
    assert hv.bus.unclaimed == before + 2
    assert t.status == 0 and t.metrics.bad_accesses == 0
    # nor do its VCPUs' engines map the page
    with pytest.raises(UcError):
        other.vcpus[0].uc.mem_read(t.base, 4)
    assert audit(hv) == []


def test_vcpu_engine_reaches_the_bus(env):
    """Vcpu.map_mmio: the device page is MMIO in the domain's Unicorn engine,
    so x86 loads and stores at its machine address reach the registers."""
    hv, dom, drv = env
    uc = dom.vcpus[0].uc
    t = drv.t
    assert int.from_bytes(uc.mem_read(t.base + VIRTIO_MMIO_MAGIC_VALUE, 4), "little") \
        == VIRTIO_MMIO_MAGIC
    assert int.from_bytes(uc.mem_read(t.base + VIRTIO_MMIO_DEVICE_ID, 4), "little") == 5
    uc.mem_write(t.base + VIRTIO_MMIO_STATUS, _U32.pack(ACK))
    assert t.status == ACK
    t.device.set_target(0x3456)
    assert int.from_bytes(uc.mem_read(t.base + VIRTIO_MMIO_CONFIG, 2), "little") == 0x3456


# --- 2. the handshake ------------------------------------------------------------------

def test_handshake(env):
    hv, dom, drv = env
    t = drv.t
    drv.write(VIRTIO_MMIO_STATUS, ACK)
    assert drv.status == ACK
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER)
    assert drv.status == ACK | DRIVER
    drv.set_features(WANTED)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK)
    assert drv.status == ACK | DRIVER | FEATURES_OK
    assert t.negotiated(VIRTIO_BALLOON_F_STATS_VQ)
    assert not t.negotiated(VIRTIO_BALLOON_F_MUST_TELL_HOST)
    for q in (INFLATE, DEFLATE, STATS):
        drv.setup_queue(q)
        drv.write(VIRTIO_MMIO_QUEUE_SEL, q)
        assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 1
    assert not t.live
    drv.driver_ok()
    assert drv.status == ALL_OK and t.live
    # features cannot change after FEATURES_OK
    drv.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
    drv.write(VIRTIO_MMIO_DRIVER_FEATURES, 0)
    assert t.negotiated(VIRTIO_BALLOON_F_STATS_VQ)
    assert t.metrics.bad_accesses == 1
    assert t.metrics.ring_errors == 0 and t.metrics.features_refused == 0


@pytest.mark.parametrize("features", [0, 1 << VIRTIO_BALLOON_F_STATS_VQ,   # no VERSION_1
                                      WANTED | 1 << VIRTIO_F_INDIRECT_DESC,  # not offered
                                      WANTED | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
                                      WANTED | 1 << 3, WANTED | 1 << 63])
def test_features_ok_refused(env, features):
    _, _, drv = env
    t = drv.t
    drv.write(VIRTIO_MMIO_STATUS, ACK)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER)
    drv.set_features(features)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK)
    assert drv.status == ACK | DRIVER     # FEATURES_OK does not read back
    assert t.metrics.features_refused == 1
    # the queues cannot be set up, DRIVER_OK is not taken
    drv.write(VIRTIO_MMIO_QUEUE_SEL, 0)
    drv.write(VIRTIO_MMIO_QUEUE_READY, 1)
    assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 0
    drv.write(VIRTIO_MMIO_STATUS, ALL_OK)
    assert not drv.status & (FEATURES_OK | DRIVER_OK)
    # the driver may still fix its choice and go on
    drv.set_features(WANTED)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK)
    assert drv.status == ACK | DRIVER | FEATURES_OK
    assert drv.t.metrics.features_refused == 2


def test_status_bits_in_order(env):
    _, _, drv = env
    t = drv.t
    drv.write(VIRTIO_MMIO_STATUS, DRIVER)                 # DRIVER before ACKNOWLEDGE
    assert drv.status == 0
    drv.write(VIRTIO_MMIO_STATUS, ACK)
    drv.write(VIRTIO_MMIO_STATUS, ACK | FEATURES_OK)      # FEATURES_OK before DRIVER
    assert drv.status == ACK
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER)
    drv.set_features(WANTED)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | DRIVER_OK)  # DRIVER_OK before FEATURES_OK
    assert drv.status == ACK | DRIVER
    assert t.metrics.bad_accesses == 3


def test_clearing_status_bits_is_refused(env):
    _, _, drv = env
    drv.start()
    for bad in (ACK | DRIVER | FEATURES_OK, ACK, DRIVER_OK | FEATURES_OK | DRIVER):
        drv.write(VIRTIO_MMIO_STATUS, bad)
        assert drv.status == ALL_OK
    assert drv.t.metrics.bad_accesses == 3
    drv.write(VIRTIO_MMIO_STATUS, ALL_OK | VIRTIO_CONFIG_S_FAILED)  # FAILED is always taken
    assert drv.status == ALL_OK | VIRTIO_CONFIG_S_FAILED


def test_reset_clears_everything(env):
    hv, dom, drv = env
    t, bal = drv.t, drv.t.device
    drv.start()
    bal.set_target(3)
    assert drv.isr == VIRTIO_MMIO_INT_CONFIG
    assert hv.scheduler.timers
    drv.write(VIRTIO_MMIO_STATUS, 0)
    assert drv.status == 0 and drv.isr == 0
    for q in (INFLATE, DEFLATE, STATS):
        drv.write(VIRTIO_MMIO_QUEUE_SEL, q)
        assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 0
        assert t.queues[q].desc == t.queues[q].avail == t.queues[q].used == 0
        assert t.queues[q].last_avail == t.queues[q].used_idx == 0
    assert t.metrics.resets == 2  # start() resets once first
    assert t.driver_features == 0
    assert not [x for x in hv.scheduler.timers if x[2] is bal]
    assert bal.num_pages == 3  # the target survives a reset
    # the whole handshake works again
    drv.start()
    assert drv.status == ALL_OK


def test_queue_registers_locked_while_ready(env):
    _, _, drv = env
    t = drv.t
    drv.negotiate()
    ring = drv.setup_queue(INFLATE, num=64)
    q = t.queues[INFLATE]
    bad = t.metrics.bad_accesses
    for offset, value in [(VIRTIO_MMIO_QUEUE_NUM, 8),
                          (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000), (VIRTIO_MMIO_QUEUE_DESC_HIGH, 1),
                          (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000),
                          (VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 1),
                          (VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000), (VIRTIO_MMIO_QUEUE_USED_HIGH, 1)]:
        drv.write(offset, value)
    assert (q.num, q.desc, q.avail, q.used) == (64, ring.desc, ring.avail, ring.used)
    assert t.metrics.bad_accesses == bad + 7
    # QueueReady 0 unlocks them
    drv.write(VIRTIO_MMIO_QUEUE_READY, 0)
    assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 0
    drv.write(VIRTIO_MMIO_QUEUE_NUM, 8)
    assert q.num == 8


def test_queue_registers_need_features_ok(env):
    _, _, drv = env
    t = drv.t
    drv.write(VIRTIO_MMIO_STATUS, ACK)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER)
    drv.write(VIRTIO_MMIO_QUEUE_SEL, 0)
    drv.write(VIRTIO_MMIO_QUEUE_NUM, 8)
    drv.write(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000)
    assert t.queues[0].num == QUEUE_SIZE and t.queues[0].desc == 0
    assert t.metrics.bad_accesses == 2
    drv.set_features(WANTED)
    drv.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK)
    drv.write(VIRTIO_MMIO_QUEUE_SEL, 7)  # no such queue
    drv.write(VIRTIO_MMIO_QUEUE_NUM, 8)
    drv.write(VIRTIO_MMIO_QUEUE_READY, 1)
    assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 0
    assert t.metrics.bad_accesses == 4


@pytest.mark.parametrize("num", [0, 3, 100, 512, 1 << 31])
def test_bad_queue_size_needs_reset(env, num):
    _, _, drv = env
    t = drv.t
    drv.negotiate()
    gen = drv.read(VIRTIO_MMIO_CONFIG_GENERATION)
    drv.setup_queue(INFLATE, num=num)
    assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 0
    assert drv.status & NEEDS_RESET
    assert drv.read(VIRTIO_MMIO_CONFIG_GENERATION) == gen + 1
    assert drv.isr == 0  # no interrupt before DRIVER_OK
    assert t.metrics.ring_errors == 1
    drv.write(VIRTIO_MMIO_STATUS, 0)
    assert drv.status == 0
    drv.start()
    assert drv.status == ALL_OK


@pytest.mark.parametrize("num", [1, 2, 8, 256])
def test_power_of_two_queue_sizes_work(env, num):
    hv, dom, drv = env
    drv.start(num=num)
    ft = hv.machine.frames
    for _ in range(num + 3):  # wraps the rings
        mfn = drv.frame()
        drv.request(INFLATE, [mfn])
        assert ft.owner[mfn] == FREE
    idx, elems = drv.used(drv.rings[INFLATE])
    assert idx == num + 3 and len(elems) == num
    assert drv.t.metrics.ring_errors == 0 and drv.status == ALL_OK


# --- 3. notify rules -------------------------------------------------------------------

def test_notifies_that_are_discarded(env):
    hv, dom, drv = env
    t = drv.t
    ft = hv.machine.frames
    drv.negotiate()
    ring = drv.setup_queue(INFLATE)
    drv.setup_queue(DEFLATE, ready=False)
    drv.driver_ok()
    victim = drv.frame()
    data = _U32.pack(victim)
    drv.add(ring, [(drv.buffer(data), 4, False)])
    drv.notify(DEFLATE)   # not ready
    drv.notify(5)         # no such queue
    drv.notify(0xFFFF)
    assert t.metrics.notifies_discarded == 3
    assert t.queues[INFLATE].last_avail == 0 and ft.owner[victim] == dom.domid
    drv.write(VIRTIO_MMIO_STATUS, 0)
    drv.notify(INFLATE)   # after a reset
    assert t.metrics.notifies_discarded == 4
    assert t.metrics.notifies == 0
    assert ft.owner[victim] == dom.domid
    assert drv.used(ring)[0] == 0
    assert audit(hv, p2m=False) == []


def test_stats_notify_before_driver_ok_is_held(env):
    hv, dom, drv = env
    t, bal = drv.t, drv.t.device
    drv.negotiate()
    for q in (INFLATE, DEFLATE, STATS):
        drv.setup_queue(q)
    entries = stats_bytes([(4, 1000), (5, 4096)])
    drv.add(drv.rings[STATS], [(drv.buffer(entries), len(entries), False)])
    drv.notify(STATS)
    assert t.metrics.notifies_held == 1
    assert t.metrics.notifies == 0
    assert bal.stats == {} and bal.stats_held is None
    assert t.queues[STATS].last_avail == 0
    drv.driver_ok()
    assert t.queues[STATS].last_avail == 1
    assert bal.stats == {"free-memory": 1000, "total-memory": 4096}
    assert bal.stats_held == 0
    assert t.metrics.notifies == 1


def test_inflate_notify_before_driver_ok_is_served_at_driver_ok(env):
    hv, dom, drv = env
    t = drv.t
    ft = hv.machine.frames
    drv.start(driver_ok=False)
    mfn = drv.frame()
    drv.request(INFLATE, [mfn])
    drv.request(INFLATE, [])  # two notifies, one held kick
    assert t.metrics.notifies_held == 2
    assert ft.owner[mfn] == dom.domid and drv.isr == 0
    drv.driver_ok()
    assert ft.owner[mfn] == FREE
    assert drv.used(drv.rings[INFLATE])[0] == 2
    assert drv.isr == VIRTIO_MMIO_INT_VRING
    assert audit(hv, p2m=False) == []


def test_held_notify_is_dropped_if_the_device_needs_reset(env):
    """A kick held before DRIVER_OK is not served if the device has meanwhile
    gone into DEVICE_NEEDS_RESET: it processes nothing until reset."""
    hv, dom, drv = env
    t = drv.t
    ft = hv.machine.frames
    drv.negotiate()
    drv.setup_queue(INFLATE)
    mfn = drv.frame()
    drv.request(INFLATE, [mfn])
    assert t.metrics.notifies_held == 1
    drv.setup_queue(DEFLATE, num=3)  # a bad size: DEVICE_NEEDS_RESET
    assert drv.status & NEEDS_RESET
    drv.write(VIRTIO_MMIO_STATUS, ALL_OK)
    assert drv.status & NEEDS_RESET
    assert ft.owner[mfn] == dom.domid
    assert t.queues[INFLATE].last_avail == 0
    assert t.metrics.notifies == 0


# --- 4. inflate and deflate ------------------------------------------------------------

def test_inflate_frees_unused_frames(env):
    hv, dom, drv = env
    t, bal = drv.t, drv.t.device
    ft = hv.machine.frames
    drv.start()
    flushes = count_flushes(hv, dom)
    victims = [drv.frame() for _ in range(3)]
    assert all(ft.ref_count[m] == 1 for m in victims)
    for k, m in enumerate(victims):  # as if they were guest pages once (pfns past its p2m)
        hv.machine.set_m2p(m, 0x10000 + k)
    guard = Guard(hv, dom)
    free0, tot0 = ft.nr_free, dom.tot_pages
    head = drv.request(INFLATE, victims)
    assert [int(ft.owner[m]) for m in victims] == [FREE] * 3
    assert ft.nr_free == free0 + 3 and dom.tot_pages == tot0 - 3
    assert all(hv.machine.m2p[m] == INVALID_MFN for m in victims)
    assert drv.used(drv.rings[INFLATE]) == (1, [(head, 0)])
    assert drv.isr & VIRTIO_MMIO_INT_VRING
    assert pending_event(dom, t.port)
    assert t.metrics.interrupts == 1 and t.metrics.notifies == 1
    assert bal.metrics.freed == 3 and bal.metrics.refused == 0
    assert flushes == [dom.domid]
    guard.check()


def test_inflate_chain_of_several_buffers(env):
    hv, dom, drv = env
    ft = hv.machine.frames
    drv.start()
    a, b, c = (drv.frame() for _ in range(3))
    buf1 = drv.buffer(_U32.pack(a) + _U32.pack(b))
    buf2 = drv.buffer(_U32.pack(c))
    head = drv.add(drv.rings[INFLATE], [(buf1, 8, False), (buf2, 4, False)])
    drv.notify(INFLATE)
    assert all(ft.owner[m] == FREE for m in (a, b, c))
    assert drv.used(drv.rings[INFLATE]) == (1, [(head, 0)])
    assert audit(hv, p2m=False) == []


def test_inflate_without_interrupt_when_suppressed(env):
    hv, dom, drv = env
    drv.start()
    ring = drv.rings[INFLATE]
    drv.mem.write(ring.avail, _U16.pack(VRING_AVAIL_F_NO_INTERRUPT))
    mfn = drv.frame()
    drv.request(INFLATE, [mfn])
    assert hv.machine.frames.owner[mfn] == FREE
    assert drv.used(ring)[0] == 1
    assert drv.isr == 0 and drv.t.metrics.interrupts == 0


# test case -> the frame_kinds entry it names (or the number itself)
REFUSED = {"mapped": "mapped", "l4": "l4", "pagetable-l1": "l1", "shared-info": "xenheap",
           "hypervisor-m2p": "m2p", "zero": "zero", "free": "free", "beyond-ram": "beyond",
           "mmio": "mmio", "all-ones": 0xFFFFFFFF}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_inflate_refuses_frames_in_use_or_not_the_domains(env, kind):
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    drv.start()
    which = REFUSED[kind]
    mfn = frame_kinds(hv, dom, drv)[which] if isinstance(which, str) else which
    owner = int(ft.owner[mfn]) if mfn < ft.nr_frames else None
    good = drv.frame()
    guard = Guard(hv, dom)
    free0 = ft.nr_free
    head = drv.request(INFLATE, [mfn, good])
    assert bal.metrics.refused == 1 and bal.metrics.freed == 1
    assert ft.nr_free == free0 + 1 and ft.owner[good] == FREE
    if owner is not None:
        assert ft.owner[mfn] == owner
    assert drv.used(drv.rings[INFLATE]) == (1, [(head, 0)])
    assert drv.status == ALL_OK  # a refused frame is no ring error
    guard.check()


def test_inflate_refuses_another_domains_frame(env):
    hv, dom, drv = env
    other = other_domain(hv)
    ft = hv.machine.frames
    drv.start()
    theirs = ft.alloc(other.domid)  # unused, but not ours
    guard = Guard(hv, dom)
    drv.request(INFLATE, [theirs])
    assert ft.owner[theirs] == other.domid and ft.ref_count[theirs] == 1
    assert drv.t.device.metrics.refused == 1
    guard.check()


MALFORMED = {"write-only": (4, True), "len-6": (6, False), "len-1": (1, False)}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
def test_malformed_inflate_buffer_is_acked_not_acted_on(env, shape):
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    drv.start()
    mfn = drv.frame()
    data = _U32.pack(mfn) + b"\0\0\0\0"
    addr = drv.buffer(data)
    guard = Guard(hv, dom)
    length, writable = MALFORMED[shape]
    head = drv.add(drv.rings[INFLATE], [(addr, length, writable)])
    drv.notify(INFLATE)
    assert ft.owner[mfn] == dom.domid
    assert bal.metrics.malformed == 1 and bal.metrics.freed == 0
    assert drv.used(drv.rings[INFLATE]) == (1, [(head, 0)])
    assert drv.status == ALL_OK
    guard.check()


def test_inflate_request_size_is_bounded(env):
    """A request carries at most VIRTIO_BALLOON_ARRAY_PFNS_MAX page numbers,
    in one buffer or several: more is acknowledged, not acted on, so no
    notify can keep the host busy walking a huge buffer."""
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    drv.start()
    assert REQUEST_MAX_BYTES == 4 * VIRTIO_BALLOON_ARRAY_PFNS_MAX == 1024
    frames = [drv.frame() for _ in range(VIRTIO_BALLOON_ARRAY_PFNS_MAX + 1)]
    ring = drv.rings[INFLATE]
    # 257 in one buffer, then 128 + 129 in two: neither is acted on
    big = drv.buffer(b"".join(_U32.pack(m) for m in frames))
    h1 = drv.add(ring, [(big, 4 * len(frames), False)])
    h2 = drv.add(ring, [(big, 4 * 128, False), (big + 4 * 128, 4 * 129, False)])
    drv.notify(INFLATE)
    assert all(ft.owner[m] == dom.domid for m in frames)
    assert bal.metrics.malformed == 2 and bal.metrics.freed == 0
    assert drv.used(ring) == (2, [(h1, 0), (h2, 0)])
    # 256 is fine; a device-writable buffer does not count against the limit
    h3 = drv.add(ring, [(big, 4 * 256, False), (drv.buffer(b""), 4096, True)])
    drv.notify(INFLATE)
    assert all(ft.owner[m] == FREE for m in frames[:256]) and ft.owner[frames[256]] == dom.domid
    assert bal.metrics.freed == 256 and bal.metrics.malformed == 3
    assert drv.used(ring)[1][2] == (h3, 0)
    assert drv.status == ALL_OK
    assert audit(hv, p2m=False) == []


def test_huge_buffers_are_cheap(env, monkeypatch):
    """A chain of many descriptors, each over megabytes of the domain's own
    memory, costs the host next to nothing: the buffers are never read, only
    the rings are. (Counted in bytes, not timed: a loaded machine makes any
    time limit fail at random.)"""
    hv, dom, drv = env
    ft = hv.machine.frames
    own = np.flatnonzero((ft.owner == dom.domid) & ~ft.xenheap)
    # a run of 64 machine-contiguous frames of the domain (allocation is by 2 MiB chunk)
    first = next(int(m) for m in own if (ft.owner[m:m + 64] == dom.domid).all()
                 and not ft.xenheap[m:m + 64].any())
    drv.start(num=256)
    guard = Guard(hv, dom)
    memory, read = hv.machine.memory, [0]
    real_read = memory.read

    def counted(maddr: int, size: int) -> bytes:
        read[0] += size
        return real_read(maddr, size)

    for q in (INFLATE, DEFLATE, STATS):
        drv.add(drv.rings[q], [(first << PAGE_SHIFT, 64 * PAGE_SIZE, False)] * 256)
        with monkeypatch.context() as m:
            m.setattr(memory, "read", counted)
            drv.notify(q)
    # each queue's descriptor table and avail ring at most, never one 256 KiB buffer
    rings = 3 * (256 * VRING_DESC.size + VRING_RING_OFF + 256 * 2 + 2)
    assert 0 < read[0] <= rings < 64 * PAGE_SIZE
    bal = drv.t.device
    assert bal.metrics.malformed == 3 and bal.metrics.refused == 0
    assert bal.stats == {} and bal.stats_held == 0
    assert drv.status == ALL_OK
    guard.check()


def test_deflate_counts_the_domains_frames(env):
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    drv.start()
    mine = [drv.frame(), mapped_frame(hv, dom)]
    guard = Guard(hv, dom)
    free0 = ft.nr_free
    head = drv.request(DEFLATE, [*mine, 1, free_frame(hv), ft.nr_frames])
    assert bal.metrics.deflated == 2 and bal.metrics.refused == 3
    assert bal.metrics.freed == 0 and ft.nr_free == free0
    assert all(ft.owner[m] == dom.domid for m in mine)
    assert drv.used(drv.rings[DEFLATE]) == (1, [(head, 0)])
    assert drv.isr & VIRTIO_MMIO_INT_VRING
    guard.check()


def test_inflate_twice_the_same_frame_frees_it_once(env):
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    drv.start()
    mfn = drv.frame()
    free0 = ft.nr_free
    drv.request(INFLATE, [mfn, mfn])
    drv.request(INFLATE, [mfn])
    assert ft.nr_free == free0 + 1
    assert bal.metrics.freed == 1 and bal.metrics.refused == 2
    assert audit(hv, p2m=False) == []


def test_inflate_of_its_own_ring_page_needs_reset_and_still_flushes(env):
    """The driver balloons the page holding the used ring: the frame goes
    (nothing maps it), then the device cannot return the chain: NEEDS_RESET.
    The TLB flush the freeing needs happens all the same."""
    hv, dom, drv = env
    ft = hv.machine.frames
    drv.start()
    flushes = count_flushes(hv, dom)
    ring = drv.rings[INFLATE]
    used_mfn = ring.used >> PAGE_SHIFT
    guard = Guard(hv, dom)
    drv.request(INFLATE, [used_mfn])
    assert ft.owner[used_mfn] == FREE
    assert drv.status & NEEDS_RESET
    assert drv.isr & VIRTIO_MMIO_INT_CONFIG
    assert flushes == [dom.domid]
    guard.check()


# --- 5. inhibit --------------------------------------------------------------------------

def test_inhibit_under_drop_acknowledges_and_acts_on_nothing(env):
    """QEMU's policy: the frames stay the domain's with their M2P entries,
    before and after the inhibit; a deflate is dropped too."""
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    assert bal.postcopy == "drop"
    drv.start()
    victims = [drv.frame() for _ in range(3)]
    m2p = hv.machine.m2p[victims].copy()
    bal.inhibit()
    head = drv.request(INFLATE, victims[:2])
    assert drv.used(drv.rings[INFLATE]) == (1, [(head, 0)])
    drv.request(DEFLATE, victims[2:])
    assert bal.uninhibit() == 0
    assert all(ft.owner[m] == dom.domid for m in victims)
    assert (hv.machine.m2p[victims] == m2p).all() and bal.queue == []
    assert bal.metrics.dropped == 2 and bal.metrics.dropped_deflates == 1
    assert bal.metrics.freed == bal.metrics.deflated == 0
    assert audit(hv, p2m=False) == []


def test_inhibit_under_reconcile_queues_frames_until_the_last_uninhibit(env):
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    bal.postcopy = "reconcile"
    drv.start()
    victims = [drv.frame() for _ in range(4)]
    for k, m in enumerate(victims):
        hv.machine.set_m2p(m, 0x10000 + k)
    guard = Guard(hv, dom)
    free0 = ft.nr_free
    bal.inhibit()
    head = drv.request(INFLATE, victims[:2])
    assert drv.used(drv.rings[INFLATE]) == (1, [(head, 0)])
    assert all(ft.owner[m] == dom.domid for m in victims)
    # queued: still owned, but no longer a pfn of the guest
    assert [hv.machine.m2p[m] == INVALID_MFN for m in victims] == [True, True, False, False]
    assert ft.nr_free == free0
    assert bal.metrics.queued == 2 and bal.metrics.freed == 0
    assert audit(hv, p2m=False) == []
    with pytest.raises(BalloonError, match="inhibited"):
        bal.set_target(10)
    assert bal.num_pages == 0
    bal.inhibit()
    drv.request(INFLATE, victims[2:])
    assert bal.uninhibit() == 0
    assert all(ft.owner[m] == dom.domid for m in victims) and ft.nr_free == free0
    assert bal.info()["queued"] == 4
    assert bal.uninhibit() == 4
    assert all(ft.owner[m] == FREE for m in victims)
    assert ft.nr_free == free0 + 4
    assert bal.metrics.freed == 4 == bal.metrics.reconciled and bal.queue == []
    guard.check()
    with pytest.raises(BalloonError, match="not inhibited"):
        bal.uninhibit()
    assert ft.nr_free == free0 + 4
    bal.set_target(10)
    assert bal.num_pages == 10


def test_inhibited_frame_listed_twice_is_freed_once(env):
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    bal.postcopy = "reconcile"
    drv.start()
    mfn = drv.frame()
    free0 = ft.nr_free
    bal.inhibit()
    drv.request(INFLATE, [mfn, mfn])
    drv.request(INFLATE, [mfn])
    bal.uninhibit()
    assert ft.owner[mfn] == FREE and ft.nr_free == free0 + 1
    assert bal.metrics.freed == 1
    assert int((ft.free_mfns() == mfn).sum()) == 1
    assert audit(hv, p2m=False) == []


def test_queued_frame_taken_back_is_not_freed(env):
    """A frame the guest took back while the balloon was inhibited (its M2P
    entry set again, as populate_physmap does) stays the domain's."""
    hv, dom, drv = env
    ft = hv.machine.frames
    bal = drv.t.device
    bal.postcopy = "reconcile"
    drv.start()
    kept, gone = drv.frame(), drv.frame()
    bal.inhibit()
    drv.request(INFLATE, [kept, gone])
    assert hv.machine.m2p[kept] == INVALID_MFN
    hv.machine.set_m2p(kept, 5)
    assert bal.uninhibit() == 1
    assert ft.owner[kept] == dom.domid and ft.owner[gone] == FREE
    assert bal.metrics.kept == 1 and bal.metrics.refused == 0
    assert audit(hv, p2m=False) == []


# --- 6. statistics -----------------------------------------------------------------------

# a statistics buffer, what the device reads from it, and whether it is malformed
STATS_BUFFERS = {
    "parsed": (stats_bytes([(0, 11), (1, 22), (4, 1 << 40), (5, 1 << 41), (99, 7), (6, 33),
                            (9, 44)]),  # tag 99 is unknown: ignored
               {"swap-in": 11, "swap-out": 22, "free-memory": 1 << 40, "total-memory": 1 << 41,
                "available-memory": 33, "hugetlb-failures": 44}, 0),
    "odd-length": (stats_bytes([(4, 5)]) + b"\x05\x00\x01", {"free-memory": 5}, 1),
}


@pytest.mark.parametrize("case", sorted(STATS_BUFFERS))
def test_stats_buffer_is_parsed(env, case):
    hv, dom, drv = env
    bal = drv.t.device
    data, stats, malformed = STATS_BUFFERS[case]
    drv.start()
    drv.add(drv.rings[STATS], [(drv.buffer(data), len(data), False)])
    drv.notify(STATS)
    assert bal.stats == stats
    assert bal.stats_updated_ns == hv.scheduler.now()
    assert bal.stats_held == 0
    assert drv.used(drv.rings[STATS])[0] == 0  # held, not returned
    assert bal.metrics.malformed == malformed


def test_second_stats_buffer_returns_the_older(env):
    hv, dom, drv = env
    bal, t = drv.t.device, drv.t
    drv.start()
    ring = drv.rings[STATS]
    first = drv.add(ring, [(drv.buffer(stats_bytes([(4, 1)])), 10, False)])
    drv.notify(STATS)
    second = drv.add(ring, [(drv.buffer(stats_bytes([(4, 2)])), 10, False)])
    drv.notify(STATS)
    assert bal.metrics.stats_errors == 1
    assert drv.used(ring) == (1, [(first, 0)])
    assert bal.stats_held == second and bal.stats == {"free-memory": 2}
    assert drv.isr & VIRTIO_MMIO_INT_VRING and t.metrics.interrupts == 1


def test_host_poll_returns_the_held_buffer(env):
    hv, dom, drv = env
    bal, t = drv.t.device, drv.t
    sched = hv.scheduler
    assert not sched.timers  # armed at DRIVER_OK only
    drv.start()
    mine = [x for x in sched.timers if x[2] is bal]
    assert len(mine) == 1 and mine[0][0] == sched.now() + INTERVAL_NS
    ring = drv.rings[STATS]
    head = drv.add(ring, [(drv.buffer(stats_bytes([(4, 1)])), 10, False)])
    drv.notify(STATS)
    assert drv.used(ring)[0] == 0
    sched._fire_timer()  # what hv.run does when virtual time reaches it
    assert drv.used(ring) == (1, [(head, 0)])
    assert bal.stats_held is None
    assert drv.isr & VIRTIO_MMIO_INT_VRING and pending_event(dom, t.port)
    again = [x for x in sched.timers if x[2] is bal]
    assert len(again) == 1 and again[0][0] == 2 * INTERVAL_NS  # re-armed
    sched._fire_timer()  # nothing held: nothing returned
    assert drv.used(ring)[0] == 1
    assert [x[0] for x in sched.timers if x[2] is bal] == [3 * INTERVAL_NS]


def test_reset_forgets_the_held_stats_buffer(env):
    hv, dom, drv = env
    bal = drv.t.device
    drv.start()
    ring = drv.rings[STATS]
    drv.add(ring, [(drv.buffer(stats_bytes([(4, 1)])), 10, False)])
    drv.notify(STATS)
    assert bal.stats_held is not None
    drv.write(VIRTIO_MMIO_STATUS, 0)
    assert bal.stats_held is None
    assert not [x for x in hv.scheduler.timers if x[2] is bal]
    bal._poll()  # a poll now touches no ring
    assert drv.used(ring)[0] == 0


def test_destroying_the_domain_ends_the_statistics_poll(env):
    """The poll timer belongs to the balloon, not to its transport: tearing
    the domain down must cancel it (it was left armed, and re-armed itself
    for ever, since a destroyed domain never shut down)."""
    hv, dom, drv = env
    bal = drv.t.device
    drv.start()
    assert [x for x in hv.scheduler.timers if x[2] is bal]
    hv.destroy_domain(dom)
    assert not [x for x in hv.scheduler.timers if x[2] is bal]


def test_no_stats_interval_no_timer(booted):
    hv, dom = boot_balloon(booted, interval="0ms")
    drv = Driver(hv, dom)
    drv.start()
    assert not hv.scheduler.timers


# --- 7. ring validation --------------------------------------------------------------------

def _last_word_of_the_domain(hv, dom) -> int:
    """The last 4 bytes of a frame of the domain whose next frame is not."""
    ft = hv.machine.frames
    mfn = next(m for m in np.flatnonzero(ft.owner == dom.domid).tolist()
               if m + 1 < ft.nr_frames and ft.owner[m + 1] != dom.domid)
    return (mfn << PAGE_SHIFT) + PAGE_SIZE - 4


# one device-readable buffer where the device may not read: (address, length)
BAD_BUFFERS: dict[str, Callable] = {
    "outside-ram": lambda hv, dom: (hv.machine.memory.size - 2, 4),
    "hypervisor-frame": lambda hv, dom: (1 << PAGE_SHIFT, 4),
    "free-frame": lambda hv, dom: (free_frame(hv) << PAGE_SHIFT, 4),
    "xenheap-frame": lambda hv, dom: (xenheap_frame(hv) << PAGE_SHIFT, 4),
    "crosses-out-of-the-domain": lambda hv, dom: (_last_word_of_the_domain(hv, dom), 8),
}


def _bad_buffer(case: str) -> Callable:
    def add(hv, dom, drv, ring):
        addr, length = BAD_BUFFERS[case](hv, dom)
        drv.add(ring, [(addr, length, False)])
    return add


def _writable_into_pagetable(hv, dom, drv, ring):
    l4 = dom.vcpus[0].guest_table
    drv.add(ring, [(drv.buffer(b"\0" * 4), 4, False), (l4 << PAGE_SHIFT, 8, True)])


def _loop(hv, dom, drv, ring):
    buf = drv.buffer(b"\0" * 4)
    drv.write_desc(ring, 0, buf, 4, VRING_DESC_F_NEXT, 1)
    drv.write_desc(ring, 1, buf, 4, VRING_DESC_F_NEXT, 0)
    drv.publish(ring, 0)


def _self_loop(hv, dom, drv, ring):
    drv.write_desc(ring, 0, drv.buffer(b"\0" * 4), 4, VRING_DESC_F_NEXT, 0)
    drv.publish(ring, 0)


def _next_out_of_range(hv, dom, drv, ring):
    drv.write_desc(ring, 0, drv.buffer(b"\0" * 4), 4, VRING_DESC_F_NEXT, ring.num)
    drv.publish(ring, 0)


def _head_out_of_range(hv, dom, drv, ring):
    drv.write_desc(ring, 0, drv.buffer(b"\0" * 4), 4, 0, 0)
    drv.publish(ring, ring.num)


def _indirect(hv, dom, drv, ring):
    table = drv.buffer(VRING_DESC.pack(drv.buffer(b"\0" * 4), 4, 0, 0))
    drv.write_desc(ring, 0, table, VRING_DESC.size, VRING_DESC_F_INDIRECT, 0)
    drv.publish(ring, 0)


def _readable_after_writable(hv, dom, drv, ring):
    drv.add(ring, [(drv.buffer(b"\0" * 4), 4, True), (drv.buffer(b"\0" * 4), 4, False)])


def _avail_idx_too_far(hv, dom, drv, ring):
    drv.write_desc(ring, 0, drv.buffer(b"\0" * 4), 4, 0, 0)
    drv.set_avail_idx(ring, ring.num + 1)


def _avail_idx_backwards(hv, dom, drv, ring):
    drv.write_desc(ring, 0, drv.buffer(b"\0" * 4), 4, 0, 0)
    drv.set_avail_idx(ring, 0xFFFF)


def _huge_chain(hv, dom, drv, ring):
    buf = drv.buffer(b"\0" * 4)
    drv.write_desc(ring, 0, buf, 4, VRING_DESC_F_NEXT, 1)
    drv.write_desc(ring, 1, buf, 0xFFFFFFFF, 0, 0)
    drv.publish(ring, 0)


def _desc_page_given_away(hv, dom, drv, ring):
    drv.add(ring, [(drv.buffer(b"\0" * 4), 4, False)])
    assert hv.reservation.remove_page(dom, ring.desc >> PAGE_SHIFT) == 0


def _used_page_becomes_foreign(hv, dom, drv, ring):
    drv.add(ring, [(drv.buffer(b"\0" * 4), 4, False)])
    assert hv.reservation.remove_page(dom, ring.used >> PAGE_SHIFT) == 0


BROKEN_CHAINS: dict[str, Callable] = {
    **{case: _bad_buffer(case) for case in BAD_BUFFERS},
    "writable-into-pagetable": _writable_into_pagetable, "loop": _loop,
    "self-loop": _self_loop, "next-out-of-range": _next_out_of_range,
    "head-out-of-range": _head_out_of_range, "indirect": _indirect,
    "readable-after-writable": _readable_after_writable,
    "avail-idx-too-far": _avail_idx_too_far, "avail-idx-backwards": _avail_idx_backwards,
    "chain-of-4GiB": _huge_chain, "desc-page-given-away": _desc_page_given_away,
    "used-page-given-away": _used_page_becomes_foreign,
}


def assert_recovers(hv, dom, drv) -> None:
    """After a reset the device works again."""
    drv.write(VIRTIO_MMIO_STATUS, 0)
    assert drv.status == 0 and drv.isr == 0
    drv.start(num=8)
    mfn = drv.frame()
    drv.request(INFLATE, [mfn])
    assert hv.machine.frames.owner[mfn] == FREE
    assert drv.status == ALL_OK
    assert audit(hv, p2m=False) == []


@pytest.mark.parametrize("queue", [INFLATE, STATS])
@pytest.mark.parametrize("case", sorted(BROKEN_CHAINS))
def test_broken_ring_needs_reset(env, case, queue):
    hv, dom, drv = env
    t = drv.t
    drv.start(num=8)
    ring = drv.rings[queue]
    BROKEN_CHAINS[case](hv, dom, drv, ring)
    guard = Guard(hv, dom)
    gen = drv.read(VIRTIO_MMIO_CONFIG_GENERATION)
    drv.notify(queue)  # must not raise
    assert drv.status == ALL_OK | NEEDS_RESET, t.__dict__.get("last_error")
    assert t.metrics.ring_errors == 1
    assert drv.isr & VIRTIO_MMIO_INT_CONFIG
    assert pending_event(dom, t.port)
    assert drv.read(VIRTIO_MMIO_CONFIG_GENERATION) == gen + 1
    assert drv.used(ring)[0] == 0 or case == "used-page-given-away"
    # nothing more on that queue (or any) until a reset
    last_avail = t.queues[queue].last_avail
    drv.notify(queue)
    drv.notify(INFLATE)
    assert t.metrics.notifies_discarded == 2
    assert t.metrics.ring_errors == 1
    assert t.queues[queue].last_avail == last_avail
    t.device._poll()  # the host poll leaves it alone too
    guard.check()
    assert_recovers(hv, dom, drv)


# a ring where the device may not have it: (which ring, its address)
BROKEN_LAYOUTS: dict[str, Callable] = {
    "used-in-l4": lambda hv, dom, drv: ("used", dom.vcpus[0].guest_table << PAGE_SHIFT),
    "used-in-l1": lambda hv, dom, drv: ("used", l1_frame(hv, dom) << PAGE_SHIFT),
    "desc-in-hypervisor-frame": lambda hv, dom, drv: ("desc", 1 << PAGE_SHIFT),
    "avail-in-free-frame": lambda hv, dom, drv: ("avail", free_frame(hv) << PAGE_SHIFT),
    "desc-misaligned": lambda hv, dom, drv: ("desc", drv.page() + 8),
    "used-misaligned": lambda hv, dom, drv: ("used", drv.page() + 2),
    "avail-misaligned": lambda hv, dom, drv: ("avail", drv.page() + 1),
    "desc-beyond-ram": lambda hv, dom, drv: ("desc", hv.machine.memory.size),
    "used-at-4GiB": lambda hv, dom, drv: ("used", 1 << 32),
    "desc-at-mmio-window": lambda hv, dom, drv: ("desc", drv.t.base),
}


@pytest.mark.parametrize("case", sorted(BROKEN_LAYOUTS))
def test_broken_layout_refused_at_queue_ready(env, case):
    hv, dom, drv = env
    t = drv.t
    drv.negotiate()
    guard = Guard(hv, dom)
    ring, addr = BROKEN_LAYOUTS[case](hv, dom, drv)
    drv.setup_queue(INFLATE, num=8, **{ring: addr})
    assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 0
    assert drv.status & NEEDS_RESET
    assert t.metrics.ring_errors == 1
    drv.notify(INFLATE)
    assert t.metrics.notifies_discarded == 1
    guard.check()
    assert_recovers(hv, dom, drv)


def test_pagetable_may_hold_a_readable_ring_but_not_the_used_ring(env):
    """The device only reads the descriptor table and the available ring:
    they may lie in a (read-only mapped) pagetable frame of the domain; the
    used ring, which the device writes, may not."""
    hv, dom, drv = env
    drv.negotiate()
    drv.setup_queue(INFLATE, num=8, avail=l1_frame(hv, dom) << PAGE_SHIFT)
    assert drv.read(VIRTIO_MMIO_QUEUE_READY) == 1
    assert not drv.status & NEEDS_RESET


# --- 8. what an image carries, and the counters ----------------------------------------

@pytest.mark.parametrize("interval,oom", [("5ms", False), ("0ms", True)])
def test_persist_round_trip_of_a_busy_balloon(booted, interval, oom):
    """save_entry makes the balloon's EMULATOR_CONTEXT entry; restore_state makes
    from it a balloon that saves the same entry. The device is saved mid-inflate
    (target 300 pages, 2 in the balloon), inhibited under reconcile, with
    requests queued and a statistics buffer held: that is the host's and the
    rings' state, which no image carries, so the restored balloon starts
    without it; its post-copy policy goes across."""
    hv, dom = boot_balloon(booted, interval=interval, deflate_on_oom=oom)
    drv = Driver(hv, dom)
    t, bal = drv.t, drv.t.device
    bal.postcopy = "reconcile"
    drv.start()
    bal.set_target(300)
    victims = [drv.frame() for _ in range(4)]
    drv.request(INFLATE, victims[:2])
    drv.write(VIRTIO_MMIO_CONFIG + 4, 2)                # the driver's actual
    bal.inhibit()
    drv.request(INFLATE, victims[2:])
    entries = stats_bytes([(4, 1000)])
    drv.add(drv.rings[STATS], [(drv.buffer(entries), len(entries), False)])
    drv.notify(STATS)
    assert bal.inhibits == 1 and len(bal.queue) == 2 and bal.stats_held is not None

    state = save_entry(t)
    assert json.loads(json.dumps(state)) == state
    assert state == {"bus": "virtio-mmio", "base": t.base, "port": t.port, "kind": "balloon",
                     "num_pages": 300, "actual": 2,
                     "stats_interval_ns": INTERVAL_NS if interval == "5ms" else 0,
                     "deflate_on_oom": oom, "postcopy": "reconcile"}
    assert {k: type(v) for k, v in state.items()} == {**PLACE_KEYS, **STATE_KEYS}
    assert check_entry(state) is None

    again = restore_state(state, bal.host)
    restored = VirtioMmio(again, t.mem, state["base"], state["port"], lambda: None)
    assert save_entry(restored) == state
    assert again.features() == bal.features()
    assert again.config_bytes() == bal.config_bytes()
    assert (again.inhibits, again.queue, again.stats_held, again.stats) == (0, [], None, {})
    assert again.postcopy == "reconcile"
    del state["postcopy"]  # an image from before the key: QEMU's policy
    assert restore_state(state, bal.host).postcopy == "drop"
    assert again.metrics == BalloonMetrics()


def test_counters_are_declared():
    """Every counter is a declared field: a misspelt one is an error, not a
    new counter; the host's report shows the ones that moved."""
    m = BalloonMetrics()
    with pytest.raises(AttributeError):
        m.fred = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        VirtioMmioMetrics().ring_error = 1  # type: ignore[attr-defined]
    m.freed += 2
    m.refused += 1
    assert m.nonzero() == {"freed": 2, "refused": 1}


class FakeTimers:
    """The host's timers, by hand: a list and a fixed now."""

    def __init__(self) -> None:
        self.timers: list[tuple[int, object, Callable[[], None]]] = []

    def now(self) -> int:
        return 1000

    def add_timer(self, deadline_ns: int, owner: object, fn: Callable[[], None]) -> None:
        self.timers.append((deadline_ns, owner, fn))

    def cancel_timers(self, owner: object) -> None:
        self.timers = [x for x in self.timers if x[1] is not owner]


def test_the_balloon_runs_on_what_it_is_given():
    """No hypervisor and no domain: a machine memory, a frame table, and
    functions. The device and its transport use only what their creator
    gives them, so this is enough to drive them through a whole handshake,
    an inflate, a deflate and a statistics poll."""
    domid = 7
    mem = MachineMemory(128)
    ft = FrameTable(mem, seed=1)
    m2p = np.full(ft.nr_frames, INVALID_MFN, dtype=np.uint64)
    removed: list[int] = []
    flushes: list[int] = []
    events: list[int] = []
    timers = FakeTimers()
    host = BalloonHost(domid, ft, m2p, lambda mfn: removed.append(mfn) or 0,
                       lambda: flushes.append(domid), timers, lambda: True)
    bal = Balloon(host, stats_interval_ns=INTERVAL_NS)
    t = VirtioMmio(bal, DomainMemory(mem, ft, domid), MMIO_BASE, 3, lambda: events.append(3))
    bus = MmioBus()
    bus.add(MMIO_BASE, t)
    hv = SimpleNamespace(bus=bus, machine=SimpleNamespace(frames=ft, memory=mem))
    drv = Driver(hv, SimpleNamespace(domid=domid, devices=[t]))
    drv.start()
    assert [(x[0], x[1]) for x in timers.timers] == [(1000 + INTERVAL_NS, bal)]

    victim, kept = drv.frame(), drv.frame()
    drv.request(INFLATE, [victim])
    drv.request(DEFLATE, [kept, 0])
    assert removed == [victim] and flushes == [domid]
    assert (bal.metrics.freed, bal.metrics.deflated, bal.metrics.refused) == (1, 1, 1)
    entries = stats_bytes([(4, 1000)])
    head = drv.add(drv.rings[STATS], [(drv.buffer(entries), len(entries), False)])
    drv.notify(STATS)
    assert bal.stats == {"free-memory": 1000} and bal.stats_updated_ns == 1000
    timers.timers.pop()[2]()  # the poll gives the buffer back
    assert drv.used(drv.rings[STATS]) == (1, [(head, 0)])
    assert events and t.metrics.ring_errors == 0 and drv.status == ALL_OK


# --- fuzzing -------------------------------------------------------------------------------

# what a fuzzed address or frame number points at; resolved against the booted machine
TARGETS = ("data", "desc", "avail", "used", "spare", "mapped", "l4", "l1", "m2p", "zero",
           "free", "xenheap", "beyond", "mmio")
REGISTERS = (VIRTIO_MMIO_STATUS, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_NUM,
             VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_INTERRUPT_ACK,
             VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DRIVER_FEATURES,
             VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_QUEUE_DESC_LOW,
             VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
             VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
             VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG + 4)
NEXT, WRITE = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
FUZZ_MIB = 8  # a smaller domain boots faster: more examples in the time


def u(bits: int):
    return st.integers(0, (1 << bits) - 1)


def often(*strategies):
    """one_of, the first strategy drawn about half the time."""
    return st.one_of(strategies[0], *strategies)


@st.composite
def scenario(draw):
    """A queue size, rings (the same in every queue), a payload page and a
    sequence of register writes and host actions. Biased towards well-formed
    rings, so that the device gets past the ring checks to inflate, deflate
    and the statistics, with every kind of breakage mixed in."""
    num = draw(st.sampled_from([1, 2, 4, 8]))
    index = often(st.integers(0, num - 1), st.integers(0, 9), u(16))
    addr = often(st.tuples(st.just("data"), st.sampled_from([0, 4, 8])),
                 st.tuples(st.sampled_from(TARGETS), st.integers(0, PAGE_SIZE - 1)), u(64))
    length = often(st.sampled_from([0, 4, 8, 10, 12, 20, 40]),
                   st.sampled_from([1, 6, PAGE_SIZE, PAGE_SIZE + 1]), u(32))
    flags = often(st.sampled_from([0, NEXT]), st.sampled_from([WRITE, WRITE | NEXT]),
                  st.integers(0, 7), u(16))
    table = draw(often(st.lists(st.tuples(addr, length, flags, index), max_size=num),
                       st.binary(max_size=VRING_DESC.size * num)))
    heads = st.lists(index, min_size=1, max_size=num)
    # (flags, idx, heads); idx None: as many as there are heads
    avail = draw(often(st.tuples(st.integers(0, 1), st.none(), heads),
                       st.tuples(st.integers(0, 1), often(st.integers(0, 2 * num), u(16)),
                                 heads),
                       st.binary(max_size=6 + 2 * num)))
    data = draw(often(st.lists(often(st.sampled_from(TARGETS), u(32)), max_size=12),
                      st.binary(max_size=64)))
    value = st.one_of(st.integers(0, 16), st.sampled_from([0x40, 0x7F, 0x80, 0xFF, 256, 4096]),
                      st.tuples(st.sampled_from(TARGETS), st.integers(0, 7)), u(32))
    sizes = often(st.sampled_from([1, 2, 4, 8]), st.sampled_from([0, 3, 16]))
    op = st.one_of(
        st.tuples(st.just("notify"), st.integers(0, 3)),
        st.tuples(st.just("more"), st.integers(0, 3), often(st.integers(0, num), u(16))),
        st.tuples(st.just("reg"), st.sampled_from(REGISTERS), value),
        st.tuples(st.just("raw"), st.integers(0, PAGE_SIZE - 1), sizes, u(64)),
        st.tuples(st.just("read"), st.integers(0, PAGE_SIZE - 1), sizes),
        st.tuples(st.sampled_from(["poll", "inhibit", "uninhibit"])),
        st.tuples(st.just("target"), u(32)),
    )
    ops = draw(st.lists(op, max_size=20))
    driver_ok = draw(st.sampled_from([True, True, False]))
    return num, driver_ok, table, avail, data, ops


def _targets(hv, dom, drv, spare: int, rings: dict[int, Ring]) -> dict[str, int]:
    """Frame numbers of each kind of target."""
    r = rings[INFLATE]
    return {"data": drv.data >> PAGE_SHIFT, "desc": r.desc >> PAGE_SHIFT,
            "avail": r.avail >> PAGE_SHIFT, "used": r.used >> PAGE_SHIFT, "spare": spare,
            **frame_kinds(hv, dom, drv)}


def _fuzzed_rings(num: int, frames: dict[str, int], table, avail,
                  data) -> tuple[bytes, bytes, bytes]:
    """The fuzzed descriptor table and available ring, and the inflate/deflate
    payload, as bytes; addresses named by kind resolved against ``frames``."""
    def addr(x) -> int:
        if isinstance(x, tuple):
            return (frames[x[0]] << PAGE_SHIFT) + x[1]
        return x

    if isinstance(table, bytes):
        raw_table = table
    else:
        raw_table = b"".join(VRING_DESC.pack(addr(a), ln, fl, nx) for a, ln, fl, nx in table)
    if isinstance(avail, bytes):
        raw_avail = avail
    else:
        flags, idx, ring = avail
        if idx is None:
            idx = min(len(ring), num)
        raw_avail = _U16.pack(flags) + _U16.pack(idx) + b"".join(_U16.pack(h) for h in ring)
    if isinstance(data, bytes):
        raw_data = data
    else:
        raw_data = b"".join(_U32.pack(frames[x] if isinstance(x, str) else x) for x in data)
    return raw_table, raw_avail, raw_data


def _fuzz_op(drv: Driver, frames: dict[str, int], o: tuple) -> None:
    """One register write or host action of a fuzzed scenario."""
    bal = drv.t.device
    kind = o[0]
    if kind == "notify":
        drv.notify(o[1])
    elif kind == "reg":
        value = o[2]
        if isinstance(value, tuple):  # a ring address, low word
            value = ((frames[value[0]] << PAGE_SHIFT) + 8 * value[1]) & 0xFFFFFFFF
        drv.write(o[1], value)
    elif kind == "raw":
        drv.write(o[1], o[3] & ((1 << (8 * o[2])) - 1), size=o[2])
    elif kind == "read":
        value = drv.read(o[1], o[2])
        assert 0 <= value < 1 << (8 * o[2])
    elif kind == "more":  # the driver makes more buffers available
        r = drv.rings.get(o[1])
        if r is not None:
            idx = _U16.unpack(drv.mem.read(r.avail + VRING_IDX_OFF, 2))[0]
            drv.set_avail_idx(r, (idx + o[2]) & 0xFFFF)
    elif kind == "poll":
        bal._poll()
    elif kind == "target":
        if bal.inhibits:
            with pytest.raises(BalloonError):
                bal.set_target(o[1])
        else:
            bal.set_target(o[1])
    elif kind == "inhibit":
        bal.inhibit()
    elif kind == "uninhibit":
        if bal.inhibits:
            bal.uninhibit()
        else:
            with pytest.raises(BalloonError):
                bal.uninhibit()


def run_fuzz(*case) -> Counter:
    """One fuzz case on a machine of its own, closed after it."""
    with booting() as boot:
        return fuzz_case(boot, *case)


def fuzz_case(boot, num: int, driver_ok: bool, table, avail, data, ops) -> Counter:
    hv, dom = boot_balloon(boot, memory=FUZZ_MIB, postcopy="reconcile")
    drv = Driver(hv, dom)
    t, bal = drv.t, drv.t.device
    drv.start(num=num, driver_ok=driver_ok)
    drv.data = drv.page()
    spare = drv.frame()
    frames = _targets(hv, dom, drv, spare, drv.rings)

    # the fuzzed rings, the same in every queue, and the inflate/deflate payload
    raw_table, raw_avail, raw_data = _fuzzed_rings(num, frames, table, avail, data)
    for r in drv.rings.values():
        drv.mem.write(r.desc, raw_table)
        drv.mem.write(r.avail, raw_avail)
    drv.mem.write(drv.data, raw_data)
    guard = Guard(hv, dom)

    for o in ops:
        _fuzz_op(drv, frames, o)
        assert 0 <= t.status <= 0xFF
        assert t.isr & ~(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) == 0
    # then as a driver would go on: DRIVER_OK (refused if the handshake was
    # broken meanwhile), a kick of every queue, the host's poll
    drv.write(VIRTIO_MMIO_STATUS, ALL_OK)
    for i in (INFLATE, DEFLATE, STATS):
        drv.notify(i)
    bal._poll()

    guard.check()
    if t.status & NEEDS_RESET:
        assert t.metrics.ring_errors >= 1
    # drop every inhibit: what was queued is freed once, the counts stay right
    while bal.inhibits:
        bal.uninhibit()
    guard.check()
    assert bal.queue == []
    seen = Counter(asdict(t.metrics)) + Counter(asdict(bal.metrics))
    seen.update(needs_reset=bool(t.status & NEEDS_RESET))
    seen["stats"] = dict(bal.stats)
    assert_recovers(hv, dom, drv)
    return seen


@pytest.mark.slow
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario())
def test_fuzz_rings_and_registers(case):
    run_fuzz(*case)


def test_fuzz_harness_reaches_the_device():
    """A check on the harness: a well-formed case frees frames and refuses
    the mapped one; an ill-formed one ends in DEVICE_NEEDS_RESET."""
    c = run_fuzz(8, True, [(("data", 0), 8, 0, 0)], (0, None, [0]), ["spare", "mapped"],
                 [("notify", 0)])
    # inflate frees the spare, refuses the mapped frame; then deflate (the
    # same ring contents) counts the mapped one, refuses the spare now gone
    assert (c["freed"], c["refused"], c["deflated"]) == (1, 2, 1) and not c["ring_errors"]
    c = run_fuzz(8, True, [(("l4", 0), 8, WRITE, 0)], (0, None, [0]), [], [("notify", 0)])
    assert c["ring_errors"] == 1 and c["needs_reset"]
    c = run_fuzz(1, True, [(("data", 0), 20, 0, 0)], (0, None, [0]),
                 b"".join(VIRTIO_BALLOON_STAT.pack(4, 77) for _ in range(2)), [("notify", 2)])
    assert c["stats"] == {"free-memory": 77}


# well-formed rings: the device must take every chain, and free exactly the
# unused frames an inflate request names (the spares), nothing else
SPARES = 4
KEPT = ("mapped", "l4", "l1", "m2p", "zero", "free", "xenheap", "beyond", "mmio")


@st.composite
def well_formed(draw):
    num = draw(st.sampled_from([1, 2, 4, 8]))
    entry = st.one_of(st.integers(0, SPARES - 1), st.sampled_from(KEPT), u(32))
    # a chain: readable buffers of entries, perhaps a device-writable one at the end
    chain = st.tuples(st.lists(st.lists(entry, max_size=6), min_size=1, max_size=3),
                      st.booleans())
    chains = draw(st.lists(chain, min_size=1, max_size=num))
    budget, kept = num, []
    for bufs, tail in chains:  # at most num descriptors in the table
        need = len(bufs) + tail
        if need > budget:
            break
        kept.append((bufs, tail))
        budget -= need
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("publish"), st.integers(0, 3), st.integers(1, num)),
        st.tuples(st.just("notify"), st.integers(0, 2)),
        st.tuples(st.sampled_from(["poll", "inhibit", "uninhibit", "ack"])),
        st.tuples(st.just("target"), u(32))), max_size=15))
    return num, kept or [([[]], False)], ops


def _lay_out_chains(chains, data_page: int,
                    mfn: Callable[[object], int]) -> tuple[bytes, list, set[int]]:
    """The chains' payload, their (addr, len, writable) buffers, and which
    spares they name."""
    payload, layout, named = b"", [], set()
    for bufs, tail in chains:
        descs = []
        for entries in bufs:
            descs.append((data_page + len(payload), 4 * len(entries), False))
            payload += b"".join(_U32.pack(mfn(e)) for e in entries)
            named |= {e for e in entries if isinstance(e, int) and e < SPARES}
        if tail:
            descs.append((data_page, 4, True))
        layout.append(descs)
    return payload, layout, named


def _well_formed_op(drv: Driver, o: tuple) -> None:
    """One driver or host action of a well-formed scenario (not a publish)."""
    bal = drv.t.device
    if o[0] == "notify":
        drv.notify(o[1])
    elif o[0] == "poll":
        bal._poll()
    elif o[0] == "inhibit":
        bal.inhibit()
    elif o[0] == "uninhibit" and bal.inhibits:
        bal.uninhibit()
    elif o[0] == "ack":
        drv.write(VIRTIO_MMIO_INTERRUPT_ACK, drv.isr)
    elif o[0] == "target" and not bal.inhibits:
        bal.set_target(o[1])


@pytest.mark.slow
@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(well_formed())
def test_fuzz_well_formed_rings(case):
    """Well-formed rings: every chain is taken, exactly the spares an inflate
    names are freed."""
    with booting() as boot:
        well_formed_case(boot, case)


def well_formed_case(boot, case) -> None:
    """One well-formed scenario read top to bottom, hence its length: set-up,
    the ops, then what must hold."""
    num, chains, ops = case
    hv, dom = boot_balloon(boot, memory=FUZZ_MIB, postcopy="reconcile")
    drv = Driver(hv, dom)
    t, bal = drv.t, drv.t.device
    ft = hv.machine.frames
    drv.start(num=num)
    spares = [drv.frame() for _ in range(SPARES)]
    kinds = frame_kinds(hv, dom, drv)

    data_page = drv.page()
    # the frames the balloon could free: a random number naming one of them
    # (a ring page, say) is moved beyond RAM, only the spares are to go
    unused = set(np.flatnonzero((ft.owner == dom.domid) & (ft.ref_count == 1)).tolist())

    def mfn(e) -> int:
        if isinstance(e, str):
            return kinds[e]
        if e < SPARES:
            return spares[e]
        return ft.nr_frames + e if e in unused else e

    # lay the chains out, the same in every queue; the payload in a page of its own
    payload, layout, named = _lay_out_chains(chains, data_page, mfn)
    drv.mem.write(data_page, payload)
    heads = {}
    for q in (INFLATE, DEFLATE, STATS):
        ring = drv.rings[q]
        heads[q] = [drv.add(ring, descs) for descs in layout]
        drv.set_avail_idx(ring, 0)  # published by the ops, a few at a time
        ring.avail_idx = 0
    published = dict.fromkeys((INFLATE, DEFLATE, STATS), 0)
    owners = {k: int(ft.owner[m]) for k, m in kinds.items() if m < ft.nr_frames}
    guard = Guard(hv, dom)

    def publish(q: int, n: int) -> None:
        published[q] = min(len(chains), published[q] + n)
        drv.set_avail_idx(drv.rings[q], published[q])

    for o in ops:
        if o[0] == "publish" and o[1] < 3:
            publish(o[1], o[2])
        else:
            _well_formed_op(drv, o)
        assert t.metrics.ring_errors == 0, t.last_error
    for q in (INFLATE, DEFLATE, STATS):
        publish(q, len(chains))
        drv.notify(q)
    while bal.inhibits:
        bal.uninhibit()

    assert t.metrics.ring_errors == 0 and drv.status == ALL_OK
    for q in (INFLATE, DEFLATE):
        idx, elems = drv.used(drv.rings[q])
        assert idx == len(chains) and elems == [(h, 0) for h in heads[q]][:num]
    idx, elems = drv.used(drv.rings[STATS])
    assert idx + (bal.stats_held is not None) == len(chains)
    assert [h for h, _ in elems] == heads[STATS][:idx][:num]
    # every named spare freed once, but those inflated and then deflated while
    # inhibited (the same chains go on both queues): reconcile's "nothing"
    freed, want = {m for m in spares if ft.owner[m] == FREE}, {spares[e] for e in named}
    assert freed <= want and len(want - freed) == bal.metrics.kept
    assert all(ft.owner[m] == dom.domid for i, m in enumerate(spares) if i not in named)
    assert {k: int(ft.owner[kinds[k]]) for k in owners} == owners
    assert bal.metrics.freed == len(named) - bal.metrics.kept
    assert bal.metrics.malformed >= sum(tail for _, tail in chains)
    guard.check()
    assert_recovers(hv, dom, drv)
