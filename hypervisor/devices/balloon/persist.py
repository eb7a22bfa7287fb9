"""The balloon's state that an image carries (Firecracker's balloon/persist.rs).

A save writes one entry per device in an EMULATOR_CONTEXT record of the image, as
JSON; ``save_state`` makes the balloon's entry, ``restore_state`` makes a
balloon again from it. The entry says where the device is (the transport's
base and port: the guest knows them from its command line) and what the host
keeps of it: its configuration (with its post-copy policy, which follows the
domain) and its target and actual, which the guest's ``keep`` policy relies
on across a save.

Nothing else goes across, by design. The guest has reset the device before
it is saved, so no virtqueue, no held statistics buffer and no interrupt are
left to carry. An inhibit is the host's (a post-copy's) and ends with the
host it was taken on. A save may come while one is held (a balloon-inhibit
request, then a checkpoint), but the requests it queued need not go across:
a queued inflate's frame has no pfn in the guest's p2m, so the save does not
write it and the restored domain never has it (what the release would have
freed), and a frame the guest took back is in its p2m and saved as any
other; a queued deflate only named a frame the domain already holds.
"""

from __future__ import annotations

from typing import Any

from hypervisor.devices.balloon.device import Balloon, BalloonHost
from hypervisor.devices.virtio.mmio import VirtioMmio

BUS = "virtio-mmio"
KIND = "balloon"

# the keys of an entry and their JSON types: what the image checker demands
STATE_KEYS: dict[str, type] = {"bus": str, "base": int, "port": int, "kind": str,
                               "num_pages": int, "actual": int, "stats_interval_ns": int,
                               "deflate_on_oom": bool, "postcopy": str}
# keys an image written before them lacks, and what such an image means
STATE_DEFAULTS: dict[str, Any] = {"postcopy": "drop"}


def save_state(transport: VirtioMmio) -> dict[str, Any]:
    """The EMULATOR_CONTEXT entry of the balloon behind ``transport``."""
    bal = transport.device
    if not isinstance(bal, Balloon):
        raise TypeError(f"{bal.name} is no balloon")
    return {"bus": BUS, "base": transport.base, "port": transport.port, "kind": KIND,
            "num_pages": bal.num_pages, "actual": bal.actual,
            "stats_interval_ns": bal.stats_interval_ns, "deflate_on_oom": bal.deflate_on_oom,
            "postcopy": bal.postcopy}


def restore_state(state: dict[str, Any], host: BalloonHost) -> Balloon:
    """A balloon as ``state`` (an entry save_state made) describes it, ready
    for its creator to put behind a transport at ``state["base"]`` and
    ``state["port"]``."""
    bal = Balloon(host, state["stats_interval_ns"], state["deflate_on_oom"],
                  state.get("postcopy", STATE_DEFAULTS["postcopy"]))
    bal.num_pages, bal.actual = state["num_pages"], state["actual"]
    return bal
