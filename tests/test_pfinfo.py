"""The stream's page-type predicates (hypervisor/toolstack/pfinfo.py) against
the XEN_DOMCTL_PFINFO_* values they stand for, one nibble and arrays alike."""

from __future__ import annotations

import numpy as np

from hypervisor.public.domctl import (
    PFINFO_BROKEN,
    PFINFO_L1TAB,
    PFINFO_L4TAB,
    PFINFO_LPINTAB,
    PFINFO_NOTAB,
    PFINFO_XALLOC,
    PFINFO_XTAB,
)
from hypervisor.toolstack import pfinfo


def test_every_known_type_has_its_level_and_pinned_bit():
    want = {PFINFO_NOTAB: (0, False), PFINFO_L1TAB: (1, False), PFINFO_L4TAB: (4, False),
            PFINFO_L1TAB | PFINFO_LPINTAB: (1, True), PFINFO_L4TAB | PFINFO_LPINTAB: (4, True),
            PFINFO_BROKEN: (0, False), PFINFO_XALLOC: (0, False), PFINFO_XTAB: (0, False)}
    for t, (level, pinned) in want.items():
        nib = pfinfo.nibble(t)
        assert nib in pfinfo.KNOWN
        assert (int(pfinfo.level(nib)), bool(pfinfo.is_pinned_table(nib))) == (level, pinned)
        assert bool(pfinfo.is_table(nib)) == (level > 0)


def test_the_predicates_work_on_arrays_as_on_one_nibble():
    nibs = np.arange(16, dtype=np.uint8)
    assert np.flatnonzero(pfinfo.is_table(nibs)).tolist() == [1, 2, 3, 4, 9, 10, 11, 12]
    assert np.flatnonzero(pfinfo.is_pinned_table(nibs)).tolist() == [9, 10, 11, 12]
    assert pfinfo.level(nibs).tolist() == [0, 1, 2, 3, 4, 0, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0]
    types = np.array([PFINFO_L4TAB | PFINFO_LPINTAB, PFINFO_NOTAB], dtype=np.uint32)
    assert pfinfo.level(pfinfo.nibble(types)).tolist() == [4, 0]


def test_no_data_and_not_populated_as_xen_has_them():
    assert pfinfo.NO_DATA == {pfinfo.nibble(t) for t in (PFINFO_XTAB, PFINFO_BROKEN,
                                                         PFINFO_XALLOC)}
    assert pfinfo.NOT_POPULATED == {pfinfo.nibble(PFINFO_XTAB), pfinfo.nibble(PFINFO_BROKEN)}
    assert pfinfo.type_name(0xC) == "L4 pinned" and pfinfo.type_name(0x7) == "absent"
