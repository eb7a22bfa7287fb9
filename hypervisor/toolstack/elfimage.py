"""Reading a guest image: PT_LOAD segments and ELF notes (Xen's and pvlab's),
with pyelftools, as libxenguest's xc_dom_elfloader does."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

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

    def note_u64(self, note: int) -> int:
        raw = self.xen_notes.get(note)
        if raw is None:
            raise ImageError(f"{self.path}: no Xen ELF note {XenElfNote(note).name}")
        return int.from_bytes(raw[:8].ljust(8, b"\0"), "little")

    def note_str(self, note: int) -> str:
        return self.xen_notes.get(note, b"").split(b"\0")[0].decode(errors="replace")

    @property
    def virt_base(self) -> int:
        return self.note_u64(XenElfNote.VIRT_BASE)

    @property
    def entry(self) -> int:
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


def parse_notes(data: bytes) -> list[tuple[str, int, bytes]]:
    """ELF notes as (name, type, descriptor). pyelftools renames note types
    after GNU's, which mean something else under the name "Xen"."""
    notes = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        name = data[pos:pos + namesz].rstrip(b"\0").decode(errors="replace")
        pos += (namesz + 3) & ~3
        notes.append((name, ntype, data[pos:pos + descsz]))
        pos += (descsz + 3) & ~3
    return notes


def load_image(path: str | Path) -> GuestImage:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            elf = ELFFile(f)
            if elf.get_machine_arch() != "x64":
                raise ImageError(f"{p}: not an x86-64 image ({elf.get_machine_arch()})")
            img = GuestImage(p, [])
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    img.segments.append(Segment(seg["p_vaddr"], seg.data(), seg["p_memsz"]))
                elif seg["p_type"] == "PT_NOTE":
                    for name, ntype, desc in parse_notes(seg.data()):
                        if name == "Xen":
                            img.xen_notes[ntype] = desc
                        elif name == PVLAB_NOTE_NAME:
                            img.pvlab_notes[ntype] = desc
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
