"""A restore validates its L1s in one pass before pinning (PageTypes.validate_l1s,
restore.validate_l1s): Xen validates each table as its first type reference
is taken (mm.c's alloc_l1_table under the pins), and the bulk pass must leave
exactly the frame table and tables the one-by-one pins leave, and refuse the
same bad tables with the same error (it gives way to the pins for anything
out of the common case)."""

from __future__ import annotations

import numpy as np
import pytest

from hypervisor.core import Hypervisor
from hypervisor.public.arch_x86 import _PAGE_PRESENT, _PAGE_PWT, _PAGE_RW, _PAGE_USER
from hypervisor.public.xen import PAGE_SHIFT
from hypervisor.toolstack import pfinfo, restore
from hypervisor.toolstack.image import ImageError, scan_image, seal
from hypervisor.toolstack.restore import restore_image
from tests.conftest import save_example


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_example(tmp_path_factory.mktemp("bulkpin") / "good.img", 6_000_000)


def one_by_one(monkeypatch) -> None:
    monkeypatch.setattr(restore.domctl, "validate_l1_tables", lambda *a: False)


def restored_state(img, seed=7):
    """The frame table and machine memory after restoring ``img``."""
    hv, dom, stats = restore_image(img, seed=seed)
    ft = hv.machine.frames
    state = {k: getattr(ft, k).copy() for k in ("type", "type_count", "ref_count",
                                                "validated", "pinned", "linear")}
    state["memory"] = hv.machine.memory.u64.copy()
    hv.close()
    return state, stats


def test_bulk_leaves_what_the_pins_leave(good, monkeypatch):
    taken = []
    real = restore.domctl.validate_l1_tables
    monkeypatch.setattr(restore.domctl, "validate_l1_tables",
                        lambda *a: taken.append(real(*a)) or taken[-1])
    bulk, stats = restored_state(good)
    assert taken == [True] and stats.pinned
    one_by_one(monkeypatch)
    single, _ = restored_state(good)
    for k in bulk:
        assert np.array_equal(bulk[k], single[k]), k


def l1_with_an_entry(info):
    """An L1 of the image and a present entry's slot in it, and the file
    offset of that entry's last copy."""
    where = {}
    for b in info.batches:
        pfns = b.pfns[b.with_data]
        for k, pfn in enumerate(pfns.tolist()):
            where[pfn] = b.data_offset + 4096 * k
    levels = pfinfo.level(info.nibbles)
    l1 = int(np.flatnonzero(levels == 1)[0])
    l2 = int(np.flatnonzero(levels == 2)[0])
    other_l1 = int(np.flatnonzero(levels == 1)[1])
    return l1, l2, other_l1, where


CASES = {
    # an L1 mapping a pagetable writable ("Could not get page type
    # PGT_writable_page"): an upper table, and another L1 (both typed by the
    # pins, so the bulk pass must count them as in use before they are)
    "an L2 writable": lambda l1, l2, o: (l2 << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_RW | _PAGE_USER,
    "another L1 writable": lambda l1, l2, o: (o << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_RW,
    # flags an L1 may not hold (base_disallow_mask; _PAGE_GNTTAB likewise)
    "PWT": lambda l1, l2, o: (o << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_PWT,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bulk_refuses_what_the_pins_refuse(good, tmp_path, monkeypatch, case):
    info = scan_image(good)
    l1, l2, other, where = l1_with_an_entry(info)
    raw = bytearray(good.read_bytes())
    page = np.frombuffer(raw, dtype=np.uint64, count=512, offset=where[l1])
    slot = int(np.flatnonzero(page & np.uint64(_PAGE_PRESENT))[0])
    page[slot] = np.uint64(CASES[case](l1, l2, other))
    del page  # a view on raw, which seal resizes
    seal(raw)
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(raw))
    errors = []
    for bulk in (True, False):
        if not bulk:
            one_by_one(monkeypatch)
        hv = Hypervisor(96, seed=3)
        free = hv.machine.frames.nr_free
        with pytest.raises(ImageError, match="pinning pfn") as e:
            restore_image(bad, hv=hv)
        assert not hv.domains and hv.machine.frames.nr_free == free
        hv.close()
        errors.append(str(e.value))
    assert errors[0] == errors[1]
