"""Device drivers: the virtio-mmio transport, split virtqueues, the balloon."""
