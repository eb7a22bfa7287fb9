"""Device files: the nodes drivers make, the files user programs open, and
the system calls that reach a driver through them (Linux's fs/char_dev.c,
fs/open.c and fs/read_write.c, cut to character and block devices that a
driver names).

A driver describes what its files do with a ``file_operations`` (exported,
so guest memory can name it by symbol number) and makes a node for each
device it drives with ``device_create(cpu, name, fops, minor)``: a row of
the node table, in kernel data. A user program opens a node by its name
(``open("vport0p1", O_RDWR)``); the open file is a row of the file table
(Linux's struct file: the node, the minor, the position, the flags and the
driver's ``private`` word) and the task's descriptor (3 to 10) is one byte
of its ``files`` word naming that row. Descriptors 0 to 2 stay the console's
(guestos/syscalls.py).

A read or a write that must wait returns None from the driver: the task
blocks on its node's wait channel and makes the same call again when the
driver wakes the node (``wake_up_node``), as Linux restarts a call that
returned -ERESTARTSYS. Nothing of the wait is kept but the task's state,
its channel and its registers, so a save in between loses nothing.

A task's files are closed when it exits (the driver's ``release``), as
Linux's exit_files does. A file open on a node its driver destroyed is dead:
every call on it but close gets -ENODEV, whatever node later takes the row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from guestos.kdata import AREAS
from guestos.layout import Layout, Ref
from guestos.mm import PAGE_SIZE
from guestos.symbols import NO_SYMBOL, symbol, symbol_number
from guestos.task import current, register_exit_hook, wake_up_waiters
from guestos.usercopy import copy_from_user
from hypervisor.public.errno import (
    EBADF,
    EEXIST,
    EFAULT,
    EINVAL,
    EMFILE,
    ENAMETOOLONG,
    ENFILE,
    ENODEV,
    ENOENT,
    ENOTTY,
    ESPIPE,
)
from hypervisor.public.native import NativeCpu

O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
O_ACCMODE = 3
F_DEAD = 1 << 8              # file.flags: its node was destroyed (not an open flag)
SEEK_SET, SEEK_CUR = 0, 1
MAX_LFS = (1 << 63) - 1      # the largest position (Linux's MAX_LFS_FILESIZE)
FIRST_FD = 3                 # 0, 1, 2: the console
MAX_FDS = 8                  # a task's descriptors: 3 .. 10, one byte each of task.files
assert MAX_FDS * 8 <= 64
MAX_NODES = 32
MAX_FILES = 64
NAME_LEN = 16                # a node's name, NUL-padded (15 bytes at most)
WAIT_NODE_BASE = 16          # the wait channel of node n (guestos/task.py's WAIT_* are below)

NODE = Layout("device_node", [
    ("fops", "u64"),         # symbol number of its file_operations (0: a free row)
    ("minor", "u64"),
    ("name0", "u64"),        # the name, 16 bytes
    ("name1", "u64"),
])
FILE = Layout("file", [
    ("node", "u64"),         # node index + 1 (0: a free row)
    ("minor", "u64"),
    ("pos", "u64"),
    ("flags", "u64"),        # O_RDONLY, O_WRONLY or O_RDWR; F_DEAD
    ("private", "u64"),      # the driver's
    ("pid", "u64"),          # the task that opened it
])
_NODES_SIZE = MAX_NODES * NODE.size
assert _NODES_SIZE + MAX_FILES * FILE.size <= AREAS["fs"].size

Read = Callable[[NativeCpu, Ref, int, int], "int | None"]


@dataclass
class file_operations:
    """What a driver's files do (include/linux/fs.h); export it."""

    open: Callable[[NativeCpu, Ref], int]          # 0 or -errno
    read: Read | None = None                       # (cpu, file, ubuf, size): bytes, -errno, None
    write: Read | None = None                      #   None: wait (wake_up_node)
    release: Callable[[NativeCpu, Ref], None] | None = None
    ioctl: Callable[[NativeCpu, Ref, int, int], int] | None = None
    no_llseek: bool = False    # a stream (Linux's no_llseek): lseek gets -ESPIPE


def node(cpu: NativeCpu, n: int) -> Ref:
    return NODE.at(cpu, AREAS["fs"].va(cpu) + n * NODE.size)


