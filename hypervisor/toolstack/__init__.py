"""The toolstack (Xen's libxl + libxenguest): domain configuration, the domain
builder, save/restore, and the ``pvlab`` command line."""
