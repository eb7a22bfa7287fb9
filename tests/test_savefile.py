"""A saved image is an xl save file: xl's header and JSON config, libxl's
stream, the libxc stream inside LIBXC_CONTEXT. A reader written here from
the format's facts (not pvlab's reader) checks the framing of every layer
of the images pvlab writes, so the layout is tested without Xen's code."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.toolstack import savefile, stream
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.config import BalloonConfig
from hypervisor.toolstack.control import parse_request
from hypervisor.toolstack.image import ImageError, scan_image
from hypervisor.toolstack.imagetool import describe
from hypervisor.toolstack.session import save_domain
from tests.conftest import ROOT, booting, checkout_env, make_config, save_example

EXAMPLE = ROOT / "examples" / "save-restore.toml"
LIBXL_TYPES = {0: "END", 1: "LIBXC_CONTEXT", 2: "EMULATOR_XENSTORE_DATA",
               3: "EMULATOR_CONTEXT", 4: "CHECKPOINT_END"}


def _records(raw: bytes, at: int, last: int, checkpoint: list | None = None
             ) -> tuple[list[tuple[int, bytes]], int]:
    """Records (u32 type, u32 length, body, zero padding to 8) from ``at`` up
    to and including type ``last`` == 0 (END); returns them and the end.
    ``checkpoint``: a libxc stream's, where libxl's records follow each
    CHECKPOINT (0x0E) inline up to CHECKPOINT_END (4), put in that list."""
    out = []
    while True:
        if checkpoint is not None and out and out[-1][0] == 0x0E:
            recs, at = _records(raw, at, 4)
            checkpoint += recs
        rtype, length = struct.unpack_from("<II", raw, at)
        body = raw[at + 8:at + 8 + length]
        pad = raw[at + 8 + length:at + 8 + length + (-length % 8)]
        assert len(body) == length and pad == bytes(len(pad)), (at, rtype)
        out.append((rtype, body))
        at += 8 + length + len(pad)
        if rtype == last:
            return out, at


def read_layers(raw: bytes) -> dict:
    """Each layer of an xl save file, read by the format alone."""
    assert raw[:32] == b"Xen saved domain, xl format\n \0 \r"
    order, mflags, oflags, optlen = struct.unpack_from("<IIII", raw, 32)
    assert (order, mflags, oflags) == (0x01020304, 3, 0)  # JSON | STREAMv2
    (cfglen,) = struct.unpack_from("<I", raw, 48)
    config = raw[52:52 + cfglen]
    assert config.endswith(b"\0") and 4 + cfglen <= optlen
    at = 48 + optlen
    assert struct.unpack_from(">QII", raw, at) == (0x4C6962786C466D74, 2, 0)  # LibxlFmt v2
    at += 16
    libxl, libxc = [], []
    while not libxl or libxl[-1][0] != 0:
        (rtype, length), body = struct.unpack_from("<II", raw, at), b""
        assert rtype in LIBXL_TYPES
        if rtype == 1:
            assert length == 0
            x = at + 8
            assert raw[x:x + 12] == b"\xff" * 8 + b"XENF"
            assert struct.unpack_from(">I", raw, x + 12)[0] == 3
            libxl.append((rtype, body))
            libxc, at = _records(raw, x + 40, 0, libxl)
            continue
        else:
            recs, at = _records(raw, at, rtype)  # just this one: it is its own last
            body = recs[0][1]
        libxl.append((rtype, body))
    # after libxl's END, pvlab's trailer: a digest per block of each
    # PAGE_DATA record's pages and one of the rest (Xen's readers stop at END)
    pages = [(0, len(b) - 8 - 8 * struct.unpack_from("<I", b)[0]) for t, b in libxc
             if t == stream.RecType.PAGE_DATA]
    assert len(raw) - at == 32 * (len(savefile.digest_blocks(pages)) + 1)
    return {"config": json.loads(config[:-1]), "libxl": libxl, "libxc": libxc}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A save and a checkpoint of the example."""
    out = tmp_path_factory.mktemp("xl")
    made = {"save": save_example(out / "save.img", 6_000_000)}
    assert main(["checkpoint", str(EXAMPLE), str(out), "--every", "5ms", "--max", "1",
                 "--until", "7ms"]) == 0
    made["checkpoint"] = out / "save-restore-checkpoint-001.img"
    return made


