"""Shared-ring device interfaces (xen/include/public/io/)."""
