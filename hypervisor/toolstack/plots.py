"""pvlab's pictures, drawn with matplotlib (its Agg renderer: no display is
ever opened) from what plotdata.py and timeline.py gathered: the machine's
frames, the p2m across a restore, the suspend path per VCPU, the balloon over
time, a live migration's rounds and downtime. A picture is a PNG or an SVG,
as its file's name ends; it is written to a temporary file beside it and
renamed, so a failure leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hypervisor.toolstack.plotdata import (
    CATEGORIES,
    PAGETABLES,
    BalloonRun,
    FrameMap,
    MigrationRun,
    P2mAcrossRestore,
    P2mView,
    category_index,
)
from hypervisor.toolstack.timeline import FREEZE, HYPERCALL, RESUME, STOP, STOP_STATES, Timeline
from hypervisor.toolstack.timeparse import format_duration

FORMATS = {".png": "png", ".svg": "svg"}
DPI = 110
ROW_FRAMES = 256  # frames per row of the frame grid
MAX_HEIGHT = 14  # inches: a big machine's rows get thinner, not the page longer

COLOURS = {"free": "#eeeeee", "xen": "#404040", "shared_info": "#e377c2",
           "p2m list": "#17becf", "data": "#9ecae1", "L1": "#ffd92f", "L2": "#fc8d62",
           "L3": "#e41a1c", "L4": "#7b3294", "seg_desc": "#8c564b",
           "other domain": "#a1d99b"}
STATE_COLOURS = {"PREPARE": "#c6dbef", "DISABLE_IRQ": "#6baed6", "RUN": "#fd8d3c",
                 "EXIT": "#74c476"}
POINT_COLOURS = {FREEZE: "#3182bd", HYPERCALL: "#d62728", RESUME: "#31a354"}


class PlotError(Exception):
    """A picture that cannot be written: one line saying why."""


def check_output(path: str | Path) -> str:
    """The format a picture at ``path`` is written in; refused before any run
    if the name ends otherwise or its directory cannot be written."""
    out = Path(path)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise PlotError(f"{out}: a picture is a .png or an .svg file")
    if out.is_dir():
        raise PlotError(f"{out} is a directory; name the picture's file")
    parent = out.parent
    if not parent.is_dir():
        raise PlotError(f"{parent} does not exist: cannot write {out.name} there")
    if not os.access(parent, os.W_OK):
        raise PlotError(f"{parent} is not writable: cannot write {out.name} there")
    return fmt


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write the picture whole, or nothing (a temporary file, then a rename)."""
    out = Path(path)
    fmt = check_output(out)
    # no date or software version in the file: the same run draws the same bytes
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format=fmt, dpi=DPI, metadata=metadata)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PlotError(f"cannot write {out}: {e.strerror or e}") from None


def _legend_patches(counts: dict[str, int]) -> list[Patch]:
    return [Patch(facecolor=COLOURS[name], edgecolor="#888888", label=f"{name} ({n})")
            for name, n in counts.items() if n]


# --- the machine's frames ------------------------------------------------------------------

def draw_frames(fm: FrameMap) -> Figure:
    """One cell per machine frame, ROW_FRAMES to a row, coloured by what it
    is; a black dot on each pinned table."""
    n = len(fm.category)
    rows = -(-n // ROW_FRAMES)
    grid = np.full(rows * ROW_FRAMES, category_index("free"), dtype=np.uint8)
    grid[:n] = fm.category
    fig = Figure(figsize=(11, min(2.2 + rows * 0.06, MAX_HEIGHT)))
    ax = fig.add_subplot()
    cmap = ListedColormap([COLOURS[c] for c in CATEGORIES])
    ax.imshow(grid.reshape(rows, ROW_FRAMES), cmap=cmap, vmin=0, vmax=len(CATEGORIES) - 1,
              interpolation="nearest", aspect="auto")
    pinned = np.flatnonzero(fm.pinned)
    ax.scatter(pinned % ROW_FRAMES, pinned // ROW_FRAMES, s=3, c="black", marker="o",
               linewidths=0, label=f"pinned ({len(pinned)})")
    ax.set_xlabel(f"mfn mod {ROW_FRAMES}")
    ax.set_ylabel(f"mfn / {ROW_FRAMES}")
    ax.set_title(f"machine frames ({n}) at {format_duration(fm.t_ns)} of virtual time: "
                 f"domain {fm.domid} ({fm.domain})")
    counts = {c: int((fm.category == i).sum()) for i, c in enumerate(CATEGORIES)}
    handles = _legend_patches(counts) + [ax.collections[0]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              frameon=False)
    fig.tight_layout()
    return fig


# --- pfn -> mfn across a restore ---------------------------------------------------------

def _p2m_panel(ax: Axes, view: P2mView, title: str) -> None:
    data = view.category == category_index("data")
    ax.scatter(view.pfns[data], view.mfns[data], s=0.5, c=COLOURS["data"], linewidths=0,
               label=f"data ({int(data.sum())})", rasterized=True)
    for name in (*PAGETABLES, "seg_desc"):
        sel = view.category == category_index(name)
        if sel.any():
            edge = np.where(view.pinned[sel], "black", COLOURS[name])
            ax.scatter(view.pfns[sel], view.mfns[sel], s=14, c=COLOURS[name],
                       edgecolors=edge, linewidths=0.6,
                       label=f"{name} ({int(sel.sum())}, {int(view.pinned[sel].sum())} pinned)")
    ax.set_ylabel("mfn")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False,
              markerscale=1.5)