def test_the_layouts_have_their_sizes():
    assert savefile.XL_HDR.size == 48 and len(savefile.XL_MAGIC) == 32
    assert savefile.LIBXL_HDR.size == 16 and savefile.EMULATOR_HDR.size == 8
    assert stream.IHDR.size == 24 and stream.DHDR.size == 16 and stream.RHDR.size == 8


def test_a_save_is_an_xl_save_file_with_only_xens_records(images):
    layers = read_layers(images["save"].read_bytes())
    assert [LIBXL_TYPES[t] for t, _ in layers["libxl"]] == [
        "LIBXC_CONTEXT", "EMULATOR_XENSTORE_DATA", "END"]
    assert all(t in stream.RecType._value2member_map_ for t, _ in layers["libxc"])
    assert 0x0E not in [t for t, _ in layers["libxc"]]  # no CHECKPOINT
    config = layers["config"]
    assert config["c_info"] == {"type": "pv", "name": "save-restore"}
    assert config["b_info"]["max_vcpus"] == 4 and config["pvlab"]["kernel"]["module"]
    xs = layers["libxl"][1][1]
    assert struct.unpack_from("<II", xs) == (0, 0) and xs.endswith(b"\0")
    assert b"control/feature-suspend\0" in xs


def test_a_checkpoint_ends_with_checkpoint_end(images):
    """As Xen's checkpointed stream: libxc's CHECKPOINT, then libxl's records
    inline up to CHECKPOINT_END, then libxc's END and libxl's."""
    layers = read_layers(images["checkpoint"].read_bytes())
    assert [LIBXL_TYPES[t] for t, _ in layers["libxl"]][-2:] == ["CHECKPOINT_END", "END"]
    assert [t for t, _ in layers["libxc"]][-2:] == [0x0E, 0]
    assert layers["config"]["pvlab"]["kind"] == "checkpoint"


def test_image_show_explains_every_layer(images):
    text = describe(scan_image(images["checkpoint"]), records=True)
    for words in ("xl save file", "xl header: stream v2, JSON config", "libxl stream version 2",
                  "libxc migration stream version 3", "libxl LIBXC_CONTEXT",
                  "libxl CHECKPOINT_END", "libxc X86_PV_P2M_FRAMES", "EMULATOR_XENSTORE_DATA"):
        assert words in text


