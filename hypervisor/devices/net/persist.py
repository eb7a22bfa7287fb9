"""The network device's state that an image carries (Firecracker's
net/persist.rs).

The entry holds the MAC and the backend's configuration (the user network,
or a socket's listen/connect address), so that a restore opens the backend
again: a listener listens again at its address, a connector dials its peer
again. ``announce`` is true in every saved entry: the device made from it
asks the guest to announce itself once it is ready (QEMU's
virtio_net_post_load_device), because the peers' ARP caches and the
switches may have lost it while it was away. A new device's entry has it
false.

Nothing else goes across: the guest reset the device before the save, so
no queue, no posted buffer and no frame in flight are left; frames the
backend had not delivered stay in the old process's socket and are lost
with it.
"""

from __future__ import annotations

from typing import Any

from hypervisor.devices.kinds import BUS, DeviceKind, register_kind
from hypervisor.devices.net.backend import BackendError, open_backend, parse_address
from hypervisor.devices.net.device import Net, NetHost
from hypervisor.devices.virtio.mmio import VirtioDevice
from hypervisor.public.io.inet import mac_aton

KIND = "net"

STATE_KEYS: dict[str, type] = {"mac": str, "backend": dict, "announce": bool}


def save_state(net: VirtioDevice) -> dict[str, Any]:
    """The device's own keys of its EMULATOR_CONTEXT entry."""
    if not isinstance(net, Net):
        raise TypeError(f"{net.name} is no network device")
    return {"mac": net.mac.hex(":"), "backend": net.backend.config(), "announce": True}


def new_state(mac: str, backend: dict[str, Any]) -> dict[str, Any]:
    """A new device's state: its MAC and backend, nothing to announce."""
    return {"kind": KIND, "bus": BUS, "mac": mac, "backend": dict(backend), "announce": False}


def restore_state(state: dict[str, Any], host: NetHost) -> Net:
    """A device as ``state`` describes it, its backend opened (BackendError
    if it cannot be), for its creator to put behind a transport."""
    backend = open_backend(state["backend"])
    return Net(host, mac_aton(state["mac"]), backend, announce=state["announce"])


def _check(state: dict[str, Any]) -> str | None:
    try:
        mac_aton(state["mac"])
    except ValueError as e:
        return f"device mac: {e}"
    backend = state["backend"]
    if backend.get("type") not in ("user", "socket"):
        return f"device backend type {backend.get('type')!r} unknown (user or socket)"
    if backend["type"] == "socket":
        modes = [k for k in ("listen", "connect") if k in backend]
        if len(modes) != 1:
            return "a socket backend needs one of listen or connect"
        address = backend[modes[0]]
        if not isinstance(address, str):
            return f"device backend {modes[0]} {address!r} is no address string"
        try:
            parse_address(address)  # what the restore parses
        except BackendError as e:
            return str(e)
    return None


def net_host(hv: Any, dom: Any) -> NetHost:
    """What a network device of ``dom`` is given: the scheduler's timers and
    whether the domain runs."""
    return NetHost(dom.domid, hv.scheduler, lambda: dom.is_running)


def _make(hv: Any, dom: Any, state: dict[str, Any]) -> Net:
    try:
        return restore_state(state, net_host(hv, dom))
    except BackendError as e:
        raise ValueError(str(e)) from None


NET_KIND = register_kind(DeviceKind(KIND, Net, STATE_KEYS, save_state, _make, {}, _check))
