"""Device kinds: what the toolstack needs to make, save, check and re-create
each kind of device model. Each kind's own package registers itself here
(``register_kind``), as a Linux driver registers with its bus: this module,
domctl and the toolstack name no kind.

A kind's state is one JSON object, the device's EMULATOR_CONTEXT entry in
an image. A new device is made from the same object, its configuration
(with the keys a restore carries, num_pages or a disk's path, at their
defaults): one ``make`` serves a build and a restore, so that what a restore
makes is what a build would have made with the saved state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypervisor.devices.virtio.mmio import VirtioDevice, VirtioMmio

BUS = "virtio-mmio"
# every entry's place: the transport's, written by the save for every kind
PLACE_KEYS: dict[str, type] = {"bus": str, "base": int, "port": int, "kind": str}

# make(hv, dom, state): a model as the state describes it, for the creator
# to put behind a transport at state["base"] and state["port"]
Make = Callable[[Any, Any, dict[str, Any]], VirtioDevice]


@dataclass(frozen=True)
class DeviceKind:
    """One kind of device model, as its package declares it."""

    name: str                                   # "balloon", "console", "blk", "net"
    model: type                                 # its VirtioDevice class
    state_keys: dict[str, type]                 # its own keys and their JSON types
    save_state: Callable[[VirtioDevice], dict[str, Any]]  # its own keys, from the model
    make: Make
    state_defaults: dict[str, Any] = field(default_factory=dict)  # keys older images lack
    check: Callable[[dict[str, Any]], str | None] = lambda state: None  # beyond keys, types


_KINDS: dict[str, DeviceKind] = {}


def register_kind(kind: DeviceKind) -> DeviceKind:
    """Make ``kind`` known to the save, the restore and the image checker."""
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"device kind {kind.name!r} registered twice")
    _KINDS[kind.name] = kind
    return kind


def kind_named(name: str) -> DeviceKind | None:
    return _KINDS.get(name)


def kind_names() -> list[str]:
    return sorted(_KINDS)


def kind_of(device: VirtioDevice) -> DeviceKind:
    for kind in _KINDS.values():
        if isinstance(device, kind.model):
            return kind
    raise TypeError(f"{device.name}: a device of no registered kind")


def save_entry(transport: VirtioMmio) -> dict[str, Any]:
    """The EMULATOR_CONTEXT entry of the device behind ``transport``."""
    kind = kind_of(transport.device)
    return {"bus": BUS, "base": transport.base, "port": transport.port, "kind": kind.name,
            **kind.save_state(transport.device)}


def with_defaults(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the keys an older image lacks at what they meant then."""
    kind = _KINDS[state["kind"]]
    return {**kind.state_defaults, **state}


def check_entry(state: object) -> str | None:
    """Why an EMULATOR_CONTEXT entry cannot be restored, or None: a kind this
    hypervisor knows, with every key of its declared state and type."""
    if not isinstance(state, dict) or state.get("bus") != BUS \
            or not isinstance(state.get("kind"), str) or state["kind"] not in _KINDS:
        return f"a device this restorer does not know: {state!r}"
    kind = _KINDS[state["kind"]]
    for key, want in {**PLACE_KEYS, **kind.state_keys}.items():
        if key not in state and key in kind.state_defaults:
            continue  # an image from before the key
        value = state.get(key)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            return f"device {key} is missing or not {want.__name__}"
    return kind.check(state)
