"""The backup's side of a checkpointed stream (restore.receive_checkpoints,
as Xen's receiver with buffer_record and handle_checkpoint): records are
applied as they come up to the first CHECKPOINT; after it an epoch is
buffered and applied only once its CHECKPOINT and libxl's CHECKPOINT_END
have come. The stream here is the primary's, written with save.py's
checkpointed-stream writer: a live first epoch, then epochs of the pages
dirtied since, the guest resumed cancelled (THAW) after each. Cut anywhere
(inside an epoch, between two, in the middle of a record, inside a
checkpoint's libxl records), the backup fails over to the last committed
epoch, and the guest it resumes ends with the results of an uninterrupted
run; cut before the first whole checkpoint, or given a bad record in a
buffered epoch, it refuses and leaves nothing."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypervisor.domctl import Hypervisor
from hypervisor.toolstack import save, session, stream
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.control import resume_cancelled
from hypervisor.toolstack.image import ImageError, ImageInfo, scan_image
from hypervisor.toolstack.precopy import PrecopyOptions
from hypervisor.toolstack.restore import RestoreError, receive_checkpoints, restore_image
from hypervisor.toolstack.session import run_domain
from hypervisor.toolstack.stream import RecType
from tests.conftest import ROOT, booting
from tests.test_repeated_pages import memory

EXAMPLE = ROOT / "examples" / "live-save.toml"
AT_NS = 3_000_000
EPOCH_NS = 2_000_000
EPOCHS = 4
LIMIT_NS = 2_000_000_000


def outcome(out: str) -> list[str]:
    return sorted(line for line in out.splitlines()
                  if line.startswith(("hashchain digest", "counter ", "dirtier")))


@dataclass
class Checkpointed:
    raw: bytes            # the whole stream, ended cleanly
    commits: list[int]    # the offset just after each epoch's CHECKPOINT_END
    console: list[bytes]  # the primary's console when each epoch was taken
    reference: list[str]  # an uninterrupted run's results


def primary(cfg, out: io.BytesIO) -> tuple[list[int], list[bytes]]:
    """The primary's loop (Remus's, in the simplest form): a live first
    epoch, then EPOCHS - 1 more EPOCH_NS apart, ended cleanly."""
    commits, console = [], []
    with booting() as boot:
        hv, dom = boot(cfg)
        run_domain(hv, dom, AT_NS)
        live = session.LiveRun(hv, dom, AT_NS, None, None)
        ls = save.start_checkpointed_stream(hv, dom, out, live, PrecopyOptions())
        for epoch in range(EPOCHS):
            if epoch:
                live.suspend()
                save.send_epoch(ls)
            save.write_epoch_end(ls)
            commits.append(out.tell())
            console.append(bytes(dom.console_out))
            resume_cancelled(hv, dom)
            live.run_for(EPOCH_NS)
        live.suspend()
        save.end_checkpointed_stream(ls)
    return commits, console


@pytest.fixture(scope="module")
def checkpointed() -> Checkpointed:
    cfg = load_config(EXAMPLE)
    with booting() as boot:
        r = run_domain(*boot(cfg), LIMIT_NS)
    assert r.reason == "poweroff"
    out = io.BytesIO()
    commits, console = primary(cfg, out)
    return Checkpointed(out.getvalue(), commits, console, outcome(r.console.decode()))


def records(raw: bytes) -> list[tuple[int, int]]:
    """(offset, type) of every libxc record of the stream, read by the framing."""
    info = scan_image_bytes(raw)
    return [(r.offset, r.type) for r in info.records]


def scan_image_bytes(raw: bytes) -> ImageInfo:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stream.img"
        path.write_bytes(raw)
        return scan_image(path, wire=True)


def through_a_pipe(data: bytes, **kwargs):
    """receive_checkpoints reading ``data`` from a pipe whose writer then
    closes it (the primary gone)."""
    rfd, wfd = os.pipe()

    def send() -> None:
        with os.fdopen(wfd, "wb") as w:
            w.write(data)

    tx = threading.Thread(target=send)
    tx.start()
    try:
        with os.fdopen(rfd, "rb") as f:
            return receive_checkpoints(f, **kwargs)
    finally:
        tx.join()


def failover_runs(ck: Checkpointed, cut: int, pipe: bool = False) -> None:
    """Cut at ``cut``: the backup commits the epochs that ended before it,
    fails over to the last, and the guest runs on to the uninterrupted
    run's results."""
    want = sum(1 for c in ck.commits if c <= cut)
    seen: list[int] = []
    data = ck.raw[:cut]
    hv, dom, stats = (through_a_pipe(data, on_commit=seen.append) if pipe else
                      receive_checkpoints(io.BytesIO(data), on_commit=seen.append))
    try:
        assert (stats.epochs, stats.failover, seen) == (want, True, list(range(want)))
        assert "truncated" in stats.why
        r = run_domain(hv, dom, LIMIT_NS)
        assert r.reason == "poweroff"
        text = ck.console[want - 1].decode() + r.console.decode()
        assert outcome(text) == ck.reference
    finally:
        hv.close()


