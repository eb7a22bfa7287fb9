"""pvlab's guest kernel: a small paravirtual kernel written in Python.

It runs on the VCPUs of a pvlab domain through native entry points (see
hypervisor/public/native.py) and keeps every piece of its state in guest memory,
so that a domain can be saved in one process and restored in another.
It may import only ``hypervisor.public`` from the hypervisor.
"""

from guestos.boot import check_cmdline
from guestos.entry import native_entries
from guestos.panic import oops

__all__ = ["check_cmdline", "native_entries", "oops"]
