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

from hypervisor.devices.balloon.device import POSTCOPY_POLICIES, Balloon, BalloonHost
from hypervisor.devices.kinds import BUS, DeviceKind, register_kind
from hypervisor.devices.virtio.mmio import VirtioDevice

KIND = "balloon"

# the keys of an entry (beyond its place) and their JSON types: what the
# image checker demands
STATE_KEYS: dict[str, type] = {"num_pages": int, "actual": int, "stats_interval_ns": int,
                               "deflate_on_oom": bool, "postcopy": str}
# keys an image written before them lacks, and what such an image means
STATE_DEFAULTS: dict[str, Any] = {"postcopy": "drop"}


def save_state(bal: VirtioDevice) -> dict[str, Any]:
    """The balloon's own keys of its EMULATOR_CONTEXT entry."""
    if not isinstance(bal, Balloon):
        raise TypeError(f"{bal.name} is no balloon")
    return {"num_pages": bal.num_pages, "actual": bal.actual,
            "stats_interval_ns": bal.stats_interval_ns, "deflate_on_oom": bal.deflate_on_oom,
            "postcopy": bal.postcopy}


def new_state(stats_interval_ns: int, deflate_on_oom: bool, postcopy: str = "drop"
              ) -> dict[str, Any]:
    """A new balloon's state: its configuration, nothing inflated."""
    return {"kind": KIND, "bus": BUS, "num_pages": 0, "actual": 0,
            "stats_interval_ns": stats_interval_ns, "deflate_on_oom": deflate_on_oom,
            "postcopy": postcopy}


def restore_state(state: dict[str, Any], host: BalloonHost) -> Balloon:
    """A balloon as ``state`` (an entry save_state made, or new_state)
    describes it, ready for its creator to put behind a transport at
    ``state["base"]`` and ``state["port"]``."""
    bal = Balloon(host, state["stats_interval_ns"], state["deflate_on_oom"],
                  state.get("postcopy", STATE_DEFAULTS["postcopy"]))
    bal.num_pages, bal.actual = state["num_pages"], state["actual"]
    return bal


def _check(state: dict[str, Any]) -> str | None:
    if state.get("postcopy", "drop") not in POSTCOPY_POLICIES:
        return f"device post-copy policy {state['postcopy']!r} unknown"
    return None


def _make(hv: Any, dom: Any, state: dict[str, Any]) -> Balloon:
    return restore_state(state, balloon_host(hv, dom))


def balloon_host(hv: Any, dom: Any) -> BalloonHost:
    """What a balloon of ``dom`` is given: the frame table and the M2P, the
    frame release of XENMEM_decrease_reservation, the domain's TLB flush,
    the scheduler's timers."""
    machine = hv.machine
    absent = machine.memory.absent.absent
    return BalloonHost(dom.domid, machine.frames, machine.m2p,
                       lambda mfn: hv.reservation.remove_page(dom, mfn),
                       lambda: dom.flush_tlbs(), hv.scheduler, lambda: dom.is_running,
                       lambda mfn: bool(absent[mfn]))


BALLOON_KIND = register_kind(DeviceKind(KIND, Balloon, STATE_KEYS, save_state, _make,
                                        STATE_DEFAULTS, _check))
