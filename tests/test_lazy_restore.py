"""Lazy restore (hypervisor/toolstack/lazyrestore.py, ``pvlab restore
--lazy``): the same run as an eager restore of the same image, in a fresh
process, for the save/restore example and for a guest that keeps writing
(a live save, whose pages were sent in several rounds: the last copy wins);
each page read from the image once, and never again once its block is
checked; an image that changes is refused before
the guest runs and ends the guest after, whether the file's identity shows
it or only a page digest does; an image without page digests is checked
whole first."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from hypervisor import domctl
from hypervisor.toolstack import lazyrestore, pfinfo, savefile
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.image import ImageError, scan_image
from hypervisor.toolstack.lazyrestore import ImageChanged, restore_image_lazy
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, checkout_env, save_example

LIMIT_NS = 2_000_000_000


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The save/restore example at 12 ms, and the writing guest saved live at 3 ms."""
    d = tmp_path_factory.mktemp("lazy")
    example = save_example(d / "example.img", 12_000_000)
    live = d / "live.img"
    assert main(["save", str(ROOT / "examples/live-save.toml"), str(live), "--at", "3ms",
                 "--live"]) == 0
    return {"example": example, "live": live}


def guest_output(image, *flags: str) -> str:
    """The console of ``pvlab restore [flags] IMAGE`` in a fresh process,
    without the toolstack's own lines."""
    cmd = [sys.executable, "-m", "hypervisor", "restore", *flags, str(image)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return "\n".join(line for line in r.stdout.splitlines()
                     if not line.startswith("[toolstack]"))


@pytest.mark.parametrize("which", ["example", pytest.param("live", marks=pytest.mark.slow)])
def test_lazy_runs_as_eager(images, which):
    """Byte for byte the console of the eager restore of the same image."""
    lazy = guest_output(images[which], "--lazy")
    assert "suspend hypercall returned 0" in lazy
    assert lazy == guest_output(images[which])


def test_each_page_read_once_and_all_in_the_end(images, monkeypatch):
    """Every lazy frame is written once, each block of the image read from
    the file once (the tables' blocks by the check, whose other pages the
    restore writes at once); by the end of the run the background pass has
    brought in every one; the VCPUs' walks and accesses were served on the way."""
    written: list[int] = []
    read: list[int] = []
    fetch, load, read_range = (lazyrestore.LazyImage.fetch, domctl.mem_paging_load,
                               lazyrestore.LazyImage._read)

    def spy_fetch(self, mfns):
        written.extend(mfns.tolist())
        fetch(self, mfns)

    def spy_load(hv, mfns, pages):
        written.extend(mfns[domctl.mem_paging_absent(hv, mfns)].tolist())
        load(hv, mfns, pages)

    def spy_read(self, at, n):
        read.append(at)
        return read_range(self, at, n)

    monkeypatch.setattr(lazyrestore.LazyImage, "fetch", spy_fetch)
    monkeypatch.setattr(domctl, "mem_paging_load", spy_load)
    monkeypatch.setattr(lazyrestore.LazyImage, "_read", spy_read)
    hv, dom, stats, image = restore_image_lazy(images["example"])
    try:
        by_check = image.digests.checked.copy()
        assert domctl.mem_paging_stats(hv)[0] > 10 * stats.pages
        assert run_domain(hv, dom, LIMIT_NS).reason == "poweroff"
    finally:
        image.close()
    assert sorted(written) == np.flatnonzero(image.offset_of >= 0).tolist()
    assert len(read) == len(set(read))
    assert not by_check[image.digests.block_of(np.array(read, dtype=np.int64))].any()
    assert domctl.mem_paging_stats(hv)[0] == 0
    assert sum(hv.machine.memory.absent.faults.values())


def test_a_checked_block_is_never_read_again(images, tmp_path):
    """Once a block is checked, no page of it comes from the file again: its
    lazy frames were filled from the octets hashed (the check's blocks by the
    restore, a fetched page's block by the fetch), so a page rewritten in
    place afterwards, the file's identity kept, is never seen."""
    img = tmp_path / "g.img"
    img.write_bytes(images["example"].read_bytes())
    hv, dom, _, image = restore_image_lazy(img)
    try:
        digests, absent = image.digests, hv.machine.memory.absent
        lazy = np.flatnonzero(image.offset_of >= 0)
        blocks = digests.block_of(image.offset_of[lazy])
        assert not absent.absent[lazy[digests.checked[blocks]]].any()
        first = int(lazy[absent.absent[lazy]][0])  # a fetch checks its block
        absent.populate_many(np.array([first]))
        same = lazy[blocks == blocks[lazy == first][0]]
        by_check = lazy[digests.checked[blocks]]
        for mfn in (int(same[same != first][0]), int(by_check[~np.isin(by_check, same)][0])):
            at = int(image.offset_of[mfn])
            with open(img, "rb") as f:
                was = os.pread(f.fileno(), 8, at)
            rewrite_in_place(img, at, bytes(x ^ 0xFF for x in was))
            absent.populate_many(np.array([mfn]))
            assert bytes(hv.machine.memory.frame_bytes(mfn)[:8]) == was
    finally:
        image.close()


def test_changed_during_the_check_is_refused(images, tmp_path, monkeypatch):
    """A file that changes between the check and the mapping is refused
    (exit 2 from the verb) and no domain is made."""
    img = tmp_path / "g.img"
    img.write_bytes(images["example"].read_bytes())
    scan = lazyrestore.scan_image

    def scan_then_touch(path, **how):
        info = scan(path, **how)
        with open(path, "ab") as f:
            f.write(b"\0")
        return info

    monkeypatch.setattr(lazyrestore, "scan_image", scan_then_touch)
    with pytest.raises(ImageError, match="changed while it was checked"):
        restore_image_lazy(img)
    assert main(["restore", "--lazy", str(img)]) == 2


def test_changed_while_running_ends_the_guest(images, tmp_path):
    """The image rewritten under a running guest: the next fetch finds it
    changed and the guest ends with ImageChanged, never reading the new bytes."""
    img = tmp_path / "g.img"
    img.write_bytes(images["example"].read_bytes())
    hv, dom, _, image = restore_image_lazy(img)
    try:
        hv.machine.memory.absent.background = 0
        st = os.stat(img)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with pytest.raises(ImageChanged, match="changed while the guest was running"):
            run_domain(hv, dom, LIMIT_NS)
    finally:
        image.close()


def test_bad_image_is_one_line(tmp_path, capsys):
    """A file that is no image: refused by the check, one line, exit 2."""
    bad = tmp_path / "x.img"
    bad.write_bytes(b"not an image")
    assert main(["restore", "--lazy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pvlab: ") and err.count("\n") == 1


def rewrite_in_place(img, offset: int, data: bytes) -> None:
    """Change octets of the file without changing its inode, size or
    modification time: what the file-identity checks cannot see."""
    st = os.stat(img)
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_page_changed_after_the_start_ends_the_guest(images, tmp_path):
    """A block of pages the restore has not read yet, changed in place under
    a running guest: its digest fails when it is first read and the guest
    ends with ImageChanged, in one line naming the record; the image is
    unmapped by close() all the same."""
    img = tmp_path / "g.img"
    img.write_bytes(images["example"].read_bytes())
    hv, dom, _, image = restore_image_lazy(img)
    try:
        digests = image.digests
        block = int(np.flatnonzero(~digests.checked & (digests.sizes > 0))[-1])
        at = int(digests.starts[block])
        rewrite_in_place(img, at, bytes(x ^ 0xFF for x in img.read_bytes()[at:at + 8]))
        with pytest.raises(ImageChanged, match="do not match their digest") as e:
            run_domain(hv, dom, LIMIT_NS)
        assert "\n" not in str(e.value) and "PAGE_DATA record at offset" in str(e.value)
    finally:
        image.close()
    # the traceback, still held, holds no view of the mapping: it is gone
    assert image.map.closed


def test_a_changed_page_the_restore_reads_is_refused(images, tmp_path, capsys):
    """A pagetable's page changed: its block is read by the check, which
    refuses the image before anything exists (exit 2, one line)."""
    img = tmp_path / "g.img"
    img.write_bytes(images["example"].read_bytes())
    info = scan_image(img)
    table = int(np.flatnonzero(pfinfo.level(info.nibbles) == 1)[0])
    at = int(info.last_offset[table]) + 8
    rewrite_in_place(img, at, bytes(x ^ 0x10 for x in img.read_bytes()[at:at + 8]))
    assert main(["restore", "--lazy", str(img)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not match their digest" in err


def test_an_image_without_page_digests_is_checked_whole_first(images, tmp_path,
                                                               monkeypatch):
    """An image from before the page digests (no XL_PAGE_DIGESTS, nothing
    after libxl's END): the whole digest first, as an eager restore checks,
    then the same lazy restore, its pages read unchecked."""
    raw = bytearray(images["example"].read_bytes())
    xl = savefile.read_xl_header(io.BytesIO(bytes(raw)))
    index = xl.page_digests
    del raw[index.trailer:]
    name_at = index.value_offset - 16
    raw[name_at:index.value_offset + savefile.PAGE_DIGESTS_VALUE] = bytes(
        16 + savefile.PAGE_DIGESTS_VALUE)
    raw[xl.digest_offset - 16:xl.digest_offset] = savefile.DIGEST_ALGORITHM.encode().ljust(16,
                                                                                         b"\0")
    savefile.seal(raw)  # the whole file's digest, as an image of then had
    old = tmp_path / "old.img"
    old.write_bytes(bytes(raw))
    whole = []
    check = savefile.check_digest
    monkeypatch.setattr(savefile, "check_digest", lambda *a, **k: whole.append(1) or check(*a, **k))
    hv, dom, _, image = restore_image_lazy(old)
    try:
        assert whole and image.digests is None
        assert run_domain(hv, dom, LIMIT_NS).reason == "poweroff"
    finally:
        image.close()
