"""The guest kernel with the node "vda" taken before the disks are probed
(an initcall put first), so that the first disk cannot have its name: the
probe's failure path, for tests/test_blk_guest.py."""

from __future__ import annotations

from guestos import init, native_entries, oops
from guestos.fs import device_create, file_operations
from guestos.layout import Ref
from guestos.symbols import export
from hypervisor.public.native import NativeCpu

__all__ = ["native_entries", "oops"]


def squat_open(cpu: NativeCpu, file: Ref) -> int:
    return 0


squat_fops = export(file_operations(squat_open), "tests.kernels.takevda.squat_fops")


def take_vda(cpu: NativeCpu, cmdline: str) -> None:
    device_create(cpu, "vda", squat_fops, 0)


init._initcalls.insert(0, take_vda)  # before every driver's probe
