"""Device models (QEMU's part in a Xen machine): the MMIO bus, the virtio-mmio
transport with its split virtqueues, and the balloon device."""
