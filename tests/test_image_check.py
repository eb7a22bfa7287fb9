"""The image check refuses, before anything is built, every damaged image a
fuzzer found restoring wrongly: hung (a VCPU's context missing or not
online, a FIFO), silently wrong (a changed p2m frame), panicking (a
pagetable retyped), or refused in a garbled message. Each case damages a copy
of one good image and expects one line, exit 2, naming what is wrong."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hypervisor.core import Hypervisor
from hypervisor.public.arch_x86 import VGCF_online, vcpu_guest_context
from hypervisor.toolstack import pfinfo, restore, stream
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.image import ImageError, ImageInfo, scan_image, seal
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.stream import RecType
from tests.conftest import ROOT, save_example

EXAMPLE = ROOT / "examples" / "save-restore.toml"
FLAGS_AT = stream.RHDR.size + stream.VCPU_HDR.size + vcpu_guest_context.flags.offset


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """The example saved at 12 ms: four VCPUs, five pinned L4s."""
    return save_example(tmp_path_factory.mktemp("check") / "good.img", 12_000_000)


# --- how to damage an image: each takes the file's bytes and its scan -------------------

def _record(info: ImageInfo, rtype: int, nth: int = -1) -> int:
    return [r.offset for r in info.records if r.type == rtype][nth]


def _put(raw: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, raw, offset, value)


def retype_last_vcpu_optional(raw: bytearray, info: ImageInfo) -> None:
    at = _record(info, RecType.X86_PV_VCPU_BASIC)
    _put(raw, at, "<I", RecType.X86_PV_VCPU_BASIC | stream.REC_TYPE_OPTIONAL)


def clear_last_vcpu_online(raw: bytearray, info: ImageInfo) -> None:
    at = _record(info, RecType.X86_PV_VCPU_BASIC) + FLAGS_AT
    _put(raw, at, "<Q", info.context(max(info.vcpus)).flags & ~VGCF_online)


def p2m_frame(old: int, new: int) -> Callable[[bytearray, ImageInfo], None]:
    def damage(raw: bytearray, info: ImageInfo) -> None:
        i = info.p2m_frame_pfns.tolist().index(old)
        at = _record(info, RecType.X86_PV_P2M_FRAMES) + stream.RHDR.size
        _put(raw, at + stream.P2M_FRAMES_HDR.size + 8 * i, "<Q", new)
    return damage


def p2m_frame_nth(n: int, delta: int) -> Callable[[bytearray, ImageInfo], None]:
    """The n-th p2m frame moved ``delta`` pfns on (the frames' pfns follow the
    image's size: a program more in the image moves them)."""
    def damage(raw: bytearray, info: ImageInfo) -> None:
        old = int(info.p2m_frame_pfns[n])
        p2m_frame(old, old + delta)(raw, info)
    return damage


def p2m_frame_twice(raw: bytearray, info: ImageInfo) -> None:
    p2m_frame(int(info.p2m_frame_pfns[1]), int(info.p2m_frame_pfns[0]))(raw, info)


def _retype(raw: bytearray, info: ImageInfo, pfn: int, nib: int) -> None:
    for b in info.batches:
        hit = np.flatnonzero(b.pfns == pfn)
        if hit.size:
            at = b.offset + stream.RHDR.size + stream.PAGE_DATA_HDR.size + 8 * int(hit[0]) + 7
            raw[at] = nib << 4 | raw[at] & 0xF
            return
    raise AssertionError(f"pfn {pfn:#x} is in no batch")


def _cr3s(info: ImageInfo) -> set[int]:
    return {int(info.context(v).ctrlreg[3]) >> 12 for v in info.vcpus}


def _tables(info: ImageInfo, nib: int) -> list[int]:
    return np.flatnonzero(info.nibbles == nib).tolist()


def retype_pinned_l4_notab(raw: bytearray, info: ImageInfo) -> None:
    l4 = [p for p in _tables(info, pfinfo.LPINTAB | 4) if p not in _cr3s(info)]
    _retype(raw, info, l4[-1], pfinfo.NOTAB)


def unpin_the_cr3_l4(raw: bytearray, info: ImageInfo) -> None:
    _retype(raw, info, min(_cr3s(info)), 4)


def retype_level(level: int) -> Callable[[bytearray, ImageInfo], None]:
    def damage(raw: bytearray, info: ImageInfo) -> None:
        _retype(raw, info, _tables(info, level)[0], pfinfo.NOTAB)
    return damage


def libxc_version_2(raw: bytearray, info: ImageInfo) -> None:
    _put(raw, info.libxc_offset + 12, ">I", 2)  # the image header's version


def unknown_mandatory_record(raw: bytearray, info: ImageInfo) -> None:
    _put(raw, _record(info, RecType.X86_TSC_INFO), "<I", 0xCC)


def pfn_twice_in_a_batch(raw: bytearray, info: ImageInfo) -> None:
    entries = _record(info, RecType.PAGE_DATA, 0) + stream.RHDR.size + stream.PAGE_DATA_HDR.size
    first, second = struct.unpack_from("<QQ", raw, entries)
    mask = stream.PAGE_DATA_PFN_MASK
    _put(raw, entries + 8, "<Q", (second & ~mask) | (first & mask))


def rename_kernel_module(raw: bytearray, info: ImageInfo) -> None:
    at = bytes(raw).index(b'"module"')
    raw[at:at + 8] = b'"modulx"'


# case -> how to damage -> what the one line must say
DAMAGE = {
    "a VCPU context retyped optional": (retype_last_vcpu_optional,
                                        "no context (X86_PV_VCPU_BASIC) for vcpu 3"),
    "a VCPU's online flag cleared": (clear_last_vcpu_online, "vcpu3's context is not marked"),
    "the first p2m frame 0x80 on": (p2m_frame_nth(0, 0x80), "X86_PV_P2M_FRAMES"),
    "the 27th p2m frame 0x40 on": (p2m_frame_nth(26, 0x40), "X86_PV_P2M_FRAMES"),
    "a p2m frame listed twice": (p2m_frame_twice, "in the p2m frame list twice"),
    "a pinned L4 retyped NOTAB": (retype_pinned_l4_notab, "is named by no table of level L4"),
    "CR3's L4 unpinned": (unpin_the_cr3_l4, "expected L4 pinned"),
    "an L3 retyped NOTAB": (retype_level(3), "type NOTAB, expected L3"),
    "an L2 retyped NOTAB": (retype_level(2), "type NOTAB, expected L2"),
    "STATIC_DATA_END in a v2 stream": (libxc_version_2, "in a version 2 stream"),
    "an unknown mandatory record": (unknown_mandatory_record,
                                    "mandatory record 0xcc at offset"),
    "the kernel's module key renamed": (rename_kernel_module, "pvlab.kernel.module is missing"),
    "a pfn twice in one PAGE_DATA": (pfn_twice_in_a_batch, "pfn 0x0 twice in one batch (index 0 "
                                                           "and 1)"),
}


@pytest.fixture
def nothing_built(monkeypatch):
    """A restore that gets as far as creating a domain fails the test."""
    def create(*args, **kwargs):
        raise AssertionError("a domain was created for a damaged image")
    monkeypatch.setattr(restore.domctl, "createdomain", create)


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_image_is_refused_before_anything_is_built(case, good, tmp_path, capsys,
                                                             nothing_built):
    damage, says = DAMAGE[case]
    raw = bytearray(good.read_bytes())
    damage(raw, scan_image(good))
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match=re.escape(says)):
        scan_image(bad)
    assert main(["restore", str(bad), "--until", "1ms"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert err.count(str(bad)) == 1, err
    assert " record record" not in err and "record 0xcc record" not in err, err


def test_a_fifo_is_refused_without_being_read(tmp_path, capsys, nothing_built):
    fifo = tmp_path / "fifo.img"
    os.mkfifo(fifo)  # nobody writes it: an open or read would block for ever
    assert main(["restore", str(fifo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pvlab: {fifo}: not a regular file", err


def test_the_good_image_passes_the_check(good):
    info = scan_image(good)
    assert sorted(info.vcpus) == [0, 1, 2, 3]
    assert info.xl_config["b_info"]["avail_vcpus"] == [0, 1, 2, 3]


def test_a_vcpu_down_at_the_save_is_no_refusal(good, tmp_path):
    """Xen's save skips an offline VCPU: with the config saying it was down,
    an image without its context is a good one."""
    raw = bytearray(good.read_bytes())
    retype_last_vcpu_optional(raw, scan_image(good))
    cfg = b'"avail_vcpus": [0, 1, 2, 3]'
    at = bytes(raw).index(cfg)
    raw[at:at + len(cfg)] = b'"avail_vcpus": [0, 1, 2]   '
    seal(raw)  # an image edited on purpose, and meant to be good, is sealed again
    img = tmp_path / "down.img"
    img.write_bytes(bytes(raw))
    assert sorted(scan_image(img).vcpus) == [0, 1, 2]


def test_a_refusal_after_the_domain_exists_exits_2_and_leaves_nothing(good, monkeypatch,
                                                                      capsys):
    """What only the hypervisor finds (here: a table it will not pin) is a
    refusal of the image, as the check's are: exit 2, the domain gone."""
    hv = Hypervisor(96, seed=5)
    free = hv.machine.frames.nr_free
    monkeypatch.setattr(restore.domctl, "mmuext_pin_table", lambda *a: -22)
    with pytest.raises(ImageError, match="nothing is left of the new domain"):
        restore_image(good, hv=hv)
    assert not hv.domains and hv.machine.frames.nr_free == free
    hv.close()
    assert main(["restore", str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].count(str(good)) == 1, err

