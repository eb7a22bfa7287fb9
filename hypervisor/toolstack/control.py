"""What the toolstack asks of a running guest, and the suspend handshake
(tools/libs/light/libxl_dom_suspend.c, tools/libs/ctrl/xc_resume.c).

A shutdown request is a write of ``control/shutdown`` in the guest's
xenstore home; the guest acknowledges a command it will carry out by writing
"" back. For a suspend the toolstack then waits for the domain to shut down
with reason suspend; without an acknowledgement in ACK_TIMEOUT_NS it clears
the request itself and gives up, as libxl does ("guest didn't acknowledge
suspend, cancelling request").

A suspended domain that is not saved away is resumed *cancelled*: the
toolstack writes 1 into vcpu0's rax (the suspend hypercall's result; rip is
already past the hypercall) and unpauses it, as xc_domain_resume does for a
guest that supports the cooperative resume. The guest then goes the THAW way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.toolstack.context import context_of
from hypervisor.toolstack.timeparse import parse_duration
from hypervisor.toolstack.xenstored import XsError, home

SHUTDOWN_NODE = "control/shutdown"
COMMANDS = ("poweroff", "halt", "reboot", "suspend")
# a suspend whose image is kept, and the host's balloon controls
TOOLSTACK_COMMANDS = ("checkpoint", "mem-set", "balloon-stats", "balloon-inhibit",
                      "balloon-uninhibit")
# a suspend whose image is written to PATH, the domain destroyed (xl save): the
# command line's run and restore make it through session.suspend_and_save
SAVE = "save"
# the same, live: pre-copy rounds while the guest runs, then the suspend
SAVE_LIVE = "save-live"
# a live migration to DEST (xl migrate): transport.parse_destination reads DEST
MIGRATE = "migrate"
# input typed on the guest's console (its text with backslash escapes)
TYPE = "type"
_TYPE_RE = re.compile(r"^\s*(\S+)\s+type (.*)$", re.DOTALL)
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "\\": b"\\", "e": b"\x1b"}
ACK_TIMEOUT_NS = 500_000_000  # virtual time; libxl waits 60 s of real time


@dataclass(frozen=True)
class Request:
    """At ``at_ns`` of virtual time: a shutdown command, or a xenstore write."""

    at_ns: int
    command: str = ""                 # one of COMMANDS or TOOLSTACK_COMMANDS
    path: str = ""                    # or write VALUE at PATH (relative to the home)
    value: str = ""                   # (mem-set: the target in MiB; save: the image)

    @property
    def shutdown(self) -> bool:
        """A request the guest carries out through control/shutdown."""
        return self.command in COMMANDS or self.command == "checkpoint"


def parse_request(text: str) -> Request:
    """'TIME COMMAND' or 'TIME PATH=VALUE', e.g. '15ms suspend', '5ms mem-set 32',
    '2ms memory/target=8192', '3ms type hello\\n'."""
    typed = _TYPE_RE.match(text)
    if typed:
        console_bytes(typed.group(2))  # a bad escape is bad input now, not at 3ms
        return Request(parse_duration(typed.group(1)), command=TYPE, value=typed.group(2))
    parts = text.split(None, 1)
    known = ", ".join(COMMANDS + TOOLSTACK_COMMANDS + (f"{SAVE} PATH", f"{SAVE_LIVE} PATH",
                                                        f"{MIGRATE} DEST", f"{TYPE} TEXT"))
    if len(parts) != 2:
        raise ValueError(f"request {text!r}: want 'TIME WHAT', e.g. '15ms suspend' "
                         f"(WHAT: {known}, or PATH=VALUE)")
    at = parse_duration(parts[0])
    what = parts[1].strip()
    if what in COMMANDS or (what in TOOLSTACK_COMMANDS and what != "mem-set"):
        return Request(at, command=what)
    verb, _, arg = what.partition(" ")
    if verb in (SAVE, SAVE_LIVE):
        if not arg.strip():
            raise ValueError(f"request {text!r}: {verb} takes the image's path, e.g. "
                             f"'5ms {verb} guest.img'")
        return Request(at, command=verb, value=arg.strip())
    if verb == MIGRATE:
        if not arg.strip():
            raise ValueError(f"request {text!r}: migrate takes the target, e.g. "
                             "'8ms migrate 127.0.0.1:7001' or '8ms migrate ssh:HOST'")
        return Request(at, command=verb, value=arg.strip())
    if verb == "mem-set":
        if not arg.strip().isdigit():
            raise ValueError(f"request {text!r}: mem-set takes the guest's memory target "
                             "in MiB, e.g. '5ms mem-set 32'")
        return Request(at, command=verb, value=arg.strip())
    path, eq, value = what.partition("=")
    if not eq or not path or any(c.isspace() for c in path):
        raise ValueError(f"request {text!r}: {what!r} is neither a command "
                         f"({known}) nor PATH=VALUE")
    return Request(at, path=path.strip(), value=value.strip())


def console_bytes(text: str) -> bytes:
    """The bytes a ``type`` request's text stands for: UTF-8, with the
    escapes \\n, \\r, \\t, \\e (escape), \\\\ and \\xHH; ValueError for another."""
    out, i = bytearray(), 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt]
            i += 2
        elif nxt == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2:i + 4]):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            raise ValueError(f"type {text!r}: unknown escape {text[i:i + 2]!r} (known: "
                             "\\n \\r \\t \\e \\\\ \\xHH)")
    return bytes(out)


def type_on_console(hv: Hypervisor, dom: Domain, data: bytes) -> None:
    """Input for the guest's console, through its console daemon."""
    backend = context_of(hv).domain(dom).console
    if backend is not None:
        backend.feed(data)


def apply_request(hv: Hypervisor, dom: Domain, req: Request) -> str:
    """Make the request; returns what the toolstack has to say of it ("" if nothing)."""
    if req.command == TYPE:
        type_on_console(hv, dom, console_bytes(req.value))
    elif req.shutdown:
        command = "suspend" if req.command == "checkpoint" else req.command
        context_of(hv).xenstore().write(f"{home(dom.domid)}/{SHUTDOWN_NODE}",
                                        command.encode())
    elif req.command:
        from hypervisor.toolstack import balloonctl
        return balloonctl.apply(hv, dom, req.command, req.value)
    else:
        path = req.path if req.path.startswith("/") else f"{home(dom.domid)}/{req.path}"
        context_of(hv).xenstore().write(path, req.value.encode())
    return ""


def shutdown_pending(hv: Hypervisor, dom: Domain) -> str:
    """The unacknowledged command in control/shutdown, or ""."""
    try:
        return context_of(hv).xenstore().read(f"{home(dom.domid)}/{SHUTDOWN_NODE}").decode()
    except XsError:
        return ""


def cancel_shutdown(hv: Hypervisor, dom: Domain) -> None:
    context_of(hv).xenstore().write(f"{home(dom.domid)}/{SHUTDOWN_NODE}", b"")


def resume_cancelled(hv: Hypervisor, dom: Domain) -> None:
    """Resume a domain shut down for suspend, the suspend hypercall returning 1."""
    if dom.shutdown_reason != SHUTDOWN_suspend:
        raise ValueError(f"domain {dom.name} is not suspended")
    domctl.modify_returncode(dom, 1)
    domctl.resumedomain(hv, dom)
