"""The block device's state that an image carries (Firecracker's
block/virtio/persist.rs): where the disk is (``path``, absolute), whether it
is read-only, its serial, and its ``capacity`` in sectors.

The disk's contents are not in the image: they stay in the file on the
host, as a Xen or QEMU disk does across a save. ``queue_size`` is the
request queue's (QEMU's queue-size), which the restored device offers again. So the save flushes the
image to stable storage first (an fsync), and the restore opens the same
file and checks that it still has the capacity it had: a file that is gone
or was resized is a clear error, not a disk that silently changed under the
guest. The image check makes the same checks.

Nothing of a request goes across: the device serves each request inside
the notify, and the guest's freeze reset it, so no queue and no request in
flight are left to carry.
"""

from __future__ import annotations

import os
from typing import Any

from hypervisor.devices.blk.device import Block, BlockError, check_queue_size, image_capacity
from hypervisor.devices.blk.event_handler import QUEUE_SIZE
from hypervisor.devices.kinds import BUS, DeviceKind, register_kind
from hypervisor.devices.virtio.mmio import VirtioDevice
from hypervisor.public.io.virtio_blk import VIRTIO_BLK_ID_BYTES

KIND = "blk"

# the keys of an entry (beyond its place) and their JSON types: what the
# image checker demands
STATE_KEYS: dict[str, type] = {"path": str, "read_only": bool, "serial": str,
                               "capacity": int, "queue_size": int}
NEW_DISK = -1  # capacity in a new device's state: whatever the file has


def save_state(blk: VirtioDevice) -> dict[str, Any]:
    """The disk's keys of its EMULATOR_CONTEXT entry; the image flushed first."""
    if not isinstance(blk, Block):
        raise TypeError(f"{blk.name} is no block device")
    blk.flush()
    return {"path": blk.path, "read_only": blk.read_only, "serial": blk.serial,
            "capacity": blk.capacity, "queue_size": blk.queue_size}


def new_state(path: str, read_only: bool, serial: str = "",
              queue_size: int = QUEUE_SIZE) -> dict[str, Any]:
    """A new disk's state: its configuration; the capacity is the file's."""
    return {"kind": KIND, "bus": BUS, "path": os.path.abspath(path), "read_only": read_only,
            "serial": serial, "capacity": NEW_DISK, "queue_size": queue_size}


def restore_state(state: dict[str, Any]) -> Block:
    """A block device as ``state`` describes it (BlockError: the file is
    gone, or its capacity is not the saved one)."""
    return Block(state["path"], state["read_only"], state["serial"], state["capacity"],
                 state["queue_size"])


def _check(state: dict[str, Any]) -> str | None:
    """What the image check can tell without opening the disk for use."""
    serial = state["serial"]
    if len(serial.encode()) > VIRTIO_BLK_ID_BYTES or not serial.isascii():
        return f"disk serial {serial!r}: at most {VIRTIO_BLK_ID_BYTES} ASCII bytes"
    if state["capacity"] < NEW_DISK:
        return f"disk capacity {state['capacity']}: negative"
    if (why := check_queue_size(state["queue_size"])) is not None:
        return why
    try:
        have = image_capacity(state["path"])
    except BlockError as e:
        return str(e)
    if state["capacity"] != NEW_DISK and have != state["capacity"]:
        return (f"disk image {state['path']!r} has {have} sectors, the saved domain's disk "
                f"had {state['capacity']}: resized or replaced since the save")
    return None


def _make(hv: Any, dom: Any, state: dict[str, Any]) -> Block:
    try:
        return restore_state(state)
    except BlockError as e:
        raise ValueError(str(e)) from None


BLK_KIND = register_kind(DeviceKind(KIND, Block, STATE_KEYS, save_state, _make,
                                    check=_check))
