"""The block driver in a booted guest, beyond blkcheck's good path (which
test_blk_save.py runs): two disks are vda and vdb in the order of the
configuration, and a read-only disk refuses a write in the driver (-EROFS)
before any request reaches the device."""

from __future__ import annotations

from hypervisor.toolstack.config import parse_config
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT


def test_two_disks_and_a_read_only_one(booted, tmp_path):
    for name in ("ro.img", "rw.img"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
    cfg = parse_config({"name": "blk2", "memory": 16, "image": str(ROOT / "firmware/guest.elf"),
                        "cmdline": "run=blkcheck:4:1:0",
                        "disk": ["target=ro.img, vdev=xvda, access=ro",
                                 "rw.img,raw,xvdb,rw"]}, tmp_path / "blk2.toml")
    hv, dom = booted(cfg)
    r = run_domain(hv, dom, None)
    console = r.console.decode()
    assert r.reason == "poweroff"
    assert "virtio_blk: vda: 2048 sectors (1024 KiB), serial 'ro.img', read-only" in console
    assert "virtio_blk: vdb: 2048 sectors (1024 KiB), serial 'rw.img', read-write" in console
    assert "blkcheck FAILED step 2 errno 30" in console  # EROFS, from the driver
    ro, rw = (t.device for t in dom.devices)
    assert ro.metrics.writes == ro.metrics.read_only == 0  # the device saw no write
    assert ro.metrics.get_ids == rw.metrics.get_ids == 1
    assert (tmp_path / "ro.img").read_bytes() == bytes(1 << 20)
