"""The pre-copy policy of a live save and what it reports: Xen's
``precopy_policy`` callback (tools/include/xenguest.h, xg_sr_save.c
simple_precopy_policy) and QEMU's downtime limit and progress fields
(qapi/migration.json MigrationInfo, migration.c migration_update_counters).

The loop that asks the policy is save.send_memory_live. After each round it
asks twice, as Xen does: once with the round's dirty count (to decide whether
to send it), once with the count unknown (-1: a policy may stop on the
iteration alone, before the next CLEAN).

Time here is the guest's virtual time: a round's pages take the time the
link's bandwidth gives them (PrecopyOptions.bandwidth), and the guest runs
for that time while they are on the wire. So a live save is as reproducible
as any pvlab run, and "the bandwidth measured so far" is measured on that
modelled link.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hypervisor.public.xen import PAGE_SIZE

SPP_MAX_ITERATIONS = 5       # xg_sr_save.c's simple_precopy_policy
SPP_TARGET_DIRTY_COUNT = 50
DEFAULT_BANDWIDTH = 1 << 30  # octets per second of virtual time on the modelled link
NS = 1_000_000_000


class Policy(enum.IntEnum):
    """XGS_POLICY_*: what the policy tells the loop."""

    ABORT = -1
    CONTINUE_PRECOPY = 0
    STOP_AND_COPY = 1
    POSTCOPY = 2  # Otto's XGS_POLICY_POSTCOPY: switch to post-copy instead


@dataclass
class PrecopyStats:
    """struct precopy_stats: the rounds done, the pages written in them, and
    the pages dirty now (-1 if unknown)."""

    iteration: int = 0
    total_written: int = 0
    dirty_count: int = -1


@dataclass(frozen=True)
class PrecopyOptions:
    """The live save's settings: Xen's two (both are constants in Xen; Otto's
    unmerged branch made them xl options), QEMU's downtime limit (None: no
    limit, Xen's policy alone) and the modelled link's bandwidth. ``postcopy``:
    where the policy says stop, switch to post-copy instead of stop-and-copy
    (Otto's ``xl migrate --postcopy``); with ``max_iterations`` 0 no pre-copy
    round at all (a pure post-copy: the guest suspends at once)."""

    max_iterations: int = SPP_MAX_ITERATIONS
    dirty_threshold: int = SPP_TARGET_DIRTY_COUNT
    downtime_limit_ns: int | None = None
    bandwidth: int = DEFAULT_BANDWIDTH
    postcopy: bool = False

    @property
    def pure_postcopy(self) -> bool:
        """Post-copy with no pre-copy round."""
        return self.postcopy and self.max_iterations == 0

    def wire_ns(self, octets: int) -> int:
        """The virtual time ``octets`` take on the link."""
        return octets * NS // self.bandwidth


def precopy_policy(stats: PrecopyStats, opts: PrecopyOptions, bandwidth: float) -> Policy:
    """simple_precopy_policy (fewer than ``dirty_threshold`` dirty pages, or
    ``max_iterations`` rounds, stops), and QEMU's switchover test: stop when
    the dirty pages could be sent within the downtime limit at ``bandwidth``
    (octets per virtual second measured so far; 0 before the first round).
    Stopping is POSTCOPY when ``opts`` asks for post-copy (Otto's libxl
    policy), else STOP_AND_COPY."""
    stop = Policy.POSTCOPY if opts.postcopy else Policy.STOP_AND_COPY
    dirty = stats.dirty_count
    if 0 <= dirty < opts.dirty_threshold or stats.iteration >= opts.max_iterations:
        return stop
    if opts.downtime_limit_ns is not None and dirty >= 0 and bandwidth > 0 \
            and dirty * PAGE_SIZE * NS / bandwidth <= opts.downtime_limit_ns:
        return stop
    return Policy.CONTINUE_PRECOPY


@dataclass
class Round:
    """One round as the loop sent it: Xen's iteration number, the pages and
    octets it wrote, the XTABs it deferred, its virtual time on the wire."""

    iteration: int
    pages: int
    pfns: int
    octets: int
    deferred: int
    wire_ns: int
    final: bool = False


@dataclass
class MigrationInfo:
    """What query-migrate answers, as far as a pvlab live save has it. Sizes
    in octets; times in milliseconds of virtual time, as QEMU's are in ms."""

    status: str = "setup"          # setup, active, postcopy-active, postcopy-paused,
    #                                completed, failed
    total: int = 0                 # the guest's memory
    transferred: int = 0           # octets written so far
    remaining: int = 0             # dirty pages not yet sent, in octets
    dirty_pages_rate: int = 0      # pages the guest dirtied per second, last round
    dirty_sync_count: int = 0      # CLEANs of the log-dirty bitmap
    setup_ns: int = 0              # before the first round: log-dirty on, headers
    expected_downtime_ns: int = 0  # the last dirty count at the measured bandwidth
    downtime_ns: int = 0           # suspended: the final round and the end records
    total_ns: int = 0
    rounds: list[Round] = field(default_factory=list)
    error: str = ""
    postcopy: bool = False         # the migration switched to post-copy
    postcopy_requests: int = 0     # POSTCOPY_FAULT records the destination sent
    postcopy_bytes: int = 0        # octets sent after the switch, the guest there
    precopy_bytes: int = 0         # octets sent while the guest ran here
    downtime_bytes: int = 0        # octets sent with the guest running nowhere
    postcopy_faulted: int = 0      # pages sent because the destination asked
    postcopy_pushed: int = 0       # pages sent by the background scan
    postcopy_blocktime_ns: int | None = None  # the destination's: host time faults waited

    def bandwidth(self) -> float:
        """Octets per virtual second over the rounds so far."""
        wire = sum(r.wire_ns for r in self.rounds)
        return sum(r.octets for r in self.rounds) * NS / wire if wire else 0.0

    def query_migrate(self) -> dict:
        """The fields with QEMU's names and shape (MigrationInfo, MigrationStats)."""
        ms = 1_000_000
        out: dict = {"status": self.status, "setup-time": self.setup_ns // ms,
                     "total-time": self.total_ns // ms}
        if self.status in ("active", "completed", "postcopy-active", "postcopy-paused"):
            out["ram"] = {"total": self.total, "transferred": self.transferred,
                          "remaining": self.remaining, "dirty-pages-rate": self.dirty_pages_rate,
                          "dirty-sync-count": self.dirty_sync_count, "page-size": PAGE_SIZE}
            if self.postcopy:
                out["ram"].update({"postcopy-requests": self.postcopy_requests,
                                   "postcopy-bytes": self.postcopy_bytes,
                                   "precopy-bytes": self.precopy_bytes,
                                   "downtime-bytes": self.downtime_bytes})
        if self.status == "active":
            out["expected-downtime"] = self.expected_downtime_ns // ms
        if self.status == "completed":
            out["downtime"] = self.downtime_ns // ms
        if self.postcopy_blocktime_ns is not None:
            out["postcopy-blocktime"] = self.postcopy_blocktime_ns // ms
        if self.rounds:
            out["iteration"] = self.rounds[-1].iteration  # Xen's, beside QEMU's fields
        if self.error:
            out["error-desc"] = self.error
        return out


def progress_line(r: Round, total_pfns: int) -> str:
    """libxc's progress line for a round ("Frames iteration N"; xtl's
    "%s: %lu/%lu  %3d%%"), with the pages it deferred."""
    pct = 100 * r.pfns // max(total_pfns, 1)
    line = f"Frames iteration {r.iteration}: {r.pfns}/{total_pfns}  {pct:3d}%"
    if r.deferred:
        line += f" ({r.deferred} deferred)"
    return line + (" (suspended)" if r.final else "")


__all__ = ["MigrationInfo", "Policy", "PrecopyOptions", "PrecopyStats", "Round",
           "precopy_policy", "progress_line"]
