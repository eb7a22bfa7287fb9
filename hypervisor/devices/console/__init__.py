"""virtio-console with MULTIPORT, the host's side (the virtio 1.2
specification, section 5.3; QEMU's hw/char/virtio-serial-bus.c was the
model), in the balloon's shape:

* ``device.py``: the model: ports, config space, features, the sockets' poll;
* ``backend.py``: a port's host end: a listening Unix socket or a file;
* ``event_handler.py``: the queue notifications and the control protocol;
* ``persist.py``: the state an image carries (the ports);
* ``metrics.py``: its counters;
* this file: the public names.

The ABI (features, config, control messages, queue layout) is in
hypervisor/public/io/virtio_console.py.
"""

from hypervisor.devices.console.backend import (
    CONNECTIONS,
    FILE,
    SOCKET,
    Backend,
    BackendError,
    FileBackend,
    Port,
    SocketBackend,
)
from hypervisor.devices.console.device import (
    MAX_NAME,
    MAX_PORTS,
    POLL_NS,
    QUEUE_SIZE,
    Console,
    ConsoleError,
    ConsoleHost,
)
from hypervisor.devices.console.metrics import ConsoleMetrics
from hypervisor.devices.console.persist import (
    STATE_KEYS,
    check_ports,
    new_state,
    restore_state,
    save_state,
)

__all__ = ["CONNECTIONS", "FILE", "MAX_NAME", "MAX_PORTS", "POLL_NS", "QUEUE_SIZE", "SOCKET",
           "STATE_KEYS", "Backend", "BackendError", "Console", "ConsoleError", "ConsoleHost",
           "ConsoleMetrics", "FileBackend", "Port", "SocketBackend", "check_ports",
           "new_state", "restore_state", "save_state"]
