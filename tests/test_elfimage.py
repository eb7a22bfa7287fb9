"""The ELF loader reads a guest image as Xen's libelf does
(xen.git common/libelf/libelf-dominfo.c): notes from PT_NOTE segments, else
from SHT_NOTE sections (elf_xen_parse); without VIRT_BASE or ENTRY notes,
virt_base 0 and the ELF header's entry point (elf_xen_addr_calc_check).
firmware/tests/zero.S is such a guest, linked at virtual address 0."""

from __future__ import annotations

import pytest

from hypervisor.public.elfnote import XenElfNote
from hypervisor.toolstack.builder import build_domain
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.elfimage import ImageError, load_image
from hypervisor.toolstack.session import run_domain
from tests.conftest import FIRMWARE, GUEST_IMAGE

ZERO_IMAGE = FIRMWARE / "tests/zero.elf"


def test_notes_in_a_section_are_read_when_no_segment_holds_them():
    img = load_image(ZERO_IMAGE)
    assert img.note_str(XenElfNote.LOADER) == "generic"
    assert img.hypercall_page == 0x1000


def test_without_virt_base_and_entry_notes_libelf_defaults_apply():
    img = load_image(ZERO_IMAGE)
    assert XenElfNote.VIRT_BASE not in img.xen_notes
    assert XenElfNote.ENTRY not in img.xen_notes
    assert (img.virt_base, img.entry) == (0, 0)  # entry: e_entry, which is 0 here


def test_notes_in_segments_still_win():
    img = load_image(GUEST_IMAGE)
    assert img.virt_base == 0xFFFFFFFF80000000


def test_a_guest_starts_at_virtual_address_zero(booted):
    """The guest's first instruction is at 0; it asks for a reboot."""
    cfg = DomainConfig(name="zero", memory=16, vcpus=1, image=ZERO_IMAGE, seed=1)
    hv, dom = booted(cfg)
    r = run_domain(hv, dom)
    assert r.reason == "reboot", (r.why, dom.crash_report)


def test_an_entry_outside_the_image_is_refused(tmp_path, booted):
    """libelf's elf_xen_addr_calc_check: "ELF start or entries are out of bounds"."""
    bad = tmp_path / "bad-entry.elf"
    raw = bytearray(ZERO_IMAGE.read_bytes())
    raw[24:32] = (0x100000).to_bytes(8, "little")  # e_entry, past the image's end
    bad.write_bytes(bytes(raw))
    cfg = DomainConfig(name="bad", memory=16, vcpus=1, image=bad, seed=1)
    with pytest.raises(ImageError, match="out of bounds"):
        build_domain(booted.bare(32), cfg)


def test_segments_are_placed_by_their_physical_address(tmp_path, booted):
    """libelf places a segment at p_paddr + VIRT_BASE - PADDR_OFFSET
    (elf_parse_binary, elf_xen_addr_calc_check); p_vaddr plays no part."""
    moved = tmp_path / "vaddr-moved.elf"
    raw = bytearray(ZERO_IMAGE.read_bytes())
    phdr = int.from_bytes(raw[32:40], "little")  # e_phoff; the first is the PT_LOAD
    raw[phdr + 16:phdr + 24] = (0x40000).to_bytes(8, "little")  # p_vaddr, not p_paddr
    moved.write_bytes(bytes(raw))
    assert load_image(moved).segments[0].vaddr == 0
    hv, dom = booted(DomainConfig(name="moved", memory=16, vcpus=1, image=moved, seed=1))
    assert run_domain(hv, dom).reason == "reboot"
