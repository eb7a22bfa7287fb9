"""The one toolstack layer (libxl): what is done to a domain, whoever asks.

Two loops drive domains: the scripted run (session.run_domain: one domain,
requests at virtual times, as ``pvlab run``/``save``/``restore``/
``checkpoint`` make them) and the host daemon (daemon.py: many domains,
commands at any moment, as ``xl`` sends them). Both call the functions here,
as xl and every other libxl client share libxl:

* domains: create (build from a configuration), restore (an image into the
  running machine), rename, destroy, pause, unpause (libxl_domain_create_new,
  libxl_domain_create_restore, libxl_domain_rename, libxl_domain_destroy,
  libxl_domain_pause);
* requests of the guest: a shutdown command written into control/shutdown,
  with its acknowledgement awaited (``make_request``, ``check_acknowledged``:
  libxl_domain_shutdown and the suspend's acknowledgement wait);
* the suspend's completion (domain_suspend_common_done): what was asked for
  the suspend is done once the domain has suspended: a save to a file (the
  domain destroyed after it, or resumed for a checkpoint), a numbered
  checkpoint, or nothing (the suspend is cancelled); a failed save resumes
  the guest cancelled with nothing left at the path;
* memory: mem-set (the balloon's target) and mem-max (libxl_set_memory_target,
  libxl_domain_setmaxmem);
* what ``xl list``, ``xl vcpu-list`` and ``xl info`` show (libxl_list_domain,
  libxl_list_vcpu, libxl_get_physinfo).

Each domain's requests in flight are a ``DomainState``, kept by the loop
that drives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisor import domctl
from hypervisor.domctl import BalloonError, Domain, Hypervisor
from hypervisor.public.sched import SHUTDOWN_crash
from hypervisor.public.xen import PAGE_SIZE
from hypervisor.toolstack import balloonctl
from hypervisor.toolstack.builder import BuildError, build_domain
from hypervisor.toolstack.checkpoint import CheckpointWriter, SaveOutcome, try_save
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.context import context_of, domain_of
from hypervisor.toolstack.control import (
    ACK_TIMEOUT_NS,
    Request,
    apply_request,
    cancel_shutdown,
    resume_cancelled,
    shutdown_pending,
)
from hypervisor.toolstack.save import Progress
from hypervisor.toolstack.timeparse import format_duration
from hypervisor.toolstack.xenstored import home

log = logging.getLogger(__name__)

KIB_PER_PAGE = PAGE_SIZE // 1024
SUSPEND_TIMEOUT_NS = 2_000_000_000  # system time from a save's request to the suspend


class LibxlError(Exception):
    """A request refused; nothing was changed."""


@dataclass
class SuspendJob:
    """What to do once the domain suspends: write the image to ``path`` (then
    destroy the domain, or with ``checkpoint`` resume it), or with ``writer``
    take the next numbered checkpoint."""

    path: Path | None = None
    checkpoint: bool = False
    writer: CheckpointWriter | None = None
    seed: int | None = None
    progress: Progress | None = None


@dataclass
class DomainState:
    """A domain's requests in flight (libxl's per-domain ao state)."""

    ack_deadline: int | None = None   # when an unacknowledged command is given up
    unacknowledged: str = ""          # the last command the guest did not acknowledge
    suspend: SuspendJob | None = None  # what its next suspend is for


@dataclass
class SuspendDone:
    """What came of a suspend: whether the domain runs on, what the toolstack
    says of it, and the save's outcome if it was one."""

    runs_on: bool
    line: str
    outcome: SaveOutcome | None = None


# --- domains -------------------------------------------------------------------------

def find_domain(hv: Hypervisor, which: str | int) -> Domain | None:
    """A domain by its name or domid (xl's find_domain)."""
    for dom in domctl.getdomaininfolist(hv):
        if dom.name == str(which) or str(dom.domid) == str(which):
            return dom
    return None


def _check_name(hv: Hypervisor, name: str) -> None:
    """libxl refuses a second domain of one name (libxl__domain_rename)."""
    if any(d.name == name for d in domctl.getdomaininfolist(hv)):
        raise LibxlError(f'domain with name "{name}" already exists')


