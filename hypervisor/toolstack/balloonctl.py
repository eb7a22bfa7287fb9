"""The host's balloon controls: what ``mem-set`` and ``balloon-stats`` do.

``mem-set MIB`` follows xl mem-set and QEMU's ``balloon``: the number is the
memory the guest should be left with, not the size of the balloon; the
balloon's target (num_pages) is the difference from the guest's memory.
"""

from __future__ import annotations

from hypervisor import domctl
from hypervisor.domctl import Balloon, BalloonError, Domain, Hypervisor
from hypervisor.public.xen import PAGE_SIZE
from hypervisor.toolstack.context import domain_of
from hypervisor.toolstack.timeparse import format_duration

PAGES_PER_MIB = (1 << 20) // PAGE_SIZE


def balloon_of(dom: Domain) -> Balloon:
    bal = domctl.find_device(dom, Balloon)
    if bal is not None:
        return bal
    raise BalloonError(f"domain {dom.name} has no balloon device (add a [balloon] table "
                       "to its configuration)")


def guest_pages(hv: Hypervisor, dom: Domain) -> int:
    """The guest's memory in pages: the entries of the p2m list it was built
    or restored with."""
    return domain_of(hv, dom).p2m_size


def memory_mib(hv: Hypervisor, dom: Domain) -> int:
    return guest_pages(hv, dom) // PAGES_PER_MIB


def mem_set(hv: Hypervisor, dom: Domain, target_mib: int) -> str:
    bal = balloon_of(dom)
    total = memory_mib(hv, dom)
    if not 1 <= target_mib <= total:
        raise BalloonError(f"mem-set {target_mib}: the target is the guest's memory in MiB, "
                           f"1 to its {total} MiB")
    bal.set_target((total - target_mib) * PAGES_PER_MIB)
    return (f"mem-set {target_mib}: balloon target {bal.num_pages} pages "
            f"({total - target_mib} MiB of the guest's {total} MiB)")


def stats_text(hv: Hypervisor, dom: Domain) -> str:
    bal = balloon_of(dom)
    info = bal.info()
    left = (guest_pages(hv, dom) - info["actual"]) / PAGES_PER_MIB
    lines = [f"balloon of {dom.name}: target {info['num_pages']} pages, actual "
             f"{info['actual']} pages; the guest has {left:.1f} of its {memory_mib(hv, dom)} MiB"
             f"; post-copy policy {info['postcopy']}"
             + (f"; inhibited ({info['inhibits']}, {info['queued']} requests queued)"
                if info["inhibits"] else "")]
    if not bal.stats_interval_ns:
        # without a poll the only statistics are the driver's first, from boot
        lines.append("  no statistics interval: the host never asks for statistics (set "
                     "stats_interval in the configuration's [balloon] table)")
    elif info["stats_updated_ns"] is None:
        lines.append("  no statistics from the guest yet")
    else:
        lines.append(f"  statistics of {format_duration(info['stats_updated_ns'])}:")
        lines += [f"    {name:<18} {value}" for name, value in info["stats"].items()]
    counters = info["counters"]
    if counters:
        lines.append("  device: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    return "\n".join(lines)


def apply(hv: Hypervisor, dom: Domain, command: str, value: str) -> str:
    """A balloon request of a run; a refusal is said, not raised."""
    try:
        if command == "mem-set":
            return mem_set(hv, dom, int(value))
        if command == "balloon-stats":
            return stats_text(hv, dom)
        if command == "balloon-inhibit":
            bal = balloon_of(dom)
            bal.inhibit()
            return f"balloon inhibited ({bal.inhibits})"
        if command == "balloon-uninhibit":
            bal = balloon_of(dom)
            done = released(bal)  # first: it drops the inhibit the line counts
            return f"balloon inhibit released ({bal.inhibits} left); {done}"
    except BalloonError as e:
        return f"{command} refused: {e}"
    raise ValueError(f"unknown balloon command {command!r}")


def released(bal: Balloon) -> str:
    """What the last uninhibit did, as the policy says (uninhibit first)."""
    freed = bal.uninhibit()
    if bal.inhibits:
        return "still inhibited"
    now, then = bal.metrics, bal.metrics_at_inhibit  # this inhibit's requests only
    if bal.postcopy == "drop":
        return (f"policy drop: {now.dropped - then.dropped} inflated frames were left with the "
                f"domain, {now.dropped_deflates - then.dropped_deflates} deflates ignored")
    return f"policy reconcile: {freed} queued frames freed, {now.kept - then.kept} kept"


# --- post-copy's inhibit (QEMU's virtio_balloon_inhibited during incoming post-copy) ------

def postcopy_inhibit(dom: Domain) -> None:
    """Post-copy starts on the destination: the domain's balloon (if it has
    one) stops acting on the guest's requests, as its policy says, until
    ``postcopy_release``; the host changes no target meanwhile."""
    bal = domctl.find_device(dom, Balloon)
    if bal is not None:
        bal.inhibit()


def postcopy_release(dom: Domain) -> str:
    """The last page of a post-copy has arrived: the inhibit taken by
    ``postcopy_inhibit`` goes, and under ``reconcile`` the queued requests
    are applied. Returns a line saying what that did ("" for a domain
    without a balloon)."""
    bal = domctl.find_device(dom, Balloon)
    if bal is None:
        return ""
    return f"balloon inhibit released; {released(bal)}"
