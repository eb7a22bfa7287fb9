"""Device models (QEMU's part in a Xen machine): the MMIO bus (bus.py), the
virtio-mmio transport with its split virtqueues (virtio/), the balloon
(balloon/) and the console (console/). A device is given what it needs by
whoever creates it (a view of its domain's memory, the frame operations it
uses, a function that sends its event, the host's timers): no device imports
the hypervisor's core or a domain."""
