"""The console as a terminal: Linux's hvc layer (drivers/tty/hvc/hvc_console.c,
hvc_xen.c) and its line discipline, n_tty in canonical mode
(drivers/tty/n_tty.c).

Input arrives in the console ring's ``in`` half; the console's interrupt
(``hvc_interrupt``, on cpu0) takes it (``domU_read_console``) and hands it
to the line discipline, which keeps it in a line buffer in kernel data: a
line is complete at ``\\n`` (``\\r`` is taken as one, n_tty's ICRNL) or at
Ctrl-D (EOF: the line ends without it; a Ctrl-D alone makes a read return
0); DEL or backspace erases the last character of a line not yet complete.
A ``read`` of the console returns at most one line (the rest of a long one
stays for the next read) and blocks while no line is complete; a complete
line wakes the blocked readers.

Echo is the guest's business, as n_tty's ECHO: each character taken is
written back to the console (an erase as backspace, space, backspace), so
the daemon and the person's terminal pass bytes through untouched (xl's
console puts the terminal in raw mode for that). Input that finds the
buffer full is dropped, as n_tty drops it, except that a newline always
finds room.

The irq is bound when the console is first read (hvc_open binds it as
notifier_add_irq does): until then input waits in the ring, and a guest
that never reads takes no interrupts for it. A new domain gives the irq its
new port (``xen_console_resume``); what was in the ring and the line buffer
at the save is in guest memory and comes along.
"""

from __future__ import annotations

from guestos.evtchn import bind_evtchn_to_irqhandler, rebind_evtchn_irq
from guestos.kdata import AREAS
from guestos.layout import Layout, Ref
from guestos.printk import console_out
from guestos.symbols import export
from guestos.task import WAIT_TTY_READ, wake_up_waiters
from guestos.usercopy import copy_to_user
from guestos.xencons import domU_read_console, xencons
from hypervisor.public.errno import EFAULT
from hypervisor.public.native import NativeCpu

N_TTY_BUF_SIZE = 4096
EOF_CHAR, ERASE_CHARS, CR, NL = 0x04, (0x7F, 0x08), 0x0D, 0x0A

TTY = Layout("tty", [
    ("opened", "u64"),   # the console irq is bound (0: never read yet)
    ("irq", "u64"),
    ("count", "u64"),    # bytes in the line buffer
    ("canon", "u64"),    # of which the first ``canon`` form complete lines
])
READ_BUF_OFFSET = 64
assert TTY.size <= READ_BUF_OFFSET
assert READ_BUF_OFFSET + N_TTY_BUF_SIZE <= AREAS["tty"].size


def tty(cpu: NativeCpu) -> Ref:
    return TTY.at(cpu, AREAS["tty"].va(cpu))


def _read_buf(cpu: NativeCpu) -> int:
    return AREAS["tty"].va(cpu) + READ_BUF_OFFSET


def n_tty_receive_buf(cpu: NativeCpu, data: bytes) -> None:
    """Take input into the line buffer, echo it, wake the readers if a line
    completed."""
    t = tty(cpu)
    buf = bytearray(cpu.read(_read_buf(cpu), t.count))
    canon, echo = t.canon, bytearray()
    for c in data:
        c = NL if c == CR else c
        if c in ERASE_CHARS:
            if len(buf) > canon:
                buf.pop()
                echo += b"\b \b"
        elif c in (NL, EOF_CHAR):
            if len(buf) < N_TTY_BUF_SIZE:
                buf.append(c)
                canon = len(buf)
                echo += b"\n" if c == NL else b""
        elif len(buf) < N_TTY_BUF_SIZE - 1:  # room kept for the newline
            buf.append(c)
            echo.append(c)
    cpu.write(_read_buf(cpu), bytes(buf))
    completed = canon > t.canon
    t.count, t.canon = len(buf), canon
    if echo:
        console_out(cpu, bytes(echo))
    if completed:
        wake_up_waiters(cpu, WAIT_TTY_READ)


def n_tty_read(cpu: NativeCpu, ubuf: int, size: int) -> int | None:
    """Up to ``size`` bytes of the first complete line into the user's
    buffer: their number (0 at EOF), -EFAULT, or None if no line is complete
    yet (the caller blocks)."""
    t = tty(cpu)
    if t.canon == 0:
        return None
    buf = cpu.read(_read_buf(cpu), t.count)
    end = next(i for i in range(t.canon) if buf[i] in (NL, EOF_CHAR))
    line = buf[:end + 1] if buf[end] == NL else buf[:end]
    take = min(size, len(line))
    if not copy_to_user(cpu, ubuf, line[:take]):
        return -EFAULT
    used = take + (1 if take == len(line) and buf[end] == EOF_CHAR else 0)
    cpu.write(_read_buf(cpu), buf[used:])
    t.count, t.canon = t.count - used, t.canon - used
    return take


@export
def hvc_interrupt(cpu: NativeCpu, irq: int, dev_id: int) -> None:
    """The console's event (hvc_poll): input to the line discipline."""
    data = domU_read_console(cpu)
    if data:
        n_tty_receive_buf(cpu, data)


def tty_open(cpu: NativeCpu) -> None:
    """At the first read: bind the console's irq on cpu0, and take the input
    that waited in the ring meanwhile."""
    t = tty(cpu)
    if t.opened:
        return
    t.irq = bind_evtchn_to_irqhandler(cpu, xencons(cpu).port, hvc_interrupt)
    t.opened = 1
    hvc_interrupt(cpu, t.irq, 0)


def xen_console_resume(cpu: NativeCpu) -> None:
    """In a new domain: the console's irq gets the new port (xencons_init
    read it from start_info)."""
    t = tty(cpu)
    if t.opened:
        rebind_evtchn_irq(cpu, xencons(cpu).port, t.irq)
