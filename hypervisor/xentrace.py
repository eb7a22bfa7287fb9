"""A domain's trace buffer: what its VCPUs did, stamped with virtual time, for
the toolstack to read afterwards (Xen's trace buffers, xen/common/trace.c, that
xentrace reads: there a record per hypercall, TRC_PV_HYPERCALL_V2, and per
scheduling event).

Four kinds of record, none of them knowing which kernel runs: a hypercall (its
name and arguments), an entry of the Python kernel (the function's name), a
line the domain wrote to its console, and a marker the kernel wrote (as a write
to Linux's tracefs ``trace_marker``: text for the trace alone, not the
console). A domain has no buffer until the toolstack enables one: every hook
is one test of ``None`` when tracing is off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hypervisor.public.xen import Hypercall

HYPERCALL, NATIVE, CONSOLE, MARKER = "hypercall", "native", "console", "marker"

# a run that records for long is cut here: the oldest records stay, as
# Xen's buffers stop taking records when full ("lost records")
MAX_RECORDS = 1_000_000


@dataclass(frozen=True, slots=True)
class TraceRecord:
    t_ns: int            # the VCPU's virtual time
    vcpu: int
    kind: str            # HYPERCALL, NATIVE, CONSOLE or MARKER
    name: str            # the hypercall's or function's name, the line, the marker
    args: tuple[int, ...] = ()  # a hypercall's first three arguments


@dataclass
class TraceBuffer:
    records: list[TraceRecord] = field(default_factory=list)
    lost: int = 0
    _partial: dict[int, str] = field(default_factory=dict)  # console text before its newline

    def _add(self, record: TraceRecord) -> None:
        if len(self.records) >= MAX_RECORDS:
            self.lost += 1
            return
        self.records.append(record)

    def hypercall(self, t_ns: int, vcpu: int, nr: int, args: Sequence[int]) -> None:
        name = Hypercall(nr).name if nr in Hypercall._value2member_map_ else str(nr)
        self._add(TraceRecord(t_ns, vcpu, HYPERCALL, name, tuple(args[:3])))

    def native(self, t_ns: int, vcpu: int, name: str) -> None:
        self._add(TraceRecord(t_ns, vcpu, NATIVE, name))

    def marker(self, t_ns: int, vcpu: int, text: str) -> None:
        self._add(TraceRecord(t_ns, vcpu, MARKER, text))

    def console(self, t_ns: int, vcpu: int, data: bytes) -> None:
        """Console output, a record per complete line (a line may come in pieces)."""
        text = self._partial.pop(vcpu, "") + data.decode(errors="replace")
        *lines, rest = text.split("\n")
        for line in lines:
            self._add(TraceRecord(t_ns, vcpu, CONSOLE, line))
        if rest:
            self._partial[vcpu] = rest