def create_domain(hv: Hypervisor, cfg: DomainConfig, paused: bool = False) -> Domain:
    """libxl_domain_create_new: build the domain; it runs unless ``paused``.
    A taken name or a failed build leaves nothing behind."""
    _check_name(hv, cfg.name)
    dom = build_domain(hv, cfg)
    if paused:
        domctl.pausedomain(dom)
    return dom


def restore_domain(hv: Hypervisor, path: str | Path, paused: bool = False,
                   seed: int | None = None, progress: Progress | None = None) -> Domain:
    """libxl_domain_create_restore: the image into this machine, beside its
    other domains. A bad image (ImageError) or a failed restore
    (RestoreError) leaves nothing behind."""
    from hypervisor.toolstack.image import scan_image
    from hypervisor.toolstack.restore import restore_image
    info = scan_image(path)
    if info.domain is not None and info.domain.get("name"):
        _check_name(hv, str(info.domain["name"]))
    _, dom, _ = restore_image(path, seed=seed, hv=hv, progress=progress)
    if paused:
        domctl.pausedomain(dom)
    return dom


def rename_domain(hv: Hypervisor, dom: Domain, old_name: str, new_name: str) -> None:
    """libxl_domain_rename: the domain must still be called ``old_name`` and
    ``new_name`` be free; the name changes where getdomaininfo shows it and
    in the domain's xenstore home. LibxlError if refused (nothing changed)."""
    if dom.name != old_name:
        raise LibxlError(f'domain {dom.domid} is called "{dom.name}", not "{old_name}"')
    if new_name != old_name:
        _check_name(hv, new_name)
    domctl.setdomainname(dom, new_name)
    context_of(hv).xenstore().write(f"{home(dom.domid)}/name", new_name.encode())


def destroy_domain(hv: Hypervisor, dom: Domain) -> None:
    """libxl_domain_destroy: the domain and everything the toolstack kept of it."""
    domctl.destroydomain(hv, dom)


def pause(dom: Domain) -> None:
    domctl.pausedomain(dom)


def unpause(dom: Domain) -> None:
    domctl.unpausedomain(dom)


# --- requests of the guest and their acknowledgement ----------------------------------

def make_request(hv: Hypervisor, dom: Domain, st: DomainState, req: Request) -> str:
    """Make the request (control.apply_request); a shutdown command's
    acknowledgement is awaited until ACK_TIMEOUT_NS after ``req.at_ns``.
    Returns what the toolstack says of it ("" if nothing)."""
    msg = apply_request(hv, dom, req)
    if req.shutdown:
        st.ack_deadline = req.at_ns + ACK_TIMEOUT_NS
    return msg


def check_acknowledged(hv: Hypervisor, dom: Domain, st: DomainState, now_ns: int) -> str:
    """At ``now_ns``: the command the guest did not acknowledge in time, which
    is then cleared, with the suspend it was for (libxl: "guest didn't
    acknowledge suspend, cancelling request"); "" if none."""
    if st.ack_deadline is None:
        return ""
    waiting = shutdown_pending(hv, dom)
    if not waiting:
        st.ack_deadline = None
        return ""
    if now_ns < st.ack_deadline:
        return ""
    st.unacknowledged = waiting
    cancel_shutdown(hv, dom)
    st.suspend = None
    st.ack_deadline = None
    return waiting


def why_not_suspended(shut_down: str, unacknowledged: bool, time_words: str) -> str:
    """Why a save made nothing: the guest shut down first (``shut_down``, its
    reason), did not acknowledge the request, or did not suspend in time
    (``time_words`` says whose time the limits are)."""
    if shut_down:
        return f"the guest shut down ({shut_down}) before it suspended"
    if unacknowledged:
        return (f"the guest did not acknowledge the suspend request (control/shutdown) "
                f"within {format_duration(ACK_TIMEOUT_NS)} {time_words}: is it built "
                "without save/restore support?")
    return (f"the guest did not suspend within {format_duration(SUSPEND_TIMEOUT_NS)} "
            f"{time_words} of the request")


