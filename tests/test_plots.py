"""pvlab's pictures (pvlab plot, pvlab frames --plot): each drawn from a real
short run into a valid PNG or SVG, and the data each is drawn from checked
against what the run must have done: the suspend path's steps in their order
on every VCPU, a p2m whose pfns stay and whose mfns move across a restore, a
balloon that follows its target, frames counted as the frame table counts
them. A picture that cannot be written is one line and leaves no file."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from hypervisor import domctl
from hypervisor.toolstack import plotdata, plots, timeline
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import BalloonConfig, load_config
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.frames import frame_table, summary
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, make_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUSPEND_AT = 3_000_000

# two VCPUs busy with tasks, so that the stop_machine has a cpu to stop
GUEST = make_config("run=hashchain,counter:8:400000", vcpus=2, memory=16, name="plots")


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC


def assert_svg(path: Path) -> None:
    assert ET.parse(path).getroot().tag == "{http://www.w3.org/2000/svg}svg"


def no_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# --- the suspend path's timeline ----------------------------------------------------------

@pytest.fixture(scope="module")
def thaw() -> timeline.Timeline:
    return timeline.trace_checkpoint(GUEST, SUSPEND_AT)


@pytest.fixture(scope="module")
def restored() -> timeline.Timeline:
    return timeline.trace_save_restore(GUEST, SUSPEND_AT)


def _order(tl: timeline.Timeline, vcpu: int) -> list[str]:
    return [s.label if s.kind == timeline.STOP else s.kind for s in tl.lane(vcpu)]


@pytest.mark.parametrize("which", ["thaw", "restored"])
def test_every_cpu_steps_through_the_suspend_path_in_order(which, request):
    """cpu0 (the one that suspends): the freeze, stop_machine's first three
    states, the hypercall, its return, EXIT, then the way back; every other
    cpu: the four states, in order. Times never go back on a lane."""
    tl = request.getfixturevalue(which)
    assert tl.how == ("THAW" if which == "thaw" else "RESTORE")
    dedup = [k for i, k in enumerate(_order(tl, 0)) if i == 0 or _order(tl, 0)[i - 1] != k]
    assert dedup == ["freeze", "PREPARE", "DISABLE_IRQ", "RUN", "hypercall", "resume",
                     "EXIT", "resume"]
    for v in range(1, tl.vcpus):
        assert _order(tl, v) == list(timeline.STOP_STATES)
    for v in range(tl.vcpus):
        times = [s.t_ns for s in tl.lane(v)]
        assert times == sorted(times) and times[0] >= SUSPEND_AT


def test_the_resume_says_how_the_hypercall_returned(thaw, restored):
    returned = {tl.how: [s.label for s in tl.steps if s.label.startswith("returned")]
                for tl in (thaw, restored)}
    assert returned == {"THAW": ["returned 1"], "RESTORE": ["returned 0"]}
    assert restored.gap_ns and not thaw.gap_ns


def test_the_timeline_draws_as_png_and_svg(thaw, restored, tmp_path):
    plots.save_figure(plots.draw_timeline(thaw), tmp_path / "t.png")
    plots.save_figure(plots.draw_timeline(restored), tmp_path / "t.svg")
    assert_png(tmp_path / "t.png")
    assert_svg(tmp_path / "t.svg")


def test_tracing_is_off_until_enabled(booted):
    hv, dom = booted(GUEST)
    run_domain(hv, dom, 1_000_000)
    assert domctl.tbuf_read(dom) == []
    domctl.tbuf_enable(dom)
    run_domain(hv, dom, 2_000_000)
    records = domctl.tbuf_read(dom)
    assert {"hypercall", "native", "console"} <= {r.kind for r in records}
    assert all(1_000_000 <= r.t_ns <= 2_200_000 for r in records)


# --- pfn -> mfn across a restore ------------------------------------------------------------

@pytest.fixture(scope="module")
def p2m() -> plotdata.P2mAcrossRestore:
    return plotdata.p2m_across_restore(GUEST, SUSPEND_AT)


def test_the_p2m_keeps_its_pfns_and_its_page_types_on_other_mfns(p2m):
    before, after = p2m.before, p2m.after
    assert np.array_equal(before.pfns, after.pfns)
    assert len(before.pfns) == GUEST.memory * 256
    assert before.seed != after.seed
    assert (before.mfns != after.mfns).mean() > 0.9
    assert np.array_equal(before.category, after.category)
    l4 = before.category == plotdata.category_index("L4")
    assert l4.any() and before.pinned[l4].all() and after.pinned[l4].all()


def test_the_p2m_draws(p2m, tmp_path):
    plots.save_figure(plots.draw_p2m(p2m), tmp_path / "p.png")
    assert_png(tmp_path / "p.png")


# --- the machine's frames -------------------------------------------------------------------

def test_the_frame_map_counts_what_the_frame_table_counts(booted, tmp_path):
    hv, dom = booted(GUEST)
    run_domain(hv, dom, 2_000_000)
    fm = plotdata.frame_map(hv, dom)
    counts = {c: int((fm.category == i).sum()) for i, c in enumerate(plotdata.CATEGORIES)}
    tables = {t: n for t, (n, _) in summary(frame_table(hv, dom)).items()
              if t in plotdata.PAGETABLES}
    assert {t: counts[t] for t in tables} == tables
    assert counts["free"] == domctl.physinfo(hv).free_pages
    assert counts["shared_info"] == 1 and counts["xen"] > 0
    assert int(fm.pinned.sum()) == sum(r.pinned for r in frame_table(hv, dom))
    plots.save_figure(plots.draw_frames(fm), tmp_path / "f.svg")
    assert_svg(tmp_path / "f.svg")


# --- the balloon ----------------------------------------------------------------------------

BALLOONED = dataclasses.replace(
    GUEST, name="ballooned", balloon=BalloonConfig(2_000_000),
    requests=(parse_request("1ms mem-set 12"), parse_request("4ms mem-set 16")))


def test_the_balloon_follows_its_target_and_gives_back_what_it_took(tmp_path):
    run = plotdata.balloon_run(BALLOONED, 6_000_000, 250_000)
    by_time = {s.t_ns: s for s in run.samples}
    assert sorted(by_time) == [250_000 * i for i in range(1, 25)]
    mid, end = by_time[3_500_000], by_time[6_000_000]
    assert mid.target == mid.actual == 4 * 256
    assert mid.reservation == run.guest_pages - mid.actual
    assert end.target == end.actual == 0 and end.reservation == run.guest_pages
    assert [m[1] for m in run.marks] == ["mem-set 12", "mem-set 16"]
    assert run.free
    plots.save_figure(plots.draw_balloon(run), tmp_path / "b.png")
    assert_png(tmp_path / "b.png")


# --- a live migration ---------------------------------------------------------------------

def test_the_migration_picture_shows_every_round_and_the_downtime(tmp_path):
    """examples/migration.toml's dirtier keeps 64 pages dirty: the first round
    sends every pfn, the live rounds stop at Xen's fifth, the final one is the
    suspended round, and the downtime is that round and the tail on the wire."""
    run = plotdata.migration_run(load_config(ROOT / "examples/migration.toml"), 2_000_000)
    rounds = run.info.rounds
    assert rounds[0].pfns == run.total_pfns and not rounds[0].final
    assert [r.iteration for r in rounds] == list(range(6)) and rounds[-1].final
    assert all(r.pfns >= 50 for r in rounds[:-1])
    assert run.final_ns == rounds[-1].wire_ns and run.tail_ns > 0
    assert len(run.dirty_rates()) == 5 and all(x > 0 for x in run.dirty_rates())
    assert run.receive_s > 0
    fig = plots.draw_migration(run)
    plots.save_figure(fig, tmp_path / "m.svg")
    plots.save_figure(fig, tmp_path / "m.png")
    assert_svg(tmp_path / "m.svg")
    assert_png(tmp_path / "m.png")


def test_a_migration_picture_of_a_guest_that_shuts_down_is_one_line(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["plot", "migration", str(ROOT / "examples/hello.toml"), "--at", "5ms",
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "live save" in err and err.count("\n") == 1 and not out.exists()


# --- the command line -----------------------------------------------------------------------

@pytest.mark.parametrize("name, why", [
    ("pic.jpg", "a picture is a .png or an .svg file"),
    ("nowhere/pic.png", "does not exist"),
])
def test_a_picture_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, name,
                                                                    why):
    out = tmp_path / name
    assert main(["plot", "timeline", str(ROOT / "examples/hello.toml"), "--at", "1ms",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1 and not out.exists()


def test_a_balloon_picture_of_a_guest_without_one_is_refused(tmp_path, capsys):
    out = tmp_path / "b.png"
    assert main(["plot", "balloon", str(ROOT / "examples/hello.toml"), "--until", "1ms",
                 "-o", str(out)]) == 2
    assert "no balloon" in capsys.readouterr().err and not out.exists()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def fail(self, f, **kwargs):
        f.write(b"half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(plots.PlotError, match="No space left"):
        plots.save_figure(Figure(), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_frames_plot_draws_the_machine(tmp_path, capsys):
    out = tmp_path / "frames.png"
    assert main(["frames", str(ROOT / "examples/smp.toml"), "--at", "2ms",
                 "--plot", str(out)]) == 0
    assert_png(out)
    assert "picture written" in capsys.readouterr().out and no_leftovers(tmp_path) == []


def test_a_guest_that_cannot_suspend_is_said_in_one_line(tmp_path, capsys):
    """hello powers off at once: no suspend path to draw, exit 1, no file."""
    out = tmp_path / "t.png"
    assert main(["plot", "timeline", str(ROOT / "examples/hello.toml"), "--at", "1ms",
                 "--checkpoint", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pvlab: ") and err.count("\n") == 1 and not out.exists()