def test_the_stream_has_xens_layout(checkpointed):
    """Every epoch ends with libxc's CHECKPOINT and libxl's records inline up
    to CHECKPOINT_END; the file check reads it whole and lists the epochs."""
    info = scan_image_bytes(checkpointed.raw)
    assert info.checkpoint and len(info.epochs) == EPOCHS
    for epoch, end in zip(info.epochs, checkpointed.commits, strict=True):
        (t, n) = struct.unpack_from("<II", checkpointed.raw, end - 8)
        assert (t, n) == (4, 0)  # CHECKPOINT_END
        assert epoch.checkpoint < end and epoch.copies > 0
    assert [r.name for r in info.libxl_records][-2:] == ["CHECKPOINT_END", "END"]


def test_a_cut_inside_an_epoch_fails_over_to_the_last_commit(checkpointed):
    c = checkpointed.commits
    failover_runs(checkpointed, (c[1] + c[2]) // 2 // 8 * 8, pipe=True)


def test_a_cut_between_epochs_keeps_the_epoch_before(checkpointed):
    failover_runs(checkpointed, checkpointed.commits[2])


def test_a_cut_inside_a_record_or_a_checkpoint_drops_its_epoch(checkpointed):
    c = checkpointed.commits
    page_data = [o for o, t in records(checkpointed.raw)
                 if t == RecType.PAGE_DATA and c[0] <= o < c[1]]
    failover_runs(checkpointed, page_data[0] + 4101)
    failover_runs(checkpointed, c[3] - 3)  # in the last CHECKPOINT_END


def test_a_clean_end_completes_from_the_last_epoch(checkpointed):
    hv, dom, stats = receive_checkpoints(io.BytesIO(checkpointed.raw))
    try:
        assert (stats.epochs, stats.failover) == (EPOCHS, False)
        r = run_domain(hv, dom, LIMIT_NS)
        text = checkpointed.console[-1].decode() + r.console.decode()
        assert r.reason == "poweroff" and outcome(text) == checkpointed.reference
    finally:
        hv.close()


@pytest.mark.parametrize("cut", ["in the first epoch", "in its checkpoint"])
def test_a_break_before_the_first_checkpoint_leaves_nothing(checkpointed, cut):
    end = checkpointed.commits[0] - (4 if cut == "in its checkpoint" else 50_000)
    hv = Hypervisor(64, seed=3)
    free = hv.machine.frames.nr_free
    try:
        with pytest.raises(RestoreError, match="truncated"):
            receive_checkpoints(io.BytesIO(checkpointed.raw[:end]), hv=hv)
        assert not hv.domains and hv.machine.frames.nr_free == free
    finally:
        hv.close()


def test_a_bad_record_in_a_buffered_epoch_is_refused(checkpointed):
    """A pfn beyond the domain in a PAGE_DATA of epoch 2: refused as it
    arrives, though the epoch is only buffered; nothing is left."""
    c = checkpointed.commits
    raw = bytearray(checkpointed.raw)
    at = next(o for o, t in records(checkpointed.raw)
              if t == RecType.PAGE_DATA and c[1] <= o < c[2])
    entry = at + stream.RHDR.size + stream.PAGE_DATA_HDR.size
    struct.pack_into("<Q", raw, entry, 0xFFFFF)
    hv = Hypervisor(64, seed=3)
    free = hv.machine.frames.nr_free
    seen: list[int] = []
    try:
        with pytest.raises(ImageError, match=f"PAGE_DATA record at offset {at}: pfn 0xfffff"):
            receive_checkpoints(io.BytesIO(bytes(raw)), hv=hv, on_commit=seen.append)
        assert seen == [0, 1] and not hv.domains and hv.machine.frames.nr_free == free
    finally:
        hv.close()


def test_cut_anywhere_in_an_epoch_the_backup_holds_the_last_commit(checkpointed):
    """Cuts spread over epochs 1 to 3, on and off record boundaries: each
    gives the memory the cut at the last commit before it gives (the
    dropped epoch was never applied)."""
    c = checkpointed.commits
    at = {}
    for k in (1, 2):
        hv, dom, _ = receive_checkpoints(io.BytesIO(checkpointed.raw[:c[k]]))
        at[k] = (hv, memory(hv, dom))
    try:
        for k in (1, 2):
            for step in range(1, 6):
                cut = c[k] + (c[k + 1] - c[k]) * step // 6 + step
                hv, dom, stats = receive_checkpoints(io.BytesIO(checkpointed.raw[:cut]))
                try:
                    assert (stats.epochs, stats.failover) == (k + 1, True)
                    for x, y in zip(memory(hv, dom), at[k][1], strict=True):
                        assert (x == y).all()
                finally:
                    hv.close()
    finally:
        for hv, _ in at.values():
            hv.close()


def test_image_show_and_check_list_a_saved_streams_epochs(checkpointed, tmp_path, capsys):
    """A checkpointed stream saved to a file (it has no digest: it was
    written for the wire) is read whole, its epochs listed."""
    path = tmp_path / "stream.img"
    path.write_bytes(checkpointed.raw)
    assert main(["image", "check", str(path)]) == 0
    assert f"{EPOCHS} epochs (checkpointed stream)" in capsys.readouterr().out
    assert main(["image", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"checkpointed: {EPOCHS} epochs" in out and "  epoch 3: offsets" in out
    hv, dom, _ = restore_image(path)  # the file's restore gives the last epoch
    try:
        r = run_domain(hv, dom, LIMIT_NS)
        text = checkpointed.console[-1].decode() + r.console.decode()
        assert r.reason == "poweroff" and outcome(text) == checkpointed.reference
    finally:
        hv.close()
