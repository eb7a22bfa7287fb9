"""The migration stream's framing (hypervisor/toolstack/stream.py): headers
byte for byte as Xen's spec lays them out, 8-octet record padding, and clear
refusals of streams that are not ones."""

from __future__ import annotations

import io

import pytest

from hypervisor.toolstack.stream import (
    RecType,
    StreamError,
    read_headers,
    read_records,
    write_headers,
    write_record,
)


def stream(*records: tuple[int, bytes], version_patch: bytes | None = None) -> bytes:
    out = io.BytesIO()
    write_headers(out, 4, 19)
    for rtype, body in records:
        write_record(out, rtype, body)
    data = out.getvalue()
    if version_patch is not None:
        data = data[:12] + version_patch + data[16:]
    return data


def test_the_headers_are_xens_bytes():
    data = stream()
    assert data[:24] == bytes.fromhex("ffffffffffffffff" "58454e46" "00000003" "0000" "0000"
                                      "00000000")
    assert data[24:40] == bytes.fromhex("01000000" "0c00" "0000" "04000000" "13000000")


def test_records_are_padded_to_8_octets_and_read_back():
    data = stream((RecType.X86_PV_INFO, bytes([8, 4, 0, 0, 0, 0, 0, 0])),
                  (RecType.X86_TSC_INFO, b"abc"), (0x80000001, b"pvlab"), (RecType.END, b""))
    assert (len(data) - 40) % 8 == 0
    src = io.BytesIO(data)
    version, dhdr = read_headers(src)
    assert version == 3 and dhdr.xen_major == 4 and dhdr.page_shift == 12
    recs = list(read_records(src))
    assert [(r.type, r.body) for r in recs] == [
        (RecType.X86_PV_INFO, bytes([8, 4, 0, 0, 0, 0, 0, 0])), (RecType.X86_TSC_INFO, b"abc"),
        (0x80000001, b"pvlab"), (RecType.END, b"")]
    assert recs[1].offset == 40 + 16 and recs[2].offset == 40 + 16 + 16


def test_version_2_is_read_and_others_refused():
    assert read_headers(io.BytesIO(stream(version_patch=b"\0\0\0\2")))[0] == 2
    with pytest.raises(StreamError, match="stream version 4"):
        read_headers(io.BytesIO(stream(version_patch=b"\0\0\0\4")))


def test_not_a_stream_and_big_endian_are_refused():
    with pytest.raises(StreamError, match="not a Xen migration stream"):
        read_headers(io.BytesIO(b"\x7fELF" + bytes(60)))
    data = bytearray(stream())
    data[17] = 1
    with pytest.raises(StreamError, match="big-endian"):
        read_headers(io.BytesIO(bytes(data)))


def test_a_truncation_at_every_octet_is_refused_with_its_offset():
    data = stream((RecType.SHARED_INFO, bytes(4096)), (RecType.END, b""))
    for cut in range(len(data) - 1):
        src = io.BytesIO(data[:cut])
        with pytest.raises(StreamError, match="truncated at offset|not a Xen"):
            read_headers(src)
            list(read_records(src))
