"""virtio-blk, the host's side (the virtio 1.2 specification, section 5.2;
QEMU's hw/block/virtio-blk.c and Firecracker's devices/virtio/block were
the models), in the balloon's shape:

* ``device.py``: the model: a raw disk image on the host, config space,
  features, flush, close;
* ``event_handler.py``: the request queue: each request read, checked and
  served against the image, synchronously inside the notify;
* ``persist.py``: the state an image carries (path, read_only, serial,
  capacity, queue_size), checked against the file at a restore;
* ``metrics.py``: its counters, declared with their meaning;
* this file: the public names.

One queue (requestq, index 0). The constants of the ABI are in
hypervisor/public/io/virtio_blk.py.
"""

from hypervisor.devices.blk.device import (
    Block,
    BlockError,
    check_queue_size,
    default_serial,
    image_capacity,
)
from hypervisor.devices.blk.event_handler import QUEUE_SIZE, SEG_MAX, SIZE_MAX
from hypervisor.devices.blk.metrics import BlockMetrics
from hypervisor.devices.blk.persist import (
    NEW_DISK,
    STATE_KEYS,
    new_state,
    restore_state,
    save_state,
)

__all__ = ["NEW_DISK", "QUEUE_SIZE", "SEG_MAX", "SIZE_MAX", "STATE_KEYS", "Block",
           "BlockError", "BlockMetrics", "check_queue_size", "default_serial", "image_capacity",
           "new_state", "restore_state", "save_state"]
