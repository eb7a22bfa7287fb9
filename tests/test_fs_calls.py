"""The file layer's system calls (guestos/fs.py) over a fake cpu, one task
and two nodes: a file open on a destroyed node stays dead even when a new
node takes its row; lseek refuses a stream and a position past 2^63 - 1;
open reads a short name up to its NUL even just before an unmapped page;
an ioctl the driver does not know is -ENOTTY."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from guestos import fs
from guestos.layout import Layout
from guestos.mm import PAGE_SIZE
from guestos.symbols import export
from hypervisor.public.errno import EFAULT, EINVAL, ENAMETOOLONG, ENODEV, ENOTTY, ESPIPE
from tests.fakecpu import FakeCpu

USER = 0x400000                # the task's page of strings; the next page is unmapped
TASK = Layout("task", [("files", "u64"), ("pid", "u64")])


def _read(tag: int):
    return lambda cpu, f, ubuf, size: tag


disk_fops = export(fs.file_operations(lambda cpu, f: 0, _read(1)),
                   "tests.test_fs_calls.disk_fops")
net_fops = export(fs.file_operations(lambda cpu, f: 0, _read(2), no_llseek=True),
                  "tests.test_fs_calls.net_fops")


@dataclass
class FakeArea:
    base: int

    def va(self, cpu) -> int:
        return self.base


@pytest.fixture
def cpu(monkeypatch):
    c = FakeCpu()
    t = TASK.at(c, c.kva(c.alloc_page()))
    t.pid = 1
    user = bytearray(PAGE_SIZE)

    def copy_from_user(cpu, uva, size):
        if not USER <= uva or uva + size > USER + PAGE_SIZE:
            return None
        return bytes(user[uva - USER:uva - USER + size])

    c.user = user
    monkeypatch.setattr(fs, "AREAS", {"fs": FakeArea(c.kva(c.alloc_page(n=2)))})
    monkeypatch.setattr(fs, "current", lambda cpu: t)
    monkeypatch.setattr(fs, "wake_up_waiters", lambda cpu, chan: None)
    monkeypatch.setattr(fs, "copy_from_user", copy_from_user)
    return c


def name_at(cpu: FakeCpu, name: bytes) -> int:
    """``name`` and its NUL at the very end of the mapped user page."""
    at = PAGE_SIZE - len(name) - 1
    cpu.user[at:] = name + b"\0"
    return USER + at


def test_a_file_of_a_destroyed_node_is_dead_even_when_its_row_is_taken_again(cpu):
    assert fs.device_create(cpu, "vda", disk_fops, 0) == 0
    fd = fs.sys_open(cpu, name_at(cpu, b"vda"), fs.O_RDWR)
    assert fs.file_read(cpu, fd, USER, 1) == 1
    fs.device_destroy(cpu, "vda")
    assert fs.device_create(cpu, "icmp", net_fops, 0) == 0      # the same row
    assert fs.file_read(cpu, fd, USER, 1) == -ENODEV
    assert fs.sys_ioctl(cpu, fd, 1, 0) == -ENODEV
    assert fs.sys_close(cpu, fd) == 0


def test_lseek_refuses_a_stream_and_a_position_past_the_largest(cpu):
    fs.device_create(cpu, "vda", disk_fops, 0)
    fs.device_create(cpu, "icmp", net_fops, 0)
    disk = fs.sys_open(cpu, name_at(cpu, b"vda"), fs.O_RDWR)
    net = fs.sys_open(cpu, name_at(cpu, b"icmp"), fs.O_RDWR)
    assert fs.sys_lseek(cpu, net, 0, fs.SEEK_SET) == -ESPIPE
    assert fs.sys_lseek(cpu, disk, fs.MAX_LFS, fs.SEEK_SET) == fs.MAX_LFS
    assert fs.sys_lseek(cpu, disk, 1, fs.SEEK_CUR) == -EINVAL
    assert fs.sys_lseek(cpu, disk, (1 << 64) - 1, fs.SEEK_SET) == -EINVAL   # -1


def test_open_reads_a_short_name_up_to_its_nul_before_an_unmapped_page(cpu):
    fs.device_create(cpu, "vda", disk_fops, 0)
    assert fs.sys_open(cpu, name_at(cpu, b"vda"), fs.O_RDONLY) == fs.FIRST_FD
    cpu.user[-3:] = b"vda"            # its NUL would be on the unmapped page
    assert fs.sys_open(cpu, USER + PAGE_SIZE - 3, fs.O_RDONLY) == -EFAULT
    cpu.user[:16] = b"a" * 16
    assert fs.sys_open(cpu, USER, fs.O_RDONLY) == -ENAMETOOLONG


def test_an_ioctl_the_driver_has_none_of_is_enotty(cpu):
    fs.device_create(cpu, "vda", disk_fops, 0)
    fd = fs.sys_open(cpu, name_at(cpu, b"vda"), fs.O_RDWR)
    assert fs.sys_ioctl(cpu, fd, 0x5401, 0) == -ENOTTY
