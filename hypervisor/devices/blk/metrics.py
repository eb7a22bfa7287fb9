"""What the block device counts: every counter declared once, with its
meaning (Firecracker's block/virtio/metrics.rs). A request the device
refuses is completed all the same, with IOERR or UNSUPP where a status byte
can be written, and counted here; none is ever trusted."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class BlockMetrics:
    """The block device's counters (slots: a misspelt counter is an error)."""

    requests: int = 0        # chains taken from the request queue
    reads: int = 0           # IN requests served
    writes: int = 0          # OUT requests served
    flushes: int = 0         # FLUSH requests served (an fsync of the image each)
    get_ids: int = 0         # GET_ID requests served
    read_bytes: int = 0
    write_bytes: int = 0
    ok: int = 0              # requests completed with status OK
    ioerr: int = 0           # ... with status IOERR
    unsupp: int = 0          # ... with status UNSUPP (a type the device does not do)
    # why a request was refused (each also counts in ioerr, unsupp or no_status)
    no_status: int = 0       # no device-writable byte at the end: completed with used
                             # length 0, no status written (Firecracker's parse error)
    bad_header: int = 0      # fewer than 16 device-readable bytes before the data
    bad_direction: int = 0   # data the wrong way for its type (IN data readable, OUT
                             # data writable, FLUSH with data, GET_ID not 20 writable)
    bad_length: int = 0      # IN/OUT data not a whole number of 512-byte sectors, or none
    out_of_range: int = 0    # sectors beyond the capacity (or a FLUSH's sector not 0)
    too_many_segments: int = 0  # more data segments than seg_max
    segment_too_big: int = 0    # a data segment larger than size_max
    read_only: int = 0       # OUT on a read-only disk
    host_errors: int = 0     # the host's file failed (short read, OSError): IOERR

    def nonzero(self) -> dict[str, int]:
        """The counters that moved, for the host's report."""
        return {name: value for name, value in asdict(self).items() if value}