def complete_suspend(hv: Hypervisor, dom: Domain, st: DomainState) -> SuspendDone:
    """The domain suspended: do what the suspend was for (domain_suspend_common_done).
    A save to a file that worked leaves it suspended, for ``destroy_saved``;
    everything else resumes it cancelled (its suspend hypercall returns 1)."""
    job, st.suspend = st.suspend, None
    st.ack_deadline = None
    if job is None:
        resume_cancelled(hv, dom)
        return SuspendDone(True, f"domain {dom.name} suspended; resuming it: the suspend is "
                                 "cancelled (the suspend hypercall returns 1)")
    if job.writer is not None:
        outcome, line = job.writer.take(hv, dom)
        resume_cancelled(hv, dom)
        return SuspendDone(True, line, outcome)
    assert job.path is not None
    outcome = save_suspended(hv, dom, job.path, job.checkpoint, job.seed, job.progress)
    return SuspendDone(not outcome.ok or job.checkpoint, outcome.error, outcome)


def save_suspended(hv: Hypervisor, dom: Domain, path: Path, checkpoint: bool = False,
                   seed: int | None = None, progress: Progress | None = None) -> SaveOutcome:
    """Write the image of a suspended domain to ``path``. On failure nothing is
    at ``path`` and the guest runs on (resumed cancelled); a checkpoint is
    resumed cancelled too. A finished save leaves the domain suspended."""
    outcome = try_save(hv, dom, Path(path), checkpoint=checkpoint, seed=seed,
                       progress=progress)
    if not outcome.ok:
        outcome.error = (f"{outcome.error}; nothing was written, the guest runs on "
                         "(its suspend hypercall returned 1)")
        resume_cancelled(hv, dom)
    elif checkpoint:
        resume_cancelled(hv, dom)
    return outcome


def destroy_saved(hv: Hypervisor, dom: Domain,
                  note: Callable[[str], None] | None = None) -> None:
    """After a save: the domain goes. Input typed but not yet in the guest's
    ring is the console daemon's and goes with it, as xenconsoled's buffer
    does: said, not kept (what is in the ring is guest memory, and is in the
    image)."""
    backend = domain_of(hv, dom).console
    if backend is not None and backend.pending_input:
        msg = (f"{len(backend.pending_input)} bytes typed on the console were not yet in the "
               "guest's ring: they are dropped with the domain, as xenconsoled drops them")
        log.info("%s", msg)
        if note is not None:
            note(msg)
    domctl.destroydomain(hv, dom)


# --- memory --------------------------------------------------------------------------