def file(cpu: NativeCpu, n: int) -> Ref:
    return FILE.at(cpu, AREAS["fs"].va(cpu) + _NODES_SIZE + n * FILE.size)


def node_name(nd: Ref) -> str:
    raw = nd.name0.to_bytes(8, "little") + nd.name1.to_bytes(8, "little")
    return raw.split(b"\0")[0].decode(errors="replace")


def _find_node(cpu: NativeCpu, name: str) -> int:
    for n in range(MAX_NODES):
        nd = node(cpu, n)
        if nd.fops != NO_SYMBOL and node_name(nd) == name:
            return n
    return -ENOENT


def device_create(cpu: NativeCpu, name: str, fops: file_operations, minor: int) -> int:
    """A node ``name`` whose files ``fops`` serves (Linux's device_create):
    its index, or -EEXIST, -ENFILE (the table is full), -EINVAL (a bad name)."""
    raw = name.encode()
    if not raw or len(raw) >= NAME_LEN or b"\0" in raw or b"/" in raw:
        return -EINVAL
    if _find_node(cpu, name) >= 0:
        return -EEXIST
    for n in range(MAX_NODES):
        nd = node(cpu, n)
        if nd.fops == NO_SYMBOL:
            padded = raw.ljust(NAME_LEN, b"\0")
            nd.name0 = int.from_bytes(padded[:8], "little")
            nd.name1 = int.from_bytes(padded[8:], "little")
            nd.minor, nd.fops = minor, symbol_number(fops)
            return n
    return -ENFILE


def device_destroy(cpu: NativeCpu, name: str) -> None:
    """The node goes; files open on it are dead, -ENODEV from then on (as
    Linux's cdev_del leaves them), even once a new node takes its row."""
    n = _find_node(cpu, name)
    if n < 0:
        return
    node(cpu, n).fops = NO_SYMBOL
    for r in range(MAX_FILES):
        f = file(cpu, r)
        if f.node == n + 1:
            f.flags = f.flags | F_DEAD
    wake_up_node(cpu, n)


def wake_up_node(cpu: NativeCpu, n: int) -> None:
    """Wake the tasks waiting in a read or write on node ``n``: each makes
    its call again."""
    wake_up_waiters(cpu, WAIT_NODE_BASE + n)


def _fops(cpu: NativeCpu, f: Ref) -> file_operations | None:
    """The driver's operations for ``f``; None if its node was destroyed."""
    if f.flags & F_DEAD:
        return None
    nd = node(cpu, f.node - 1)
    return symbol(nd.fops) if nd.fops != NO_SYMBOL else None  # type: ignore[return-value]


# --- descriptors ---------------------------------------------------------------------------

def _slot(t: Ref, fd: int) -> int:
    return (t.files >> (8 * (fd - FIRST_FD))) & 0xFF


def _set_slot(t: Ref, fd: int, value: int) -> None:
    shift = 8 * (fd - FIRST_FD)
    t.files = (t.files & ~(0xFF << shift)) | (value << shift)


def fget(cpu: NativeCpu, fd: int) -> Ref | None:
    """The running task's open file ``fd``, or None."""
    t = current(cpu)
    if t is None or not FIRST_FD <= fd < FIRST_FD + MAX_FDS:
        return None
    row = _slot(t, fd)
    return file(cpu, row - 1) if row else None


def wait_channel(f: Ref) -> int:
    """The channel a task waits on for file ``f`` (its node's)."""
    return WAIT_NODE_BASE + f.node - 1


# --- the calls ----------------------------------------------------------------------------

def strncpy_from_user(cpu: NativeCpu, uva: int, size: int) -> bytes | int:
    """The string at ``uva`` without its NUL, read up to the NUL and a page
    at a time, so that a short name just before an unmapped page is read
    (Linux's strncpy_from_user); -EFAULT, or -ENAMETOOLONG if no NUL comes in
    ``size`` bytes."""
    out = b""
    while len(out) < size:
        n = min(size - len(out), PAGE_SIZE - (uva & (PAGE_SIZE - 1)))
        chunk = copy_from_user(cpu, uva, n)
        if chunk is None:
            return -EFAULT
        if b"\0" in chunk:
            return out + chunk.split(b"\0")[0]
        out, uva = out + chunk, uva + n
    return -ENAMETOOLONG


