"""The receiver of a live save's stream (xg_sr_restore.c process_page_data,
xg_sr_restore_x86_pv.c x86_pv_stream_complete): a pfn may come in many
PAGE_DATA records, one a round. It is populated the first time only; every
copy is written and localised by its own type, and the last one wins;
nothing is validated during the rounds; the tables are pinned once, after
END, by their last types; a pfn sent with data and then as XTAB keeps its
frame. The streams are built by hand from a non-live image with the stream
writer: copies put before its pages (earlier rounds) or after them (the
final round)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from hypervisor.mm.frames import PageType
from hypervisor.public.arch_x86 import _PAGE_PRESENT
from hypervisor.public.xen import INVALID_MFN, PAGE_SHIFT, PAGE_SIZE
from hypervisor.toolstack import pfinfo, stream
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.context import audit, domain_of
from hypervisor.toolstack.image import ImageError, ImageInfo, scan_image, seal
from hypervisor.toolstack.imagetool import page_index
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import run_domain, save_domain
from hypervisor.toolstack.stream import RecType
from tests.conftest import ROOT, booting

EXAMPLE = ROOT / "examples" / "suspend-cancel.toml"
LIMIT_NS = 2_000_000_000
PTE = _PAGE_PRESENT | 0x62  # present, writable, accessed, dirty


def outcome(out: str) -> list[str]:
    return sorted(line for line in out.splitlines()
                  if line.startswith(("hashchain digest", "counter ", "hello", "spawner")))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    cfg = load_config(EXAMPLE)
    cfg.requests = []
    path = tmp_path_factory.mktemp("live") / "good.img"
    with booting() as boot:
        save_domain(*boot(cfg), str(path), 12_000_000)
    return path


def page_data(*entries: tuple[int, int, bytes | None]) -> bytes:
    """One PAGE_DATA record of (pfn, type nibble, page or None) entries."""
    pfns = np.array([(nib << 60) | pfn for pfn, nib, _ in entries], dtype=np.uint64)
    body = stream.PAGE_DATA_HDR.pack(len(entries)) + pfns.tobytes()
    body += b"".join(page for _, _, page in entries if page is not None)
    out = io.BytesIO()
    stream.write_record(out, RecType.PAGE_DATA, body)
    return out.getvalue()


def rebuild(good: Path, dest: Path, earlier: bytes = b"", final: bytes = b"") -> Path:
    """The good image with ``earlier`` records before its first PAGE_DATA and
    ``final`` ones after its last, sealed again."""
    info = scan_image(good)
    first = next(r.offset for r in info.records if r.type == RecType.PAGE_DATA)
    tsc = next(r.offset for r in info.records if r.type == RecType.X86_TSC_INFO)
    raw = good.read_bytes()
    image = bytearray(raw[:first] + earlier + raw[first:tsc] + final + raw[tsc:])
    seal(image)
    dest.write_bytes(bytes(image))
    return dest


def page_of(info: ImageInfo, pfn: int) -> bytes:
    with open(info.path, "rb") as f:
        f.seek(int(page_index(info)[pfn]))
        return f.read(PAGE_SIZE)


def data_pfns(info: ImageInfo, n: int) -> list[int]:
    """``n`` plain data pfns, none a p2m frame or start_info."""
    special = set(info.p2m_frame_pfns.tolist()) | {int(info.context(0).user_regs.rdx)}
    notab = np.flatnonzero(info.nibbles == pfinfo.NOTAB).tolist()
    return [p for p in notab[len(notab) // 2:] if p not in special][:n]


def memory(hv, dom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pfn's frame, and every frame's type and pin, of a restored domain."""
    tdom = domain_of(hv, dom)
    frames = np.array(tdom.p2m_frames)
    p2m = hv.machine.memory.u64.reshape(-1, 512)[frames].reshape(-1)[:tdom.p2m_size]
    mfns = p2m[p2m != INVALID_MFN].astype(np.int64)
    ft = hv.machine.frames
    return (hv.machine.memory.u64.reshape(-1, 512)[mfns].copy(), ft.type[mfns].copy(),
            ft.pinned[mfns].copy())


def same_restore(a: Path, b: Path) -> None:
    """Both images restore to the same memory, types and pins (same seed:
    same frames)."""
    hva, doma, _ = restore_image(a)
    hvb, domb, _ = restore_image(b)
    try:
        for x, y in zip(memory(hva, doma), memory(hvb, domb), strict=True):
            assert np.array_equal(x, y)
        assert audit(hvb) == []
    finally:
        hva.close()
        hvb.close()


