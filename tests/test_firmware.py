"""The firmware: user programs behave as their sources say, the guest image
carries Xen's notes and pvlab's, and the committed ELFs are what the sources
build to (wherever binutils are installed)."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from hypervisor.public.elfnote import PVLAB_NOTE_KERNEL, PVLAB_NOTE_NATIVE_TEXT, XenElfNote
from hypervisor.public.native import PVLAB_IMAGE_MAGIC, pvlab_image_header
from hypervisor.toolstack.elfimage import load_image
from hypervisor.toolstack.session import run_domain
from tests.conftest import FIRMWARE, GUEST_IMAGE, make_config
from tests.reference import hashchain_line

PROGRAMS = ("hello", "counter", "hashchain", "dirtier", "spawner", "fault", "sh", "fdtest",
            "portecho")


@pytest.fixture
def console(booted):
    """console(cmdline, vcpus=1): a guest's whole run, which must power off;
    its console."""
    def run(cmdline: str, vcpus: int = 1) -> str:
        hv, dom = booted(make_config(cmdline, vcpus=vcpus, memory=16))
        r = run_domain(hv, dom)
        assert r.reason == "poweroff", dom.crash_report
        return r.console.decode()
    return run


def test_hashchain_matches_the_python_reference(console):
    out = console("run=hashchain:3:2")
    assert "hashchain start rounds=3 pages=2\n" in out
    assert hashchain_line(3, 2) in out


def test_counter_and_dirtier_print_what_they_should(console):
    lines = console("run=counter:3:10,dirtier:2:10:7", vcpus=2).splitlines()
    # the two VCPUs' lines interleave; each program's own lines keep their order
    assert [x for x in lines if x.startswith("counter")] == ["counter 1", "counter 2",
                                                             "counter 3"]
    assert [x for x in lines if x.startswith("dirtier")] == ["dirtier start pages=2",
                                                             "dirtier done passes=7"]


def test_image_notes_and_header():
    img = load_image(GUEST_IMAGE)
    assert img.note_str(XenElfNote.GUEST_OS) == "pvlab"
    assert img.note_str(XenElfNote.LOADER) == "generic"
    assert img.virt_base == 0xFFFFFFFF80000000
    assert img.note_u64(XenElfNote.SUSPEND_CANCEL) == 1
    assert img.pvlab_notes[PVLAB_NOTE_KERNEL].rstrip(b"\0") == b"guestos"
    text, size = struct.unpack("<QQ", img.pvlab_notes[PVLAB_NOTE_NATIVE_TEXT])
    assert img.entry == text and size >= 4096
    first = img.segments[0]
    assert first.vaddr == img.virt_base
    hdr = pvlab_image_header.from_buffer_copy(first.data[:72])
    assert hdr.magic == PVLAB_IMAGE_MAGIC
    assert (hdr.native_text, hdr.native_text_size) == (text, size)
    assert hdr.hypercall_page == img.hypercall_page
    assert hdr.image_end == img.end


def test_program_table_embeds_each_program():
    img = load_image(GUEST_IMAGE)
    hdr = pvlab_image_header.from_buffer_copy(img.segments[0].data[:72])
    seg = img.segments[0]
    table = hdr.programs - seg.vaddr
    (count,) = struct.unpack_from("<Q", seg.data, table)
    names = []
    for i in range(count):
        entry = table + 8 + 32 * i
        name = seg.data[entry:entry + 16].rstrip(b"\0").decode()
        off, size = struct.unpack_from("<QQ", seg.data, entry + 16)
        blob = seg.data[table + off:table + off + size]
        assert blob == (FIRMWARE / f"user/{name}.elf").read_bytes()
        names.append(name)
    assert tuple(names) == PROGRAMS


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld") and shutil.which("make")),
                    reason="GNU binutils (as, ld) and make are needed to rebuild the firmware")
def test_committed_elfs_match_their_sources(tmp_path):
    build = tmp_path / "firmware"
    shutil.copytree(FIRMWARE, build, ignore=shutil.ignore_patterns("*.elf", "*.o"))
    subprocess.run(["make", "-s", "-C", str(build)], check=True, capture_output=True)
    committed = sorted(str(p.relative_to(FIRMWARE)) for p in FIRMWARE.rglob("*.elf"))
    assert {"guest.elf", "tests/hcall.elf", "tests/xsa.elf"} <= set(committed)
    for elf in committed:
        assert (build / elf).read_bytes() == (FIRMWARE / elf).read_bytes(), \
            f"firmware/{elf} differs from what its sources build to: run `make firmware`"
