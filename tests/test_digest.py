"""The integrity digest in the xl header's optional data. Xen's stream has no
checksum over page data, so a changed octet of a data page used to restore
silently; pvlab's digest over the whole file catches it before anything is
built. Xen's tools skip the optional data after the config, so the image is
still an xl save file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hypervisor.toolstack import savefile
from hypervisor.toolstack.image import ImageError, scan_image, seal
from tests.conftest import ROOT, checkout_env, save_example

EXAMPLE = ROOT / "examples" / "save-restore.toml"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return save_example(tmp_path_factory.mktemp("digest") / "save.img", 6_000_000)


def _restore(path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", "restore", str(path)], cwd=ROOT,
                          env=checkout_env(), capture_output=True, text=True, timeout=300)


def test_the_digest_follows_the_config_in_the_optional_data(image):
    raw = image.read_bytes()
    xl = savefile.read_xl_header(open(image, "rb"))
    assert xl.digest is not None and len(xl.digest) == 32
    assert raw[xl.digest_offset:xl.digest_offset + 32] == xl.digest
    assert xl.digest_offset + 32 <= xl.end and xl.end % 8 == 0
    sealed = bytearray(raw)
    seal(sealed)  # sealing a good image changes nothing
    assert bytes(sealed) == raw


def test_three_flipped_octets_in_a_data_page_are_refused_in_one_line_exit_2(image, tmp_path):
    info = scan_image(image)
    batch = info.batches[len(info.batches) // 2]
    at = batch.data_offset + 3 * 4096 + 100  # inside a page's data, away from any header
    raw = bytearray(image.read_bytes())
    for i in range(3):
        raw[at + i] ^= 0x5A
    bad = tmp_path / "flipped.img"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="integrity digest does not match"):
        scan_image(bad)
    r = _restore(bad)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "integrity digest" in r.stderr and "Traceback" not in r.stderr


def test_an_image_without_a_digest_is_refused_as_from_an_older_pvlab(image, tmp_path):
    raw = bytearray(image.read_bytes())
    xl = savefile.read_xl_header(open(image, "rb"))
    name_at = xl.digest_offset - 16
    # what a version 2 image had: padding, and nothing after libxl's END
    raw[name_at:xl.page_digests.value_offset + savefile.PAGE_DIGESTS_VALUE] = bytes(
        xl.page_digests.value_offset + savefile.PAGE_DIGESTS_VALUE - name_at)
    del raw[xl.page_digests.trailer:]
    old = tmp_path / "v2.img"
    old.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="no integrity digest.*older pvlab"):
        scan_image(old)


def test_a_changed_digest_is_refused(image, tmp_path):
    raw = bytearray(image.read_bytes())
    xl = savefile.read_xl_header(open(image, "rb"))
    raw[xl.digest_offset] ^= 1
    bad = tmp_path / "digest.img"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="integrity digest does not match"):
        scan_image(bad)
