"""A fake ``cpu`` for testing guest-kernel code that only reads and writes
kernel memory: pages of the kernel's linear map made on first touch, a page
allocator counting up, and what the code printed."""

from __future__ import annotations

from guestos.mm import PAGE_SIZE, va


class FakeCpu:
    vcpu_id = 0

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.next_pfn = 0x100
        self.printed: list[str] = []

    def kva(self, pfn: int) -> int:
        return va(pfn)

    def alloc_page(self, cpu: object = None, n: int = 1, zero: bool = True) -> int:
        pfn, self.next_pfn = self.next_pfn, self.next_pfn + n
        return pfn

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        while size:
            page, off = divmod(addr, PAGE_SIZE)
            n = min(size, PAGE_SIZE - off)
            out += self.pages.setdefault(page, bytearray(PAGE_SIZE))[off:off + n]
            addr, size = addr + n, size - n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        while data:
            page, off = divmod(addr, PAGE_SIZE)
            n = min(len(data), PAGE_SIZE - off)
            self.pages.setdefault(page, bytearray(PAGE_SIZE))[off:off + n] = data[:n]
            addr, data = addr + n, data[n:]

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(8, "little"))
