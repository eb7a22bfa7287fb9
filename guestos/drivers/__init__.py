"""The drivers built into the kernel: each registers itself (its boot-time
probe with device_initcall, its irq, PM callbacks and watches from there).
Importing one here is all it takes to build it in; their initcalls run in
this order, which is the order of their PM devices."""

from guestos.drivers import hvc_xen, testdev, virtio_balloon, virtio_console

__all__ = ["hvc_xen", "testdev", "virtio_balloon", "virtio_console"]