def draw_p2m(p: P2mAcrossRestore) -> Figure:
    """pfn on x, mfn on y: the saved domain's map above, the restored one's below."""
    fig = Figure(figsize=(10, 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    moved = int((p.before.mfns != p.after.mfns).sum())
    _p2m_panel(top, p.before, f"saved at {format_duration(p.at_ns)} (machine seed "
                              f"{p.before.seed})")
    _p2m_panel(bottom, p.after, f"restored (machine seed {p.after.seed}): {moved} of "
                                f"{len(p.after.pfns)} pfns on another mfn, tables pinned again")
    bottom.set_xlabel("pfn")
    fig.suptitle(f"domain {p.domain}: pfn -> mfn before a save and after its restore "
                 "(black edge: pinned)")
    fig.tight_layout()
    return fig


# --- the suspend path per VCPU ------------------------------------------------------------

def _state_spans(ax: Axes, tl: Timeline, origin: int) -> None:
    """Each cpu's stop_machine states, a bar from each to its next step."""
    for v in range(tl.vcpus):
        lane = tl.lane(v)
        for i, s in enumerate(lane):
            if s.kind != STOP:
                continue
            nxt = next((x.t_ns for x in lane[i + 1:] if x.kind == STOP), None)
            end = nxt if nxt is not None else s.t_ns + 500
            ax.broken_barh([((s.t_ns - origin) / 1000, max(end - s.t_ns, 150) / 1000)],
                           (v - 0.3, 0.6), facecolors=STATE_COLOURS[s.label])


def _point_groups(tl: Timeline) -> list[tuple[int, int, str, list[str]]]:
    """Steps that are no stop_machine state, grouped by (lane, time): the
    kernel's Python takes no virtual time, so a whole phase can share one."""
    groups: list[tuple[int, int, str, list[str]]] = []
    for s in tl.steps:
        if s.kind == STOP:
            continue
        if groups and groups[-1][:2] == (s.vcpu, s.t_ns) and groups[-1][2] == s.kind:
            groups[-1][3].append(s.label)
        else:
            groups.append((s.vcpu, s.t_ns, s.kind, [s.label]))
    return groups


def _points(ax: Axes, tl: Timeline, origin: int) -> list[str]:
    """Numbered marks for the points; the key's lines."""
    key = []
    for n, (v, t, kind, labels) in enumerate(_point_groups(tl), 1):
        x = (t - origin) / 1000
        ax.plot([x, x], [v - 0.42, v + 0.42], color=POINT_COLOURS[kind], linewidth=1.5)
        ax.annotate(str(n), (x, v - 0.42), xytext=(0, 3 + 9 * ((n - 1) % 3)),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7,
                    color=POINT_COLOURS[kind], fontweight="bold")
        key.append(f"{n}  cpu{v}  {kind}: {', '.join(labels)}")
    return key


def draw_timeline(tl: Timeline) -> Figure:
    """A lane per VCPU, x its virtual time after the request: stop_machine's
    states as bars, the freeze, the suspend hypercall and the resume as
    numbered marks, explained underneath."""
    origin = min(s.t_ns for s in tl.steps)
    lanes_h, key_h = 1.4 + 0.5 * tl.vcpus, 0.3 + 0.15 * len(_point_groups(tl))
    fig = Figure(figsize=(11, lanes_h + key_h))
    ax, below = fig.subplots(2, 1, height_ratios=[lanes_h, key_h])
    _state_spans(ax, tl, origin)
    key = _points(ax, tl, origin)
    for gap in tl.gap_ns:
        x = (gap - origin) / 1000
        ax.axvline(x, color="#555555", linestyle="--", linewidth=1)
        ax.annotate("saved | restored on other frames", (x, -0.55), fontsize=7, ha="left",
                    color="#555555")
    ax.set_yticks(range(tl.vcpus), [f"cpu{v}" for v in range(tl.vcpus)])
    ax.set_ylim(tl.vcpus - 0.4, -1.2)
    ax.set_xlabel(f"virtual time of each VCPU, µs after {format_duration(origin)} "
                  f"(the request was at {format_duration(tl.request_ns)})")
    ax.set_title(f"domain {tl.domain}: the suspend path, resumed with {tl.how}")
    handles = [Patch(facecolor=STATE_COLOURS[s], label=s) for s in STOP_STATES]
    ax.legend(handles=handles, title="stop_machine", loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=8, title_fontsize=8, frameon=False)
    below.axis("off")
    below.text(0, 1, "\n".join(key), fontsize=7, family="monospace", va="top",
               transform=below.transAxes)
    fig.tight_layout()
    return fig


# --- the balloon over time ------------------------------------------------------------------

def _merge_marks(marks: list[tuple[int, str]], near_ns: int) -> list[tuple[int, str]]:
    """One label for moments closer than ``near_ns``: a save and its restore
    share theirs."""
    out: list[tuple[int, list[str]]] = []
    for at, what in sorted(marks):
        if out and at - out[-1][0] < near_ns:
            out[-1][1].append(what)
        else:
            out.append((at, [what]))
    return [(at, " | ".join(whats)) for at, whats in out]


def draw_balloon(b: BalloonRun) -> Figure:
    """Pages over virtual time: the host's target, the balloon the driver
    reports, the domain's reservation, the guest's free memory when it said."""
    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    t = np.array([s.t_ns for s in b.samples]) / 1e6
    ax.step(t, [s.actual for s in b.samples], where="post", label="balloon actual",
            color="#1f77b4", linewidth=4, alpha=0.6)
    ax.step(t, [s.target for s in b.samples], where="post", label="balloon target (num_pages)",
            color="#d62728", linestyle="--")
    ax.step(t, [s.reservation for s in b.samples], where="post",
            label="domain's pages (tot_pages)", color="#2ca02c")
    if b.free:
        ax.plot([f[0] / 1e6 for f in b.free], [f[1] for f in b.free], "o", color="#9467bd",
                label="guest's free pages (its statistics)")
    ax.axhline(b.guest_pages, color="#999999", linewidth=0.8)
    ymax = b.guest_pages * 1.12
    span = max((s.t_ns for s in b.samples), default=0)
    for at, what in _merge_marks(b.marks, span // 100):
        ax.axvline(at / 1e6, color="#555555", linestyle=":", linewidth=1)
        ax.annotate(what, (at / 1e6, ymax), rotation=90, fontsize=7, va="top", ha="right",
                    color="#555555")
    ax.set_ylim(0, ymax)
    ax.set_xlabel("virtual time (ms)")
    ax.set_ylabel("pages (4 KiB)")
    ax.set_title(f"domain {b.domain}: the balloon over time ({b.guest_pages} pages of "
                 "guest memory)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


# --- a live migration ---------------------------------------------------------------------

def _rounds_panel(ax: Axes, m: MigrationRun) -> None:
    rounds = m.info.rounds
    x = [r.iteration for r in rounds]
    colours = ["#d62728" if r.final else "#1f77b4" for r in rounds]
    ax.bar(x, [r.pfns for r in rounds], color=colours, width=0.6)
    for r in rounds:
        ax.annotate(f"{r.pfns}" + (f" ({r.deferred} deferred)" if r.deferred else ""),
                    (r.iteration, r.pfns), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{r.iteration}" + ("\n(suspended)" if r.final else "")
                      for r in rounds])
    ax.set_xlabel("round (Xen's iteration)")
    ax.set_ylabel("pages sent")
    rates = m.dirty_rates()
    if rates:
        twin = ax.twinx()
        twin.plot(x[:len(rates)], rates, "o-", color="#ff7f0e",
                  label="pages dirtied per virtual second while the round was sent")
        twin.set_yscale("log")
        twin.set_ylabel("dirty rate (pages/s)", color="#ff7f0e")
        twin.legend(loc="center right", fontsize=8, frameon=False)
    ax.set_title(f"pages sent per round (blue: the guest running; red: suspended), "
                 f"{m.total_pfns} pfns")


def _downtime_panel(ax: Axes, m: MigrationRun) -> None:
    final_ms, tail_ms, rx_ms = m.final_ns / 1e6, m.tail_ns / 1e6, m.receive_s * 1e3
    origin = min(final_ms, rx_ms) / 10  # a log axis has no 0: the bars start a decade lower
    ax.barh(1, final_ms - origin, left=origin, color="#d62728", label=f"final round on the "
            f"wire ({m.info.rounds[-1].pfns} pages): {final_ms:.3f} ms")
    ax.barh(1, tail_ms, left=final_ms, color="#9467bd",
            label=f"the tail records (VCPUs, shared info, TSC, END): {tail_ms:.3f} ms")
    ax.barh(0, rx_ms - origin, left=origin, color="#2ca02c",
            label=f"receiver after the stream's last octet: {rx_ms:.1f} ms")
    ax.set_yticks([1, 0], ["source, suspended\n(virtual time)", "destination\n(host time)"])
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.set_title("where the downtime went")


def draw_migration(m: MigrationRun) -> Figure:
    """A live save's rounds: pages sent per round and the dirty rate between
    them; below, the downtime: the final round and the tail on the source,
    the receiver's restore after the stream's end."""
    fig = Figure(figsize=(10, 7))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]})
    _rounds_panel(top, m)
    _downtime_panel(bottom, m)
    mib = m.info.transferred / (1 << 20)
    fig.suptitle(f"domain {m.domain}: a live migration at {format_duration(m.at_ns)}, "
                 f"{len(m.info.rounds)} rounds, {mib:.1f} MiB on the wire")
    fig.tight_layout()
    return fig