def mem_set(hv: Hypervisor, dom: Domain, kib: int) -> str:
    """libxl_set_memory_target: the balloon's target, as the memory the guest
    is to be left with; LibxlError if refused."""
    try:
        return balloonctl.mem_set(hv, dom, kib // 1024)
    except BalloonError as e:
        raise LibxlError(str(e)) from None


def mem_max(hv: Hypervisor, dom: Domain, kib: int) -> None:
    """libxl_domain_setmaxmem: the most the domain's reservation may hold;
    not below what it holds now (libxl refuses that too)."""
    pages = kib // KIB_PER_PAGE
    if pages < dom.tot_pages:
        raise LibxlError(f"memory_static_max {kib} KiB is below the domain's current "
                         f"{dom.tot_pages * KIB_PER_PAGE} KiB")
    domctl.max_mem(dom, pages)


def balloon_kib(hv: Hypervisor, dom: Domain) -> tuple[int, int] | None:
    """The guest's memory with its balloon as it is and as the target asks
    (KiB), or None without a balloon."""
    bal = domctl.find_device(dom, domctl.Balloon)
    if bal is None:
        return None
    info = bal.info()
    pages = balloonctl.guest_pages(hv, dom)
    return ((pages - info["actual"]) * KIB_PER_PAGE, (pages - info["num_pages"]) * KIB_PER_PAGE)


# --- what xl list, vcpu-list and info show ------------------------------------------

def state_letters(dom: Domain) -> str:
    """xl list's six state characters: r b p s c d."""
    online = [domctl.getvcpuinfo(dom, i) for i in range(domctl.max_vcpus(dom))]
    online = [v for v in online if v.online]
    flags = ["-"] * 6
    paused = domctl.is_paused(dom)
    if dom.shutdown_reason is None:
        # Xen's getdomaininfo: blocked if every online VCPU is; running if one
        # is on a CPU, which no VCPU of a paused domain is
        if all(v.blocked for v in online):
            flags[1] = "b"
        elif not paused:
            flags[0] = "r"
    elif dom.shutdown_reason == SHUTDOWN_crash:
        flags[4] = "c"
    else:
        flags[3] = "s"
    if paused:
        flags[2] = "p"
    return "".join(flags)


def cpu_time_ns(dom: Domain) -> int:
    return sum(domctl.getvcpuinfo(dom, i).running_ns for i in range(domctl.max_vcpus(dom)))


def domain_row(hv: Hypervisor, dom: Domain) -> dict[str, Any]:
    """One row of ``xl list``."""
    return {"domid": dom.domid, "name": dom.name,
            "memory_mib": dom.tot_pages * PAGE_SIZE >> 20,
            "maxmem_mib": dom.max_pages * PAGE_SIZE >> 20,
            "vcpus": domctl.max_vcpus(dom), "state": state_letters(dom),
            "cpu_time_s": round(cpu_time_ns(dom) / 1e9, 3)}


def domain_list(hv: Hypervisor) -> list[dict[str, Any]]:
    return [domain_row(hv, d) for d in domctl.getdomaininfolist(hv)]


def domain_info(hv: Hypervisor, dom: Domain) -> dict[str, Any]:
    """``xl list -l``: the row, and what the toolstack knows beside it."""
    row = domain_row(hv, dom)
    row["shutdown_reason"] = (domctl.shutdown_name(dom.shutdown_reason)
                              if dom.shutdown_reason is not None else None)
    row["crash_report"] = dom.crash_report
    row["paused"] = domctl.is_paused(dom)
    row["tot_pages"] = dom.tot_pages
    row["max_pages"] = dom.max_pages
    balloon = balloon_kib(hv, dom)
    if balloon is not None:
        row["balloon"] = {"actual_kib": balloon[0], "target_kib": balloon[1]}
    row["vcpu_list"] = vcpu_list(hv, dom)
    return row


def vcpu_list(hv: Hypervisor, dom: Domain | None = None) -> list[dict[str, Any]]:
    """``xl vcpu-list``: every VCPU of ``dom`` (or of every domain)."""
    doms = [dom] if dom is not None else domctl.getdomaininfolist(hv)
    rows = []
    for d in doms:
        for i in range(domctl.max_vcpus(d)):
            v = domctl.getvcpuinfo(d, i)
            # print_vcpuinfo: running, blocked, and "p" for an offline VCPU
            running = "-" if v.blocked or domctl.is_paused(d) else "r"
            state = f"{running}{'b' if v.blocked else '-'}-" if v.online else "--p"
            cpu = 0 if v.online else None
            rows.append({"domid": d.domid, "name": d.name, "vcpu": i, "cpu": cpu,
                         "state": state, "time_s": round(v.running_ns / 1e9, 3)})
    return rows


def host_info(hv: Hypervisor) -> dict[str, Any]:
    """``xl info``'s fields that exist here (libxl_get_physinfo, libxl_get_version_info)."""
    import platform
    major, minor = domctl.xen_version(hv)
    phys = domctl.physinfo(hv)
    return {"host": platform.node(), "release": platform.release(),
            "machine": platform.machine(), "nr_cpus": 1, "nr_nodes": 1,
            "total_memory": phys.total_pages * PAGE_SIZE >> 20,
            "free_memory": phys.free_pages * PAGE_SIZE >> 20,
            "xen_major": major, "xen_minor": minor, "xen_version": f"{major}.{minor}",
            "xen_scheduler": "pvlab", "clock": domctl.clock_name(hv),
            "nr_domains": len(domctl.getdomaininfolist(hv))}


__all__ = ["BuildError", "DomainState", "LibxlError", "SuspendDone", "SuspendJob",
           "balloon_kib", "check_acknowledged", "complete_suspend", "create_domain",
           "destroy_domain", "destroy_saved", "domain_info", "domain_list", "domain_row",
           "find_domain", "host_info", "make_request", "mem_max", "mem_set", "pause",
           "rename_domain", "restore_domain", "save_suspended", "state_letters", "unpause",
           "vcpu_list", "why_not_suspended"]
