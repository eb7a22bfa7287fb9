"""The toolstack (Xen's libxl + libxenguest): domain configuration, the domain
builder, save/restore, checkpoints, and the ``pvlab`` command line. Like
libxc, it sees the hypervisor only through its control interface
(hypervisor.domctl) and the public ABI (hypervisor/public/)."""
