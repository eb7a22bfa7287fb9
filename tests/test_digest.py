"""The integrity digest in the xl header's optional data. Xen's stream has no
checksum over page data, so a changed octet of a data page used to restore
silently; pvlab's digests catch it: the image's digest is the root of a hash
tree over the structure and each block of pages (each octet hashed once),
checked whole before an eager restore builds anything and by `pvlab image
check`, block by block as a lazy restore reads. Xen's tools skip the
optional data after the config and stop at libxl's END, so the image is still
an xl save file. An older image (a digest of the whole file) is still read."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import pytest

from hypervisor.toolstack import savefile
from hypervisor.toolstack.image import ImageError, scan_image, seal
from hypervisor.toolstack.lazyrestore import ImageChanged, restore_image_lazy
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import run_domain
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


def test_the_digest_is_a_hash_tree_over_the_trailer(image):
    """A new image's digest is the trailer's: the block digests and the
    structure's, which cover every octet once."""
    raw = image.read_bytes()
    xl = savefile.read_xl_header(open(image, "rb"))
    assert xl.tree and xl.page_digests is not None
    trailer = raw[xl.page_digests.trailer:]
    assert hashlib.sha256(trailer).digest() == xl.digest == xl.page_digests.digest
    pages, end = savefile.page_ranges(open(image, "rb"), xl)
    assert end == xl.page_digests.trailer
    first_block = savefile.digest_blocks(pages)[0]
    o, n = first_block
    assert hashlib.sha256(raw[o:o + n]).digest() == trailer[:32]


def older_image(raw: bytearray) -> bytearray:
    """What the pvlab before the hash tree wrote: the same octets, the whole
    file's digest (named "sha256") in place of the tree's."""
    xl = savefile.read_xl_header(io.BytesIO(bytes(raw)))
    raw[xl.digest_offset - 16:xl.digest_offset] = b"sha256".ljust(16, b"\0")
    seal(raw)
    return raw


def _flip_a_data_page(raw: bytearray, image) -> int:
    info = scan_image(image)
    batch = info.batches[len(info.batches) // 2]
    at = batch.data_offset + 5 * 4096 + 8
    raw[at] ^= 0x01
    return at


def test_an_altered_page_is_caught_by_the_check_eager_and_lazy_restore(image, tmp_path):
    """One flipped bit in a data page: `pvlab image check` and the eager
    restore refuse it naming its block; the lazy restore, which starts
    without reading it, ends the guest when the page is first read."""
    raw = bytearray(image.read_bytes())
    _flip_a_data_page(raw, image)
    bad = tmp_path / "altered.img"
    bad.write_bytes(bytes(raw))
    r = subprocess.run([sys.executable, "-m", "hypervisor", "image", "check", str(bad)],
                       cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "integrity digest does not match" in r.stderr and "pages of a PAGE_DATA" in r.stderr
    with pytest.raises(ImageError, match="integrity digest does not match"):
        restore_image(bad)
    hv, dom, _, lazy = restore_image_lazy(bad)
    try:
        with pytest.raises(ImageChanged, match="do not match their digest"):
            run_domain(hv, dom, 2_000_000_000)
    finally:
        lazy.close()


def test_an_older_image_still_restores_and_is_checked(image, tmp_path):
    """An image with the whole file's digest (before the hash tree) is read:
    checked and restored; an altered page in it is refused."""
    old = tmp_path / "older.img"
    raw = older_image(bytearray(image.read_bytes()))
    old.write_bytes(bytes(raw))
    assert not savefile.read_xl_header(open(old, "rb")).tree
    info = scan_image(old)
    hv, _, stats = restore_image(old)
    assert stats.pages == info.copies - int(sum((~b.with_data).sum() for b in info.batches))
    hv.close()
    _flip_a_data_page(raw, image)
    altered = tmp_path / "older-altered.img"
    altered.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="integrity digest does not match"):
        scan_image(altered)
    assert info.nr_pfns


def test_the_check_verifies_an_older_images_page_digests_too(image, tmp_path):
    """An older image whose whole-file digest holds but whose page digest of
    a block is not its pages' (a saver's bug, or a trailer rewritten and the
    file sealed whole again): `pvlab image check` checks every block and
    refuses it, as the lazy restore would when it read the block."""
    raw = older_image(bytearray(image.read_bytes()))
    xl = savefile.read_xl_header(io.BytesIO(bytes(raw)))
    index = xl.page_digests
    raw[index.trailer] ^= 1  # the first block's digest
    trailer = bytes(raw[index.trailer:])
    at = index.value_offset + savefile.PAGE_DIGESTS_VALUE - 32
    raw[at:at + 32] = hashlib.sha256(trailer).digest()
    value = raw[index.value_offset:index.value_offset + savefile.PAGE_DIGESTS_VALUE]
    for offset, n in xl.zeroed():  # the older rule: these read as zeros
        raw[offset:offset + n] = bytes(n)
    whole = hashlib.sha256(raw).digest()
    raw[index.value_offset:index.value_offset + savefile.PAGE_DIGESTS_VALUE] = value
    raw[xl.digest_offset:xl.digest_offset + 32] = whole
    bad = tmp_path / "older-trailer.img"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="pages of a PAGE_DATA record: the integrity digest"):
        scan_image(bad)
