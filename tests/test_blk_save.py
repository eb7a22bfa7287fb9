"""A guest writing its disk saves and restores in a fresh process, and
checkpoints: the disk checksums right and every write is applied exactly
once.

Two blkcheck tasks (two vcpus) write blocks of a seeded pattern to vda, each
followed by a read-increment-write of its own counter sector, then flush,
read back and checksum. The save or checkpoint comes half way, with requests
in flight. After it, each task's checksum is the pattern's, no word read
back differs, and each counter is the number of writes the task made: a
write lost would leave it short, one applied twice (a request sent again
after the restore, say) would set it back. The disk's contents are not in
the image (they stay in the file on the host, flushed at the save), so a
checkpoint's image is restored with the disk as it was at the checkpoint.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.devices.blk import Block
from hypervisor.toolstack.checkpoint import try_save
from hypervisor.toolstack.config import parse_config
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.image import scan_image
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, booting, checkout_env

BLOCKS = 64                  # 4 KiB blocks a task writes
TASKS = ((1, 0), (2, 1024))  # (seed, first sector)
SAVE_AT = "600us"            # half way through the writes
CHECKSUM = re.compile(r"blkcheck checksum ([0-9a-f]{16}) counter (\d+) bad (\d+)")
M64 = (1 << 64) - 1

RESTORE_SCRIPT = """
import sys
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import run_domain
from hypervisor.devices.blk import Block
hv, dom, _ = restore_image(sys.argv[1])
(disk,) = [t.device for t in dom.devices if isinstance(t.device, Block)]
r = run_domain(hv, dom, None)
print(r.console.decode())
print("WRITES", disk.metrics.writes)
print("END", r.reason)
"""


def pattern(seed: int, blocks: int = BLOCKS) -> list[int]:
    return [(((seed << 32) + g + 1) * 0x9E3779B97F4A7C15) & M64 for g in range(blocks * 512)]


def fnv(words: list[int]) -> str:
    h = 0xcbf29ce484222325
    for w in words:
        h = ((h ^ w) * 0x100000001b3) & M64
    return f"{h:016x}"


WANT = sorted((fnv(pattern(seed)), BLOCKS // 2, 0) for seed, _ in TASKS)
# OUT requests the device serves in a whole run: each task's write(2)s, one
# request each (its blocks, then its counter's sector, BLOCKS // 2 times);
# a request sent again after a restore would be one more
WRITES = len(TASKS) * 2 * (BLOCKS // 2)


def results(console: str) -> list[tuple[str, int, int]]:
    return sorted((h, int(c), int(b)) for h, c, b in CHECKSUM.findall(console))


def check_disk(path: Path) -> None:
    """The file on the host: each task's blocks and its counter."""
    raw = path.read_bytes()
    for seed, first in TASKS:
        words = struct.unpack_from(f"<{BLOCKS * 512}Q", raw, first * 512)
        assert list(words) == pattern(seed)
        counter = struct.unpack_from("<Q", raw, (first + 8 * BLOCKS) * 512)[0]
        assert counter == BLOCKS // 2, f"task of seed {seed}: its counter is {counter}"


def config(image: Path) -> object:
    run = ",".join(f"blkcheck:{BLOCKS}:{seed}:{first}" for seed, first in TASKS)
    return parse_config({"name": "blk", "memory": 16, "vcpus": 2, "seed": 3,
                         "image": str(ROOT / "firmware/guest.elf"),
                         "cmdline": f"run={run} irqaffinity=1",
                         "disk": [f"{image},raw,xvda,rw"]}, image.parent / "blk.toml")


def restore_elsewhere(path: Path) -> tuple[str, int]:
    """The restored run's console, and the OUT requests its disk served."""
    p = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, str(path)], cwd=ROOT,
                       env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "END poweroff" in p.stdout, p.stdout[-3000:]
    return p.stdout, int(re.search(r"^WRITES (\d+)$", p.stdout, re.M).group(1))


def disk_writes(dom) -> int:
    (disk,) = [t.device for t in dom.devices if isinstance(t.device, Block)]
    return disk.metrics.writes


def run_with_save(tmp: Path, checkpoint: bool) -> dict:
    """Boot, run to SAVE_AT, save or checkpoint; what it gave."""
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(2 << 20))
    out: dict = {"disk": disk, "image": tmp / "blk.img"}

    def save(d) -> bool:
        out["writes_at_save"] = disk_writes(d)
        out["outcome"] = try_save(hv, d, out["image"], checkpoint=checkpoint)
        if checkpoint:  # the disk as the checkpoint leaves it
            shutil.copy(disk, tmp / "disk-at-checkpoint.img")
        return checkpoint

    with booting() as boot:
        hv, dom = boot(config(disk))
        r = run_domain(hv, dom, None, requests=[parse_request(f"{SAVE_AT} suspend")],
                       on_suspend=save)
        out["console"] = r.console.decode()
        out["reason"] = r.reason
        out["writes"] = disk_writes(dom)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    return run_with_save(tmp_path_factory.mktemp("blksave"), checkpoint=False)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> dict:
    return run_with_save(tmp_path_factory.mktemp("blkcheckpoint"), checkpoint=True)


def test_the_save_came_half_way_with_the_disk_flushed(saved):
    assert saved["outcome"].ok, saved["outcome"].error
    console = saved["console"]
    assert "blkcheck start" in console and not results(console)  # not finished yet
    # requests the device had used and the driver had not taken yet: the reap
    # had something to do (this save's schedule leaves one)
    assert re.search(r"virtio_blk: vda frozen: [1-9]\d* requests reaped, 0 failed", console)


def test_restored_in_a_fresh_process_the_disk_checksums_and_writes_are_exactly_once(saved):
    console, writes = restore_elsewhere(saved["image"])
    assert "virtio_blk: vda restored" in console
    assert "FAILURE" not in console
    assert results(console) == WANT
    check_disk(saved["disk"])
    assert 0 < saved["writes_at_save"] < WRITES  # half way
    assert saved["writes_at_save"] + writes == WRITES  # none sent again, none lost


def test_the_image_check_accepts_the_blk_entry(saved):
    info = scan_image(saved["image"])
    (entry,) = [d for d in info.devices if d["kind"] == "blk"]
    assert entry["path"] == str(saved["disk"]) and entry["capacity"] == 4096
    assert entry["read_only"] is False and entry["serial"] == "disk.img"


def test_a_checkpointed_guest_goes_on_to_the_right_checksums(checkpointed):
    assert checkpointed["outcome"].ok, checkpointed["outcome"].error
    assert checkpointed["reason"] == "poweroff"
    console = checkpointed["console"]
    assert "virtio_blk: vda restored" in console  # the thaw takes the restore's path
    assert results(console) == WANT
    check_disk(checkpointed["disk"])
    assert checkpointed["writes"] == WRITES  # none sent again across the thaw


@pytest.mark.slow
def test_a_checkpoint_restored_with_its_disk_writes_exactly_once(checkpointed):
    """The checkpoint's image on the disk as it was then (the guest that went
    on wrote more since): the same checksums and counts again."""
    disk = checkpointed["disk"]
    shutil.copy(disk.parent / "disk-at-checkpoint.img", disk)
    console, writes = restore_elsewhere(checkpointed["image"])
    assert results(console) == WANT
    check_disk(disk)
    assert checkpointed["writes_at_save"] + writes == WRITES
