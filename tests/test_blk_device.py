"""virtio-blk, driven from the host side with the fake driver of
test_virtio_device.py: a real hypervisor, a built (not started) domain with
one disk, a raw image in a temporary file. Covered: the config space and
features, IN and OUT against the file in any framing, FLUSH (an fsync),
GET_ID, a read-only disk, every kind of bad request (completed with IOERR or
UNSUPP, or with no status where none can be written, counted, the file
untouched, the device still live), the state an image carries and its
checks, xl's disk spelling in the configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypervisor.devices.blk import (
    NEW_DISK,
    QUEUE_SIZE,
    SEG_MAX,
    SIZE_MAX,
    Block,
    BlockError,
    event_handler,
    restore_state,
)
from hypervisor.devices.kinds import check_entry, save_entry
from hypervisor.public.io.virtio import (
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
)
from hypervisor.public.io.virtio_blk import (
    VIRTIO_BLK_CFG_BLK_SIZE,
    VIRTIO_BLK_CFG_CAPACITY,
    VIRTIO_BLK_CFG_SEG_MAX,
    VIRTIO_BLK_CFG_SIZE_MAX,
    VIRTIO_BLK_CONFIG_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_OUTHDR,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_ID_BLOCK,
)
from hypervisor.toolstack.config import ConfigError, parse_config
from tests.test_virtio_device import ALL_OK, Driver

ROOT = Path(__file__).resolve().parent.parent
SECTORS = 256  # a 128 KiB disk
FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH)


def make_image(path: Path, sectors: int = SECTORS) -> Path:
    """An image whose sector n holds bytes of value n % 251 (never all zero)."""
    path.write_bytes(b"".join(bytes([n % 251 + 1]) * 512 for n in range(sectors)))
    return path


def disk_config(image: Path, access: str = "rw") -> object:
    return parse_config({"name": "vd", "memory": 8, "image": "firmware/guest.elf",
                         "disk": [f"target={image}, vdev=xvda, access={access}"]},
                        ROOT / "vd.toml")


class BlkDriver(Driver):
    """The fake driver, with requests: header, data buffers, status."""

    def start_blk(self, features: int = FEATURES) -> None:
        self.negotiate(features)
        self.setup_queue(0, QUEUE_SIZE)
        self.driver_ok()
        assert self.status == ALL_OK
        self.hdr = self.page()
        self.stat = self.page() + 100  # the status byte, in a page of its own

    @property
    def blk(self) -> Block:
        return self.t.device

    def submit(self, bufs: list[tuple[int, int, bool]]) -> tuple[int, int]:
        """One chain; (its status byte, the used length)."""
        self.mem.write(self.stat, b"\xff")
        ring = self.rings[0]
        head = self.add(ring, bufs)
        self.notify(0)
        idx, elems = self.used(ring)
        got = [e for e in elems if e[0] == head]
        assert got, "the device did not use the request"
        return self.mem.read(self.stat, 1)[0], got[-1][1]

    def request(self, rtype: int, sector: int, data: list[tuple[int, int, bool]],
                header_len: int = 16, status: bool = True) -> tuple[int, int]:
        self.mem.write(self.hdr, VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector))
        bufs = [(self.hdr, header_len, False), *data]
        if status:
            bufs.append((self.stat, 1, True))
        return self.submit(bufs)


@pytest.fixture
def image(tmp_path) -> Path:
    return make_image(tmp_path / "disk.img")


@pytest.fixture
def env(booted, image):
    hv, dom = booted(disk_config(image))
    drv = BlkDriver(hv, dom)
    drv.start_blk()
    return hv, dom, drv


def test_identity_config_and_features(env, booted, tmp_path):
    hv, dom, drv = env
    assert drv.read(VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_BLOCK == 2
    cfg = {off: drv.read(VIRTIO_MMIO_CONFIG + off) for off in
           (VIRTIO_BLK_CFG_SIZE_MAX, VIRTIO_BLK_CFG_SEG_MAX, VIRTIO_BLK_CFG_BLK_SIZE)}
    assert cfg == {VIRTIO_BLK_CFG_SIZE_MAX: SIZE_MAX, VIRTIO_BLK_CFG_SEG_MAX: SEG_MAX,
                   VIRTIO_BLK_CFG_BLK_SIZE: 512}
    assert drv.read(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CFG_CAPACITY) == SECTORS
    assert drv.read(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CFG_CAPACITY + 4) == 0
    bad = drv.t.metrics.bad_accesses
    drv.read(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CONFIG_SIZE)          # beyond the config
    drv.write(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CFG_CAPACITY, 1)     # read-only
    assert drv.t.metrics.bad_accesses == bad + 2
    assert drv.read(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CFG_CAPACITY) == SECTORS
    drv.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
    assert drv.read(VIRTIO_MMIO_DEVICE_FEATURES) == FEATURES & 0xFFFFFFFF
    # a read-only disk offers RO
    _, rdom = booted(disk_config(make_image(tmp_path / "ro.img"), "ro"))
    assert rdom.devices[0].device.features() == FEATURES | 1 << VIRTIO_BLK_F_RO


def test_write_then_read_back_through_the_file(env, image):
    hv, dom, drv = env
    data = bytes(range(256)) * 4  # two sectors
    buf = drv.buffer(data)
    assert drv.request(VIRTIO_BLK_T_OUT, 10, [(buf, 1024, False)]) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[10 * 512:12 * 512] == data
    # read them back, scattered over three segments in two pages
    a, b = drv.page(), drv.page()
    status, used = drv.request(VIRTIO_BLK_T_IN, 9, [(a, 512, True), (b, 1024, True),
                                                     (a + 1024, 512, True)])
    assert (status, used) == (VIRTIO_BLK_S_OK, 2048 + 1)
    assert drv.mem.read(a, 512) == bytes([10]) * 512           # sector 9, as made
    assert drv.mem.read(b, 1024) == data
    assert drv.mem.read(a + 1024, 512) == bytes([13]) * 512    # sector 12
    m = drv.blk.metrics
    assert (m.requests, m.reads, m.writes, m.read_bytes, m.write_bytes, m.ok) == \
        (2, 1, 1, 2048, 1024, 2)
    assert not drv.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_any_framing_header_data_and_status_in_one_buffer_each_way(env, image):
    """virtio 1.x: the driver may merge the parts (QEMU reads the first 16
    readable bytes as the header, the last writable byte as the status)."""
    hv, dom, drv = env
    page = drv.page()
    drv.mem.write(page, VIRTIO_BLK_OUTHDR.pack(VIRTIO_BLK_T_OUT, 0, 3) + b"\x5a" * 512)
    drv.submit([(page, 16 + 512, False), (drv.stat, 1, True)])
    assert image.read_bytes()[3 * 512:4 * 512] == b"\x5a" * 512
    drv.mem.write(drv.hdr, VIRTIO_BLK_OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 3))
    back = drv.page()
    drv.mem.write(back + 512, b"\xff")
    ring = drv.rings[0]
    head = drv.add(ring, [(drv.hdr, 16, False), (back, 513, True)])  # data + status
    drv.notify(0)
    assert drv.mem.read(back, 513) == b"\x5a" * 512 + bytes([VIRTIO_BLK_S_OK])
    assert drv.used(ring)[1][-1] == (head, 513)


def test_flush_is_an_fsync_of_the_image(env, monkeypatch):
    hv, dom, drv = env
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    assert drv.request(VIRTIO_BLK_T_FLUSH, 0, []) == (VIRTIO_BLK_S_OK, 1)
    assert synced == [drv.blk.fd] and drv.blk.metrics.flushes == 1


def test_flush_not_negotiated_is_unsupported(booted, image):
    hv, dom = booted(disk_config(image))
    drv = BlkDriver(hv, dom)
    drv.start_blk(FEATURES & ~(1 << VIRTIO_BLK_F_FLUSH))
    assert drv.request(VIRTIO_BLK_T_FLUSH, 0, []) == (VIRTIO_BLK_S_UNSUPP, 1)
    assert drv.blk.metrics.unsupp == 1 and drv.blk.metrics.flushes == 0


def test_get_id_writes_the_serial_nul_padded(env):
    hv, dom, drv = env
    buf = drv.page()
    drv.mem.write(buf, b"\xee" * 20)
    assert drv.request(VIRTIO_BLK_T_GET_ID, 0, [(buf, 20, True)]) == (VIRTIO_BLK_S_OK, 21)
    assert drv.mem.read(buf, 20) == b"disk.img".ljust(20, b"\0")
    assert drv.blk.metrics.get_ids == 1


def test_a_read_only_disk_refuses_writes_and_serves_reads(booted, image):
    hv, dom = booted(disk_config(image, "ro"))
    drv = BlkDriver(hv, dom)
    drv.start_blk(FEATURES | 1 << VIRTIO_BLK_F_RO)
    before = image.read_bytes()
    buf = drv.buffer(b"\x01" * 512)
    assert drv.request(VIRTIO_BLK_T_OUT, 0, [(buf, 512, False)]) == (VIRTIO_BLK_S_IOERR, 1)
    assert image.read_bytes() == before
    assert drv.request(VIRTIO_BLK_T_IN, 5, [(buf, 512, True)]) == (VIRTIO_BLK_S_OK, 513)
    assert drv.mem.read(buf, 512) == bytes([6]) * 512
    m = drv.blk.metrics
    assert (m.read_only, m.ioerr, m.reads, m.writes) == (1, 1, 1, 0)
    assert drv.request(VIRTIO_BLK_T_FLUSH, 0, []) == (VIRTIO_BLK_S_OK, 1)  # nothing to sync


def _bad(drv: BlkDriver, kind: str) -> tuple[int, int]:
    """Each kind of bad request; (status, used length)."""
    page, big = drv.page(), drv.page()
    if kind == "no_status":          # every buffer device-readable
        return drv.request(VIRTIO_BLK_T_OUT, 0, [(page, 512, False)], status=False)
    if kind == "no_status_zero":     # the last writable buffer is empty
        return drv.request(VIRTIO_BLK_T_IN, 0, [(page, 0, True)], status=False)
    if kind == "bad_header":
        return drv.request(VIRTIO_BLK_T_OUT, 0, [], header_len=8)
    if kind == "in_readable_data":
        return drv.request(VIRTIO_BLK_T_IN, 0, [(page, 512, False)])
    if kind == "out_writable_data":
        return drv.request(VIRTIO_BLK_T_OUT, 0, [(page, 512, True)])
    if kind == "no_data":
        return drv.request(VIRTIO_BLK_T_OUT, 0, [])
    if kind == "odd_length":
        return drv.request(VIRTIO_BLK_T_OUT, 0, [(page, 513, False)])
    if kind == "beyond_capacity":
        return drv.request(VIRTIO_BLK_T_OUT, SECTORS - 1, [(page, 1024, False)])
    if kind == "huge_sector":
        return drv.request(VIRTIO_BLK_T_IN, 1 << 63, [(page, 512, True)])
    if kind == "too_many_segments":
        return drv.request(VIRTIO_BLK_T_OUT, 0, [(page, 512, False)] * (SEG_MAX + 1))
    if kind == "segment_too_big":
        # the domain's frames are shuffled: no 17 of them are adjacent, so
        # the limit is lowered to fit a page (the check reads it at each use)
        drv.monkeypatch.setattr(event_handler, "SIZE_MAX", 1024)
        return drv.request(VIRTIO_BLK_T_OUT, 0, [(page, 1536, False)])
    if kind == "flush_with_data":
        return drv.request(VIRTIO_BLK_T_FLUSH, 0, [(page, 512, False)])
    if kind == "flush_sector":
        return drv.request(VIRTIO_BLK_T_FLUSH, 7, [])
    if kind == "get_id_short":
        return drv.request(VIRTIO_BLK_T_GET_ID, 0, [(page, 10, True)])
    if kind == "get_id_readable":
        return drv.request(VIRTIO_BLK_T_GET_ID, 0, [(page, 20, False), (big, 20, True)])
    if kind == "unknown_type":
        return drv.request(99, 0, [(page, 512, True)])
    raise AssertionError(kind)


BAD = {"no_status": ("no_status", None), "no_status_zero": ("no_status", None),
       "bad_header": ("bad_header", VIRTIO_BLK_S_IOERR),
       "in_readable_data": ("bad_direction", VIRTIO_BLK_S_IOERR),
       "out_writable_data": ("bad_direction", VIRTIO_BLK_S_IOERR),
       "no_data": ("bad_length", VIRTIO_BLK_S_IOERR),
       "odd_length": ("bad_length", VIRTIO_BLK_S_IOERR),
       "beyond_capacity": ("out_of_range", VIRTIO_BLK_S_IOERR),
       "huge_sector": ("out_of_range", VIRTIO_BLK_S_IOERR),
       "too_many_segments": ("too_many_segments", VIRTIO_BLK_S_IOERR),
       "segment_too_big": ("segment_too_big", VIRTIO_BLK_S_IOERR),
       "flush_with_data": ("bad_direction", VIRTIO_BLK_S_IOERR),
       "flush_sector": ("out_of_range", VIRTIO_BLK_S_IOERR),
       "get_id_short": ("bad_direction", VIRTIO_BLK_S_IOERR),
       "get_id_readable": ("bad_direction", VIRTIO_BLK_S_IOERR),
       "unknown_type": ("unsupp", VIRTIO_BLK_S_UNSUPP)}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_requests_are_refused_counted_and_never_acted_on(env, image, kind, monkeypatch):
    hv, dom, drv = env
    drv.monkeypatch = monkeypatch
    before = image.read_bytes()
    counter, want = BAD[kind]
    status, used = _bad(drv, kind)
    m = drv.blk.metrics
    if want is None:
        assert used == 0 and m.no_status == 1 and m.ok == 0
    else:
        assert (status, used) == (want, 1)
        assert getattr(m, counter) == 1
        assert (m.ioerr, m.unsupp) == ((1, 0) if want == VIRTIO_BLK_S_IOERR else (0, 1))
    assert m.reads == m.writes == m.flushes == m.get_ids == 0
    assert image.read_bytes() == before
    assert drv.status == ALL_OK  # still live: a bad request is no ring error
    # and the next good request is served
    buf = drv.page()
    assert drv.request(VIRTIO_BLK_T_IN, 1, [(buf, 512, True)]) == (VIRTIO_BLK_S_OK, 513)
    assert drv.mem.read(buf, 512) == bytes([2]) * 512


def test_seg_max_segments_are_served(env, image):
    hv, dom, drv = env
    page = drv.buffer(b"\x77" * 512)
    status, _ = drv.request(VIRTIO_BLK_T_OUT, 0, [(page, 512, False)] * SEG_MAX)
    assert status == VIRTIO_BLK_S_OK
    assert image.read_bytes()[:SEG_MAX * 512] == b"\x77" * 512 * SEG_MAX


# --- the state an image carries ----------------------------------------------------------

def test_state_round_trip_flushes_and_checks_the_file(env, image, monkeypatch):
    hv, dom, drv = env
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    drv.write(0x70, 0)  # the guest's freeze resets it; the save wants that
    entry = save_entry(drv.t)
    assert synced == [drv.blk.fd]  # the save flushed the image
    assert {k: entry[k] for k in ("kind", "path", "read_only", "serial", "capacity")} == \
        {"kind": "blk", "path": str(image), "read_only": False, "serial": "disk.img",
         "capacity": SECTORS}
    assert check_entry(entry) is None
    # the saved domain still has the image open for writing: a second writer is refused
    with pytest.raises(BlockError, match="failed to get the write lock"):
        restore_state(entry)
    drv.blk.close()
    again = restore_state(entry)
    assert again.capacity == SECTORS and again.serial == "disk.img"
    again.close()
    assert again.fd == -1
    # resized: the restore and the image check refuse it, saying why
    with open(image, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(BlockError, match="resized or replaced"):
        restore_state(entry)
    assert "resized" in check_entry(entry)
    image.unlink()
    with pytest.raises(BlockError, match="does not exist"):
        restore_state(entry)
    assert "does not exist" in check_entry(entry)
    assert check_entry({**entry, "capacity": "x"}) == "device capacity is missing or not int"


def test_close_lets_the_file_go(booted, image):
    hv, dom = booted(disk_config(image))
    blk = dom.devices[0].device
    fd = blk.fd
    hv.close()
    assert blk.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_new_state_takes_the_files_capacity(image):
    blk = Block(str(image))
    assert blk.capacity == SECTORS and NEW_DISK == -1
    blk.close()
    with pytest.raises(BlockError, match="smaller than one"):
        Block(str(make_image(image.parent / "tiny.img", 0)))


def test_a_small_queue_adjusts_seg_max_and_goes_through_the_image(booted, tmp_path):
    """queue-size=4 (QEMU's property): the queue offers 4 entries and
    seg_max is 2 (QEMU's seg-max-adjust: a request of seg_max segments, with
    its header and status, fits the empty queue); the image carries it."""
    image = make_image(tmp_path / "q.img")
    cfg = _cfg(tmp_path, ["q.img,raw,xvda,rw,queue-size=4"])
    assert cfg.disks[0].queue_size == 4
    hv, dom = booted(cfg)
    drv = BlkDriver(hv, dom)
    blk = drv.t.device
    assert blk.queue_sizes() == [4] and blk.seg_max == 2
    assert drv.read(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CFG_SEG_MAX) == 2
    entry = save_entry(drv.t)
    assert entry["queue_size"] == 4 and check_entry(entry) is None
    blk.close()  # the image's one writer (its lock) goes
    again = restore_state(entry)
    assert again.queue_sizes() == [4] and again.seg_max == 2
    again.close()
    assert "a power of two" in check_entry({**entry, "queue_size": 3})
    with pytest.raises(BlockError, match="queue size 300"):
        Block(str(image), queue_size=300)


def test_a_private_copy_leaves_the_image_file_alone(image):
    """The explorer's runs each write a copy of the disk of their own."""
    blk = Block(str(image))
    before = image.read_bytes()
    blk.private_copy()
    os.pwrite(blk.fd, b"\x55" * 512, 0)
    assert os.pread(blk.fd, 512, 512) == before[512:1024]
    assert image.read_bytes() == before
    blk.close()


# --- the configuration: xl's disk spelling ------------------------------------------------

def _cfg(tmp_path: Path, disk: list) -> object:
    return parse_config({"name": "d", "memory": 8, "image": str(ROOT / "firmware/guest.elf"),
                         "disk": disk}, tmp_path / "d.toml")


def test_disk_config_spellings(tmp_path):
    make_image(tmp_path / "a.img")
    make_image(tmp_path / "b.img")
    cfg = _cfg(tmp_path, ["target=a.img, vdev=xvda, access=ro, format=raw",
                          "b.img,raw,xvdb,rw"])
    a, b = cfg.disks
    assert (a.target, a.vdev, a.read_only) == (tmp_path / "a.img", "xvda", True)
    assert (b.target, b.vdev, b.read_only) == (tmp_path / "b.img", "xvdb", False)
    states = cfg.device_states()
    assert [(s["kind"], s["path"], s["read_only"]) for s in states] == \
        [("blk", str(tmp_path / "a.img"), True), ("blk", str(tmp_path / "b.img"), False)]
    assert _cfg(tmp_path, ["a.img,,xvda"]).disks[0].read_only is False


@pytest.mark.parametrize("spec, why", [
    ("target=a.img, vdev=xvda, colour=red, size=1", "unknown key(s) colour, size"),
    ("target=a.img", "no vdev"),
    ("vdev=xvda", "no target"),
    ("target=a.img, vdev=xvda, format=qcow2", "only raw"),
    ("target=a.img, vdev=xvda, access=rx", "access 'rx'"),
    ("missing.img,raw,xvda,rw", "does not exist"),
    ("a.img,raw,xvda,rw,extra", "fifth positional"),
    (7, "list of strings"),
    ("a.img,raw,xvda,rw,queue-size=12", "queue-size '12': a power of two from 4 to 256"),
    ("a.img,raw,xvda,rw,queue-size=512", "queue-size '512': a power of two"),
    ("a.img,raw,xvda,rw,queue-size=two", "queue-size 'two': a power of two"),
])
def test_disk_config_errors(tmp_path, spec, why):
    make_image(tmp_path / "a.img")
    with pytest.raises(ConfigError, match=why.replace("(", r"\(").replace(")", r"\)")):
        _cfg(tmp_path, [spec])