def test_the_last_copy_wins_each_localised_nothing_validated_meanwhile(good, tmp_path):
    info = scan_image(good)
    cr3 = int(info.context(0).ctrlreg[3]) >> PAGE_SHIFT
    d, e, f = data_pfns(info, 3)
    l2 = np.zeros(512, np.uint64)
    l2[0] = (e << PAGE_SHIFT) | PTE
    l1 = np.zeros(512, np.uint64)
    l1[7] = (f << PAGE_SHIFT) | PTE
    garbage = np.random.default_rng(1).integers(0, 2**63, 512, dtype=np.uint64)
    # round 0: the L4 the VCPU runs on as plain data full of garbage, two data
    # pages as a table tree (the guest freed them as tables before the end);
    # the final round: a data page again, as it is
    earlier = page_data((cr3, pfinfo.NOTAB, garbage.tobytes()),
                        (d, pfinfo.LPINTAB | 2, l2.tobytes()),
                        (e, 1, l1.tobytes()))
    final = page_data((f, pfinfo.NOTAB, page_of(info, f)))
    live = rebuild(good, tmp_path / "live.img", earlier, final)
    again = scan_image(live)
    assert again.copies == info.copies + 4 and again.nr_pfns == info.nr_pfns
    assert main(["image", "show", str(live)]) == 0
    same_restore(good, live)
    runs = []
    for image in (good, live):
        hv, dom, _ = restore_image(image)
        try:
            r = run_domain(hv, dom, LIMIT_NS)
            assert r.reason == "poweroff"
            runs.append(outcome(r.console.decode()))
        finally:
            hv.close()
    assert runs[0] == runs[1] and runs[0]


def test_a_table_pinned_early_and_data_at_the_end_is_not_pinned(good, tmp_path):
    info = scan_image(good)
    (d,) = data_pfns(info, 1)
    live = rebuild(good, tmp_path / "live.img",
                   page_data((d, pfinfo.LPINTAB | 1, bytes(PAGE_SIZE))))
    hv, dom, stats = restore_image(live)
    try:
        mfn = int(restore_p2m(hv, dom)[d])
        ft = hv.machine.frames
        assert not ft.pinned[mfn] and PageType(int(ft.type[mfn])) == PageType.writable
        assert stats.pinned == int(pfinfo.is_pinned_table(info.nibbles).sum())
    finally:
        hv.close()


def restore_p2m(hv, dom) -> np.ndarray:
    tdom = domain_of(hv, dom)
    frames = np.array(tdom.p2m_frames)
    return hv.machine.memory.u64.reshape(-1, 512)[frames].reshape(-1)[:tdom.p2m_size]


def test_a_deferred_table_comes_as_xtab_then_with_data(good, tmp_path):
    info = scan_image(good)
    tables = np.flatnonzero(pfinfo.is_pinned_table(info.nibbles)).tolist()
    live = rebuild(good, tmp_path / "live.img",
                   page_data(*((t, pfinfo.XTAB, None) for t in tables)))
    same_restore(good, live)


def test_a_pfn_sent_with_data_then_as_xtab_keeps_its_frame(good, tmp_path):
    """The guest gave the page back between two rounds (a balloon): the last
    round's p2m has no frame for it, no table maps it, and it comes as XTAB.
    Xen's receiver depopulates nothing: the frame stays, with the page the
    earlier round brought."""
    info = scan_image(good)
    (x,) = data_pfns(info, 1)
    where = page_index(info)
    final = []
    for t in np.flatnonzero(pfinfo.level(info.nibbles) == 1).tolist():
        page = np.frombuffer(page_of(info, t), np.uint64).copy()
        hit = ((page & np.uint64(_PAGE_PRESENT)) != 0) & \
            ((page >> np.uint64(PAGE_SHIFT)) & np.uint64((1 << 40) - 1) == np.uint64(x))
        if hit.any():
            page[hit] = 0
            final.append((t, int(info.nibbles[t]), page.tobytes()))
    slot, frame = divmod(x, 512)
    p2m_pfn = int(info.p2m_frame_pfns[slot])
    p2m = np.frombuffer(page_of(info, p2m_pfn), np.uint64).copy()
    p2m[frame] = INVALID_MFN
    final += [(p2m_pfn, pfinfo.NOTAB, p2m.tobytes()), (x, pfinfo.XTAB, None)]
    live = rebuild(good, tmp_path / "live.img", final=page_data(*final))
    assert where[x] >= 0
    again = scan_image(live)
    assert again.nibbles[x] == pfinfo.XTAB and x in again.populated()
    hv, dom, _ = restore_image(live)
    try:
        mfn = int(restore_p2m(hv, dom)[x])
        assert mfn != INVALID_MFN and hv.machine.frames.owner[mfn] == dom.domid
        assert hv.machine.memory.u64.reshape(-1, 512)[mfn].tobytes() == page_of(info, x)
        assert audit(hv) == []
    finally:
        hv.close()


def test_an_earlier_copy_naming_a_pfn_beyond_the_domain_is_refused(good, tmp_path):
    info = scan_image(good)
    (d,) = data_pfns(info, 1)
    l1 = np.zeros(512, np.uint64)
    l1[3] = ((info.max_pfn + 5) << PAGE_SHIFT) | PTE
    live = rebuild(good, tmp_path / "live.img", page_data((d, 1, l1.tobytes())))
    with pytest.raises(ImageError, match=f"a copy of pagetable pfn {d:#x} .L1. slot 3 names"):
        scan_image(live)