def sys_open(cpu: NativeCpu, path: int, flags: int) -> int:
    """A descriptor for the node named at ``path``, or -errno."""
    raw = strncpy_from_user(cpu, path, NAME_LEN)
    if isinstance(raw, int):
        return raw
    if flags & ~O_ACCMODE or flags & O_ACCMODE == O_ACCMODE:
        return -EINVAL
    n = _find_node(cpu, raw.decode(errors="replace"))
    if n < 0:
        return n
    t = current(cpu)
    fd = next((d for d in range(FIRST_FD, FIRST_FD + MAX_FDS) if not _slot(t, d)), None)
    if fd is None:
        return -EMFILE
    row = next((r for r in range(MAX_FILES) if not file(cpu, r).node), None)
    if row is None:
        return -ENFILE
    f = file(cpu, row)
    f.node, f.minor, f.pos, f.flags, f.private, f.pid = n + 1, node(cpu, n).minor, 0, flags, 0, \
        t.pid
    rc = symbol(node(cpu, n).fops).open(cpu, f)  # type: ignore[attr-defined]
    if rc < 0:
        f.node = 0
        return rc
    _set_slot(t, fd, row + 1)
    return fd


def _put(cpu: NativeCpu, f: Ref) -> None:
    fops = _fops(cpu, f)
    if fops is not None and fops.release is not None:
        fops.release(cpu, f)
    f.node = 0


def sys_close(cpu: NativeCpu, fd: int) -> int:
    f = fget(cpu, fd)
    if f is None:
        return -EBADF
    _set_slot(current(cpu), fd, 0)
    _put(cpu, f)
    return 0


def file_read(cpu: NativeCpu, fd: int, ubuf: int, size: int) -> int | None:
    """read(2) on a device file: the driver's answer (None: wait)."""
    return _rw(cpu, fd, ubuf, size, write=False)


def file_write(cpu: NativeCpu, fd: int, ubuf: int, size: int) -> int | None:
    return _rw(cpu, fd, ubuf, size, write=True)


def _file_ops(cpu: NativeCpu, fd: int) -> tuple[Ref, file_operations] | int:
    """The running task's open file ``fd`` and its driver's operations, or
    -EBADF (no such descriptor), -ENODEV (its node is gone)."""
    f = fget(cpu, fd)
    if f is None:
        return -EBADF
    fops = _fops(cpu, f)
    return -ENODEV if fops is None else (f, fops)


def _rw(cpu: NativeCpu, fd: int, ubuf: int, size: int, write: bool) -> int | None:
    got = _file_ops(cpu, fd)
    if isinstance(got, int):
        return got
    f, fops = got
    if f.flags & O_ACCMODE == (O_RDONLY if write else O_WRONLY):
        return -EBADF
    op = fops.write if write else fops.read
    if op is None:
        return -EINVAL
    return op(cpu, f, ubuf, size)


def sys_lseek(cpu: NativeCpu, fd: int, offset: int, whence: int) -> int:
    """The new position (SEEK_SET, SEEK_CUR; the driver checks it at each
    read or write), or -errno: -ESPIPE on a stream (no_llseek), -EINVAL
    below 0 or past MAX_LFS (a larger one would come back looking like an
    error code, as Linux's vfs_setpos refuses it)."""
    got = _file_ops(cpu, fd)
    if isinstance(got, int):
        return got
    f, fops = got
    if fops.no_llseek:
        return -ESPIPE
    if offset >= 1 << 63:
        offset -= 1 << 64  # a negative offset, as the register held it
    base = {SEEK_SET: 0, SEEK_CUR: f.pos}.get(whence)
    if base is None or not 0 <= base + offset <= MAX_LFS:
        return -EINVAL
    f.pos = base + offset
    return f.pos


def sys_ioctl(cpu: NativeCpu, fd: int, cmd: int, arg: int) -> int:
    got = _file_ops(cpu, fd)
    if isinstance(got, int):
        return got
    f, fops = got
    return fops.ioctl(cpu, f, cmd, arg) if fops.ioctl is not None else -ENOTTY  # Linux's


def exit_files(cpu: NativeCpu, t: Ref) -> None:
    """Linux's exit_files: every file the exiting task holds is closed."""
    for fd in range(FIRST_FD, FIRST_FD + MAX_FDS):
        row = _slot(t, fd)
        if row:
            _put(cpu, file(cpu, row - 1))
    t.files = 0


register_exit_hook(exit_files)
