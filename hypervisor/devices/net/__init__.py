"""The virtio network device, the host's side (the virtio 1.2 specification,
section 5.1; QEMU's hw/net/virtio-net.c and Firecracker's devices/virtio/net
were the models), in the balloon's shape:

* ``device.py``: the model: config space (MAC, link status), features,
  the backend's poll, the announcement after a restore; ``NetHost``, what
  its creator gives it;
* ``event_handler.py``: the queue notifications (rx, tx, ctrl);
* ``backend.py``: the host's side of the wire: the user-mode network's
  gateway (10.0.2.2) and the socket that joins two domains;
* ``persist.py``: the state an image carries, saved and restored;
* ``metrics.py``: its counters;
* this file: the public names.

Queues: receive 0, transmit 1, control 2. Features: VERSION_1, MAC,
STATUS, CTRL_VQ, GUEST_ANNOUNCE. The ABI is hypervisor/public/io/virtio_net.py,
the frames' layouts hypervisor/public/io/inet.py.
"""

from hypervisor.devices.net.backend import (
    USER_GATEWAY,
    USER_GATEWAY_MAC,
    Backend,
    BackendError,
    StreamBackend,
    UserBackend,
    open_backend,
    parse_address,
)
from hypervisor.devices.net.device import CTRL_QUEUE_SIZE, POLL_NS, QUEUE_SIZE, Net, NetHost
from hypervisor.devices.net.metrics import NetMetrics
from hypervisor.devices.net.persist import (
    STATE_KEYS,
    new_state,
    restore_state,
    save_state,
)

__all__ = ["CTRL_QUEUE_SIZE", "POLL_NS", "QUEUE_SIZE", "STATE_KEYS", "USER_GATEWAY",
           "USER_GATEWAY_MAC", "Backend", "BackendError", "Net", "NetHost", "NetMetrics",
           "StreamBackend", "UserBackend", "new_state", "open_backend", "parse_address",
           "restore_state", "save_state"]
