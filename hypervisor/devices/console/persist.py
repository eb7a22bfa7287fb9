"""The console's state that an image carries: its ports, each a name, a
connection (socket or file) and a path. Nothing else goes across: the guest
reset the device before the save, so no queue, held buffer or guest-side
open is left, and a client connected to the old process is gone with it.
A restore listens on each socket again (a stale socket left at the path by
the old process is removed first): the port is closed until someone
connects, and the driver, which asks each port's state with PORT_READY
after its restore, hears PORT_OPEN 1 only if someone has.
"""

from __future__ import annotations

import re
from typing import Any

from hypervisor.devices.console.backend import CONNECTIONS
from hypervisor.devices.console.device import MAX_NAME, MAX_PORTS, Console, ConsoleHost
from hypervisor.devices.kinds import BUS, DeviceKind, register_kind
from hypervisor.devices.virtio.mmio import VirtioDevice

KIND = "console"
STATE_KEYS: dict[str, type] = {"ports": list}
PORT_KEYS = ("name", "connection", "path")
# The device nodes pvlab's guest makes for its other devices (the disks, the
# icmp socket, every port's vport0pN): a port of that name would take the node
# another driver needs, device nodes sharing one namespace.
RESERVED_NAMES = re.compile(r"vd[a-z]|icmp|vport\d+p\d+")


def save_state(con: VirtioDevice) -> dict[str, Any]:
    """The console's own keys of its EMULATOR_CONTEXT entry."""
    if not isinstance(con, Console):
        raise TypeError(f"{con.name} is no console")
    return {"ports": [{"name": p.name, "connection": p.backend.connection,
                       "path": p.backend.path} for p in con.ports.values()]}


def new_state(ports: list[tuple[str, str, str]]) -> dict[str, Any]:
    """A new console's state: (name, connection, path) of each port."""
    return {"kind": KIND, "bus": BUS,
            "ports": [dict(zip(PORT_KEYS, port, strict=True)) for port in ports]}


def check_ports(ports: list) -> str | None:
    """Why a list of ports cannot make a console, or None."""
    if len(ports) + 1 > MAX_PORTS:
        return f"{len(ports)} console ports: at most {MAX_PORTS - 1}"
    names = set()
    for port in ports:
        if not isinstance(port, dict) or set(port) != set(PORT_KEYS) \
                or not all(isinstance(port[k], str) for k in PORT_KEYS):
            return f"a console port must be {{name, connection, path}} strings: {port!r}"
        if port["connection"] not in CONNECTIONS:
            return f"console port connection {port['connection']!r} unknown"
        if not port["name"] or len(port["name"].encode()) > MAX_NAME:
            return f"console port name {port['name']!r}: 1 to {MAX_NAME} bytes"
        if RESERVED_NAMES.fullmatch(port["name"]):
            return (f"console port name {port['name']!r} is a device node of the guest's "
                    "(vd[a-z], icmp, vport0pN are reserved)")
        if port["name"] in names:
            return f"two console ports named {port['name']!r}"
        names.add(port["name"])
    return None


def restore_state(state: dict[str, Any], host: ConsoleHost) -> Console:
    """A console as ``state`` describes it, its sockets listening."""
    return Console(host, [(p["name"], p["connection"], p["path"]) for p in state["ports"]])


def console_host(hv: Any, dom: Any) -> ConsoleHost:
    """What a console of ``dom`` is given: the scheduler's timers."""
    return ConsoleHost(dom.domid, hv.scheduler, lambda: dom.is_running)


def _check(state: dict[str, Any]) -> str | None:
    return check_ports(state["ports"])


def _make(hv: Any, dom: Any, state: dict[str, Any]) -> Console:
    why = check_ports(state["ports"])
    if why:
        raise ValueError(why)
    return restore_state(state, console_host(hv, dom))


CONSOLE_KIND = register_kind(DeviceKind(KIND, Console, STATE_KEYS, save_state, _make,
                                        {}, _check))
