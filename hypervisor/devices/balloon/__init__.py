"""The virtio memory balloon, the host's side (the virtio 1.2 specification,
section 5.5; QEMU's hw/virtio/virtio-balloon.c and Firecracker's
devices/virtio/balloon were the models).

Every device in pvlab has this shape, Firecracker's:

* ``device.py``: the model: config space, features, what a request does,
  the host's controls; and ``BalloonHost``, what its creator gives it;
* ``event_handler.py``: the queue notifications (inflate, deflate, stats);
* ``persist.py``: the state an image carries, saved and restored;
* ``metrics.py``: its counters, declared with their meaning;
* this file: the public names.

Queues by offered position: inflate 0, deflate 1, stats 2. Features:
VERSION_1, MUST_TELL_HOST, STATS_VQ, and DEFLATE_ON_OOM if the domain's
configuration asks (QEMU's deflate-on-oom property, off by default). Config:
num_pages (the host's target balloon size) and actual (the driver's), le32,
in 4 KiB pages. Each inflate or deflate entry is a bus frame number, which
in this machine is a machine frame number. The constants of the ABI are in
hypervisor/public/io/virtio.py.
"""

from hypervisor.devices.balloon.device import (
    POSTCOPY_DROP,
    POSTCOPY_POLICIES,
    POSTCOPY_RECONCILE,
    QUEUE_SIZE,
    Balloon,
    BalloonError,
    BalloonHost,
    QueuedRequest,
    Timers,
)
from hypervisor.devices.balloon.event_handler import REQUEST_MAX_BYTES, STATS_MAX_BYTES
from hypervisor.devices.balloon.metrics import BalloonMetrics
from hypervisor.devices.balloon.persist import (
    STATE_DEFAULTS,
    STATE_KEYS,
    restore_state,
    save_state,
)

__all__ = ["POSTCOPY_DROP", "POSTCOPY_POLICIES", "POSTCOPY_RECONCILE", "QUEUE_SIZE",
           "REQUEST_MAX_BYTES", "STATE_DEFAULTS", "STATE_KEYS", "STATS_MAX_BYTES", "Balloon",
           "BalloonError", "BalloonHost", "BalloonMetrics", "QueuedRequest", "Timers",
           "restore_state", "save_state"]
