"""The control interface (hypervisor/domctl.py): what the toolstack may ask of
the hypervisor, checked on a bare domain: foreign mappings refuse frames the
domain does not own (Xen's EPERM), write through to the guest's frames,
getpageframeinfo3 reports types as Xen does, setvcpucontext brings a VCPU up;
and the builder's kernel_load that goes through them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hypervisor import domctl
from hypervisor.domctl import DomctlError, Hypervisor
from hypervisor.public.domctl import PFINFO_L4TAB, PFINFO_LPINTAB, PFINFO_NOTAB, PFINFO_XTAB
from hypervisor.public.elfnote import XenElfNote
from hypervisor.public.errno import EPERM
from hypervisor.public.native import VIRT_BASE
from hypervisor.public.xen import PAGE_SIZE
from hypervisor.toolstack.builder import DomImage, kernel_load, meminit
from hypervisor.toolstack.elfimage import GuestImage, Segment
from tests.conftest import make_config


@pytest.fixture
def two_domains():
    hv = Hypervisor(32, seed=3)
    a = domctl.createdomain(hv, "a", 1, 64)
    b = domctl.createdomain(hv, "b", 1, 64)
    yield hv, a, b, domctl.populate_physmap(hv, a, 8), domctl.populate_physmap(hv, b, 8)
    hv.close()


def test_a_foreign_mapping_of_another_domains_frame_is_refused(two_domains):
    hv, a, b, mfns_a, mfns_b = two_domains
    with pytest.raises(DomctlError) as e:
        domctl.map_foreign_bulk(hv, a, [int(mfns_a[0]), int(mfns_b[0])])
    assert e.value.errno == EPERM and f"{int(mfns_b[0]):#x}" in str(e.value)
    with pytest.raises(DomctlError):
        domctl.map_foreign_range(hv, b, int(mfns_a[1]))


def test_a_foreign_mapping_writes_through_to_the_domains_frames(two_domains):
    hv, a, _, mfns, _ = two_domains
    fmap = domctl.map_foreign_bulk(hv, a, mfns[:3])
    fmap[1][7] = 0x1234                       # one frame: a view
    fmap[np.array([0, 2])] = 5                # a batch: written through
    assert int(hv.machine.memory.frame(int(mfns[1]))[7]) == 0x1234
    assert (hv.machine.memory.frame(int(mfns[2])) == 5).all()
    page = domctl.map_foreign_range(hv, a, int(mfns[1]))
    assert page[56:58].tobytes() == (0x1234).to_bytes(2, "little")
    assert len(fmap) == 3 and np.asarray(fmap).shape == (3, 512)


def test_getpageframeinfo3_types_and_a_foreign_frame_is_xtab(two_domains):
    hv, a, _, mfns, mfns_b = two_domains
    l4 = int(mfns[0])
    assert domctl.mmuext_pin_table(hv, a, l4, 4) == 0
    types = domctl.getpageframeinfo3(hv, a, np.array([l4, int(mfns[1]), int(mfns_b[0])]))
    assert types.tolist() == [PFINFO_L4TAB | PFINFO_LPINTAB, PFINFO_NOTAB, PFINFO_XTAB]


def test_the_m2p_mapping_is_read_only(two_domains):
    hv, a, _, mfns, _ = two_domains
    domctl.mmu_machphys_update(hv, a, mfns, np.arange(mfns.size))
    m2p = domctl.map_m2p(hv)
    assert m2p[mfns].tolist() == list(range(mfns.size))
    with pytest.raises(ValueError):
        m2p[int(mfns[0])] = 0


def test_setvcpucontext_refuses_a_cr3_that_does_not_validate(two_domains):
    hv, a, _, mfns, _ = two_domains
    ctx = domctl.getvcpucontext(a, 0)
    ctx.ctrlreg[3] = 0
    assert domctl.setvcpucontext(a, 0, ctx) < 0
    assert not domctl.getvcpuinfo(a, 0).online


def test_kernel_load_puts_a_segment_that_is_not_page_aligned_on_its_own_frames():
    """Regression: the builder copied a segment a page at a time from its start,
    so one that began inside a page wrote its page-sized pieces across a frame
    boundary into the next machine frame, not the frame of the next pfn."""
    hv = Hypervisor(32, seed=5)
    dom = domctl.createdomain(hv, "t", 1, 16)
    notes = {XenElfNote.VIRT_BASE: VIRT_BASE.to_bytes(8, "little")}
    data = bytes(range(256)) * 40  # 10240 bytes: pfns 0, 1, 2 and a bit of 3
    image = GuestImage(Path("fake"), [Segment(VIRT_BASE + 0x800, data, len(data))], notes)
    xd = DomImage(hv, dom, make_config(), image, python_kernel=False)
    meminit(xd, 16)
    kernel_load(xd)
    guest = b"".join(domctl.map_foreign_range(hv, dom, xd.mfn(pfn)).tobytes()
                     for pfn in range(4))
    assert guest[0x800:0x800 + len(data)] == data
    assert guest[:0x800] == bytes(0x800) and guest[0x800 + len(data):] == \
        bytes(4 * PAGE_SIZE - 0x800 - len(data))
    hv.close()


def test_the_control_interface_imports_nothing_of_the_toolstack():
    """domctl is below the toolstack: it is given what it needs, never reaches up."""
    from tests.test_layering import ROOT, imports
    bad = [m for p, m in imports("hypervisor") if p == ROOT / "hypervisor" / "domctl.py"
           and m.startswith("hypervisor.toolstack")]
    assert bad == []
