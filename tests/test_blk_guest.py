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


TAKEN = """
import re, sys
from dataclasses import replace
from hypervisor.toolstack.config import parse_disk
from hypervisor.toolstack.session import boot, run_domain
from tests.conftest import make_config

def free_before_first_task(disk):
    cfg = replace(make_config("run=hello"), kernel="tests.kernels.takevda")
    if disk:
        cfg = replace(cfg, disks=(disk,))
    hv, dom = boot(cfg)
    r = run_domain(hv, dom)
    out = dom.console_out.decode()
    return int(re.search(r"(\\d+) before the first task", out).group(1)), out

"""


def test_a_disk_whose_name_is_taken_takes_no_pages(tmp_path):
    """The probe makes the node first: a disk that cannot have its name
    (here an initcall took "vda" first) allocates no slot and no queue."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    script = TAKEN + f"""
disk = parse_disk({f"target={image}, vdev=xvda"!r})
without, _ = free_before_first_task(None)
with_disk, out = free_before_first_task(disk)
print(without, with_disk)
print(out)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr
    first, out = run.stdout.split("\n", 1)
    without, with_disk = map(int, first.split())
    assert "virtio_blk: no node vda: error -17" in out
    assert without - with_disk <= 2, out  # the transport's pages (its device, its mapping)
