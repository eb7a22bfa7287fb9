"""Page types as the migration stream carries them: the top nibble of a
PAGE_DATA pfn entry, XEN_DOMCTL_PFINFO_* >> 28 (xg_sr_common.h). The
predicates that save, restore and the image tools ask of a type, named once;
each works on one nibble or a numpy array of them.

    0x0 NOTAB    0x1..0x4 L1..L4 table    0x9..0xC the same, pinned (LPINTAB)
    0xD BROKEN   0xE XALLOC (allocate, no data)   0xF XTAB (no frame)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hypervisor.public.domctl import (
    PFINFO_BROKEN,
    PFINFO_LPINTAB,
    PFINFO_LTAB_SHIFT,
    PFINFO_LTABTYPE_MASK,
    PFINFO_NOTAB,
    PFINFO_XALLOC,
    PFINFO_XTAB,
)

NOTAB = PFINFO_NOTAB >> PFINFO_LTAB_SHIFT
LTABTYPE_MASK = PFINFO_LTABTYPE_MASK >> PFINFO_LTAB_SHIFT
LPINTAB = PFINFO_LPINTAB >> PFINFO_LTAB_SHIFT
BROKEN = PFINFO_BROKEN >> PFINFO_LTAB_SHIFT
XALLOC = PFINFO_XALLOC >> PFINFO_LTAB_SHIFT
XTAB = PFINFO_XTAB >> PFINFO_LTAB_SHIFT
L4 = 4
# 0xFF in a per-pfn array: the image says nothing of that pfn
ABSENT = 0xFF

TYPE_NAMES = {NOTAB: "NOTAB", 0x1: "L1", 0x2: "L2", 0x3: "L3", 0x4: "L4",
              LPINTAB | 0x1: "L1 pinned", LPINTAB | 0x2: "L2 pinned",
              LPINTAB | 0x3: "L3 pinned", LPINTAB | 0x4: "L4 pinned",
              BROKEN: "BROKEN", XALLOC: "XALLOC", XTAB: "XTAB"}
# the types a stream may carry (is_known_page_type)
KNOWN = frozenset(TYPE_NAMES)
# no page of data follows the entry (page_type_has_stream_data is false)
NO_DATA = frozenset([XTAB, BROKEN, XALLOC])
# no frame at all for the pfn
NOT_POPULATED = frozenset([XTAB, BROKEN])


# the same three sets as lookup tables over the 16 nibbles (a batch's
# entries are looked up at once)
_KNOWN = np.array([n in KNOWN for n in range(16)])
_HAS_DATA = np.array([n not in NO_DATA for n in range(16)])
_POPULATES = np.array([n not in NOT_POPULATED for n in range(16)])


def is_known(nib: np.ndarray) -> np.ndarray:
    """A type a stream may carry (is_known_page_type)."""
    return _KNOWN[nib & 0xF] & (nib < 16)


def has_data(nib: np.ndarray) -> np.ndarray:
    """A page of data follows the entry (page_type_has_stream_data)."""
    return _HAS_DATA[nib & 0xF]


def populates(nib: np.ndarray) -> np.ndarray:
    """The pfn gets a frame (not XTAB or BROKEN)."""
    return _POPULATES[nib & 0xF]


def nibble(pfinfo: Any) -> Any:
    """The stream's type nibble of a getpageframeinfo3 type (u32)."""
    return pfinfo >> PFINFO_LTAB_SHIFT


def level(nib: Any) -> Any:
    """The table level, 1..4, of a pagetable type; 0 for anything else."""
    lvl = nib & LTABTYPE_MASK
    return lvl * is_table(nib)


_LEVELS = np.array([(n & LTABTYPE_MASK) * ((n < BROKEN) and 1 <= (n & LTABTYPE_MASK) <= L4)
                    for n in range(16)], dtype=np.uint8)


# per nibble, for a batch told by how many entries of each type it has
# (np.bincount over its nibbles): which are known, have data, populate, are tables
KNOWN_NIBBLES, DATA_NIBBLES, POPULATING_NIBBLES = _KNOWN, _HAS_DATA, _POPULATES
TABLE_NIBBLES = _LEVELS > 0


def levels(nib: np.ndarray) -> np.ndarray:
    """level() of an array of nibbles, by lookup."""
    return _LEVELS[nib & 0xF]


def is_table(nib: Any) -> Any:
    """An L1..L4 pagetable, pinned or not."""
    lvl = nib & LTABTYPE_MASK
    return (nib < BROKEN) & (lvl >= 1) & (lvl <= L4)


def is_pinned_table(nib: Any) -> Any:
    """A pagetable the guest had pinned: pin_pagetables pins it again."""
    return is_table(nib) & ((nib & LPINTAB) != 0)


def type_name(nib: int) -> str:
    return TYPE_NAMES.get(int(nib), "absent")
