"""Reading a guest image: PT_LOAD segments and ELF notes (Xen's and pvlab's),
with pyelftools, as libxenguest's xc_dom_elfloader does."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_NOTE_N_TYPE

from hypervisor.public.elfnote import (
    PVLAB_NOTE_KERNEL,
    PVLAB_NOTE_NAME,
    PVLAB_NOTE_NATIVE_TEXT,
    XenElfNote,
)


class ImageError(Exception):
    """The guest image is missing, not an x86-64 ELF, or lacks a needed note."""


@dataclass
class Segment:
    """A PT_LOAD segment, at the virtual address libelf gives it: p_paddr +
    VIRT_BASE - PADDR_OFFSET (elf_xen_addr_calc_check's virt_offset)."""

    vaddr: int
    data: bytes
    memsz: int


@dataclass
class GuestImage:
    path: Path
    segments: list[Segment]
    xen_notes: dict[int, bytes] = field(default_factory=dict)
    pvlab_notes: dict[int, bytes] = field(default_factory=dict)
    symbols: dict[int, str] = field(default_factory=dict)
    e_entry: int = 0  # the ELF header's entry point (the entry without an ENTRY note)

    def note_u64(self, note: int) -> int:
        raw = self.xen_notes.get(note)
        if raw is None:
            raise ImageError(f"{self.path}: no Xen ELF note {XenElfNote(note).name}")
        return int.from_bytes(raw[:8].ljust(8, b"\0"), "little")

    def note_str(self, note: int) -> str:
        return self.xen_notes.get(note, b"").split(b"\0")[0].decode(errors="replace")

    @property
    def virt_base(self) -> int:
        """VIRT_BASE, or 0 without the note (libelf's elf_xen_addr_calc_check)."""
        if XenElfNote.VIRT_BASE not in self.xen_notes:
            return 0
        return self.note_u64(XenElfNote.VIRT_BASE)

    @property
    def virt_offset(self) -> int:
        """VIRT_BASE - PADDR_OFFSET; the offset is 0 without its note (the
        default for an image with notes), and needs VIRT_BASE (libelf)."""
        if XenElfNote.PADDR_OFFSET not in self.xen_notes:
            return self.virt_base
        if XenElfNote.VIRT_BASE not in self.xen_notes:
            raise ImageError(f"{self.path}: ELF_PADDR_OFFSET set, VIRT_BASE unset")
        return (self.virt_base - self.note_u64(XenElfNote.PADDR_OFFSET)) & 0xFFFFFFFFFFFFFFFF

    @property
    def entry(self) -> int:
        """ENTRY, or the ELF header's entry point without the note (libelf)."""
        if XenElfNote.ENTRY not in self.xen_notes:
            return self.e_entry
        return self.note_u64(XenElfNote.ENTRY)

    @property
    def hypercall_page(self) -> int:
        return self.note_u64(XenElfNote.HYPERCALL_PAGE)

    @property
    def has_python_kernel(self) -> bool:
        return PVLAB_NOTE_KERNEL in self.pvlab_notes

    @property
    def kernel_module(self) -> str:
        raw = self.pvlab_notes.get(PVLAB_NOTE_KERNEL)
        if raw is None:
            raise ImageError(f"{self.path}: no pvlab kernel note: which Python kernel runs it?")
        return raw.split(b"\0")[0].decode()

    @property
    def native_text(self) -> tuple[int, int]:
        raw = self.pvlab_notes.get(PVLAB_NOTE_NATIVE_TEXT)
        if raw is None:
            raise ImageError(f"{self.path}: no pvlab native-text note")
        start, size = struct.unpack("<QQ", raw[:16])
        return start, size

    @property
    def end(self) -> int:
        return max(s.vaddr + s.memsz for s in self.segments)


# pyelftools names note types after GNU's whatever the note's name; under
# "Xen" they are Xen's numbers, so turn the names back into them
_NOTE_TYPE = {name: value for name, value in ENUM_NOTE_N_TYPE.items() if isinstance(value, int)}


def _notes(elf: ELFFile, places: Iterable) -> list[tuple[str, int, bytes]]:
    """The notes of PT_NOTE segments or SHT_NOTE sections, as (name, type, descriptor)."""
    notes = []
    for place in places:
        for note in place.iter_notes():
            ntype = note["n_type"]
            notes.append((note["n_name"] or "", _NOTE_TYPE.get(ntype, ntype),
                          bytes(note["n_descdata"])))
    return notes


def read_notes(elf: ELFFile) -> list[tuple[str, int, bytes]]:
    """libelf's elf_xen_parse: the notes of PT_NOTE segments; if none of them
    is Xen's, those of SHT_NOTE sections (an image may keep its notes in a
    section no segment covers)."""
    notes = _notes(elf, (s for s in elf.iter_segments()
                         if s["p_type"] == "PT_NOTE" and s["p_offset"]))
    if not any(name == "Xen" for name, _, _ in notes):
        notes = _notes(elf, (s for s in elf.iter_sections() if s["sh_type"] == "SHT_NOTE"))
    return notes


def load_image(path: str | Path) -> GuestImage:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            elf = ELFFile(f)
            if elf.get_machine_arch() != "x64":
                raise ImageError(f"{p}: not an x86-64 image ({elf.get_machine_arch()})")
            img = GuestImage(p, [], e_entry=elf["e_entry"])
            for name, ntype, desc in read_notes(elf):
                if name == "Xen":
                    img.xen_notes[ntype] = desc
                elif name == PVLAB_NOTE_NAME:
                    img.pvlab_notes[ntype] = desc
            offset = img.virt_offset
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    at = (seg["p_paddr"] + offset) & 0xFFFFFFFFFFFFFFFF
                    img.segments.append(Segment(at, seg.data(), seg["p_memsz"]))
            symtab = elf.get_section_by_name(".symtab")
            if symtab is not None:
                for sym in symtab.iter_symbols():
                    kind = sym["st_info"]["type"]
                    if sym.name and kind in ("STT_FUNC", "STT_NOTYPE", "STT_OBJECT"):
                        img.symbols.setdefault(sym["st_value"], sym.name)
    except FileNotFoundError:
        raise ImageError(f"{p}: no such image file") from None
    except (ELFError, struct.error) as e:
        raise ImageError(f"{p}: not a valid ELF image ({e})") from None
    if not img.segments:
        raise ImageError(f"{p}: the image has no loadable segment")
    return img
