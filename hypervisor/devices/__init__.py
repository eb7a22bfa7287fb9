"""Device models (QEMU's part in a Xen machine): the MMIO bus (bus.py), the
virtio-mmio transport with its split virtqueues and the injector (virtio/),
the kinds table that the save, the image check and the restore go through
(kinds.py), and the virtio devices: the balloon (balloon/), the console
(console/), the block device (blk/) and the network device (net/), whose
listening Unix sockets share one rule for their paths (unixsock.py). A
device is given what it needs by whoever creates it (a view of its domain's
memory, the frame operations it uses, a function that sends its event, the
host's timers): no device imports the hypervisor's core or a domain."""