def test_an_older_pvlab_image_is_refused_in_one_line_exit_2(images, tmp_path):
    """An image of the old layout, a bare libxc stream, is named as one."""
    info = scan_image(images["save"])
    raw = images["save"].read_bytes()
    old = tmp_path / "old.img"
    old.write_bytes(raw[info.libxc_offset:info.records[-1].offset + 8])
    with pytest.raises(ImageError, match="an image from an older pvlab"):
        scan_image(old)
    r = subprocess.run([sys.executable, "-m", "hypervisor", "restore", str(old)], cwd=ROOT,
                       env=checkout_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "older pvlab" in r.stderr


def test_damaged_outer_layers_are_refused_naming_the_layer(images, tmp_path):
    raw = images["save"].read_bytes()
    bad = tmp_path / "bad.img"

    def refused(offset: int, data: bytes) -> str:
        b = bytearray(raw)
        b[offset:offset + len(data)] = data
        bad.write_bytes(bytes(b))
        with pytest.raises(ImageError) as e:
            scan_image(bad)
        return str(e.value)

    assert "not an xl save file" in refused(0, b"Yen")
    assert "byte order" in refused(32, (0x01020304).to_bytes(4, "big"))
    assert "legacy xl save file" in refused(36, (1).to_bytes(4, "little"))
    optlen = struct.unpack_from("<I", raw, 44)[0]
    assert "LibxlFmt" in refused(48 + optlen, b"Libxlfmt")
    assert "libxl record 0x9" in refused(48 + optlen + 16, (9).to_bytes(4, "little"))
    assert "config" in refused(52, b"{" * 4)


def test_a_config_without_the_kernel_module_is_refused_in_one_line(images, tmp_path):
    raw = images["save"].read_bytes()
    bad = tmp_path / "nomodule.img"
    bad.write_bytes(raw.replace(b'"module"', b'"modulx"', 1))
    with pytest.raises(ImageError, match="pvlab.kernel.module is missing"):
        scan_image(bad)


def test_the_images_are_8_aligned(images):
    for path in images.values():
        info = scan_image(Path(path))
        assert info.libxc_offset % 8 == 0
        assert all(b.data_offset % 8 == 0 for b in info.batches)


@pytest.mark.parametrize("policy", ["deflate", "keep", "discard"])
def test_a_ballooned_guest_has_one_emulator_context_per_device(policy, tmp_path):
    """The balloon's state is libxl's EMULATOR_CONTEXT (emulator 0, index 0),
    and the config names the same device where it is."""
    cfg = dataclasses.replace(
        make_config(f"run=hashchain:400:256,dirtier virtio_balloon.policy={policy}",
                    vcpus=2, memory=8, name="nat"),
        balloon=BalloonConfig(0), requests=[parse_request("1ms mem-set 6")])
    img = tmp_path / "bal.img"
    with booting() as boot:
        hv, dom = boot(cfg)
        save_domain(hv, dom, str(img), 8_000_000, requests=cfg.requests)
    layers = read_layers(img.read_bytes())
    contexts = [body for t, body in layers["libxl"] if t == 3]
    assert len(contexts) == 1 and struct.unpack_from("<II", contexts[0]) == (0, 0)
    state = json.loads(contexts[0][8:])
    assert state["kind"] == "balloon" and state["num_pages"] == 512
    place = {k: state[k] for k in ("bus", "kind", "base", "port")}
    assert layers["config"]["pvlab"]["devices"] == [place]
    assert scan_image(img).devices == [state]


def test_an_image_cut_in_its_outer_layers_is_refused(images, tmp_path):
    """Truncated in xl's header or its config, libxl's header, or at any of
    libxl's records: refused, naming where."""
    raw = images["checkpoint"].read_bytes()
    info = scan_image(images["checkpoint"])
    cuts = {0, 31, 40, 47, 50, info.libxc_offset - 24, info.libxc_offset - 9}
    for r in info.libxl_records:
        cuts |= {r.offset, r.offset + 4, r.offset + 8 + min(r.length, 4)}
    bad = tmp_path / "cut.img"
    for cut in sorted(c for c in cuts if c < len(raw)):
        bad.write_bytes(raw[:cut])
        with pytest.raises(ImageError, match="truncated|offset|no LIBXC_CONTEXT"):
            scan_image(bad)
    raw = images["save"].read_bytes()
    info = scan_image(images["save"])
    xs = next(r for r in info.libxl_records if r.name == "EMULATOR_XENSTORE_DATA")
    end = info.libxl_records[-1].offset
    again = raw[xs.offset:xs.offset + 8 + xs.length + (-xs.length % 8)]
    bad.write_bytes(raw[:end] + again + raw[end:])
    with pytest.raises(ImageError, match="a second EMULATOR_XENSTORE_DATA"):
        scan_image(bad)


def test_an_older_pvlabs_checkpoint_layout_is_refused_in_one_line(images, tmp_path):
    """An older pvlab wrote a checkpoint's libxl records after libxc's END
    (CHECKPOINT, END, ..., CHECKPOINT_END, END): that END now comes where
    libxl's checkpoint records are read, and is named as such."""
    raw = images["checkpoint"].read_bytes()
    info = scan_image(images["checkpoint"])
    checkpoint = next(r.offset for r in info.records if r.name == "CHECKPOINT")
    end = info.records[-1].offset  # libxc's END, after libxl's CHECKPOINT_END
    old = raw[:checkpoint + 8] + bytes(8) + raw[checkpoint + 8:end] + raw[end + 8:]
    bad = tmp_path / "old-checkpoint.img"
    bad.write_bytes(old)
    with pytest.raises(ImageError, match="inside a checkpoint, before its CHECKPOINT_END"):
        scan_image(bad)
