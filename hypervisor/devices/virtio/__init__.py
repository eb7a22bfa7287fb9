"""virtio over MMIO: the transport (mmio.py), a register page per device on
the bus, and the split virtqueues its devices take buffers from (queue.py)."""
