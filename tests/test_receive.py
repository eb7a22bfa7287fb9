"""The stream receiver (restore.restore_stream, as xg_sr_restore.c's
restore() loop): the domain is created from the xl header's config, each
PAGE_DATA applied as it arrives, and at END the checks that need the whole
stream, then stream_complete. One parser (image.RecordParser) serves it and
the file check, so a damaged stream is refused with the file's words, and
nothing is left of the new domain: the same refusals as the image check's
table (tests/test_image_check.py), driven through a stream."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from hypervisor.domctl import Hypervisor
from hypervisor.toolstack.image import ImageError, scan_image
from hypervisor.toolstack.restore import RestoreError, restore_image, restore_stream
from tests.test_image_check import DAMAGE, good  # noqa: F401  (a module fixture)
from tests.test_repeated_pages import memory


def test_a_stream_gives_the_memory_a_file_gives(good):  # noqa: F811
    """The same image through a stream and from its file: the same frames
    (same seed, same order of allocation), pages, types and pins."""
    hva, doma, _ = restore_image(good)
    hvb, domb, stats = restore_stream(io.BytesIO(good.read_bytes()))
    try:
        for x, y in zip(memory(hva, doma), memory(hvb, domb), strict=True):
            assert np.array_equal(x, y)
        assert stats.pages == scan_image(good).ever_data.sum() and stats.complete_s > 0
    finally:
        hva.close()
        hvb.close()


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_stream_is_refused_with_the_files_words(case, good):  # noqa: F811
    damage, says = DAMAGE[case]
    raw = bytearray(good.read_bytes())
    damage(raw, scan_image(good))
    hv = Hypervisor(96, seed=5)
    free = hv.machine.frames.nr_free
    try:
        with pytest.raises(ImageError, match=re.escape(says)):
            restore_stream(io.BytesIO(bytes(raw)), hv=hv)
        assert not hv.domains and hv.machine.frames.nr_free == free
    finally:
        hv.close()


def test_a_stream_cut_short_is_a_failed_restore_leaving_nothing(good):  # noqa: F811
    raw = good.read_bytes()
    info = scan_image(good)
    hv = Hypervisor(96, seed=5)
    free = hv.machine.frames.nr_free
    try:
        for cut in (30, info.libxc_offset + 5, info.records[5].offset + 100,
                    info.records[-3].offset, info.size - 4):
            with pytest.raises(RestoreError, match="truncated at offset"):
                restore_stream(io.BytesIO(raw[:cut]), hv=hv)
            assert not hv.domains and hv.machine.frames.nr_free == free
    finally:
        hv.close()
