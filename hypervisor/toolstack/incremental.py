"""Incremental checkpoints: a first image whole, then images holding only the
pages the guest dirtied since the one before (log-dirty, as Remus's epochs
are found), each restorable through its chain.

An increment is an xl save file like any other (xl header and config,
libxl's stream, the libxc stream inside it) whose PAGE_DATA records carry
only the dirtied pfns; its static records, TSC, shared info, VCPUs and
libxl's records are whole, as every checkpoint's are. Its config names its
parent under "pvlab": ``"parent": {"file": NAME, "digest": HEX}``: the
parent's file name in the same directory and the integrity digest of its
xl header. A restore reads the chain back to the whole image, checks every
file's own digest and that each parent still has the digest its child
recorded (a chain whose parent changed is refused, one line), and reads
the chain as one stream: the whole image's pages, then each increment's in
order (the last copy of a pfn wins, as in a live save's stream), then the
newest image's state. Log-dirty stays on between checkpoints: the
hypervisor marks every write, the guest's and its own (migration.md 1.8).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.domctl import (
    XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL,
    XEN_DOMCTL_SHADOW_OP_CLEAN,
    XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
    XEN_DOMCTL_SHADOW_OP_OFF,
    xen_domctl_shadow_op,
)
from hypervisor.toolstack import savefile, stream
from hypervisor.toolstack.image import ImageError
from hypervisor.toolstack.save import (
    SaveError,
    SaveStats,
    domain_config,
    write_batch,
    write_end_of_checkpoint,
    write_in_place,
    write_libxl_tail,
    write_static_data,
    x86_pv_setup,
)
from hypervisor.toolstack.savefile import LibxlRecType
from hypervisor.toolstack.stream import RecType

KIND = "incremental checkpoint"
MAX_CHAIN = 10_000  # parents followed before a chain is called a loop


# --- the primary's side: log-dirty between checkpoints -------------------------------

def start_dirty_log(hv: Hypervisor, dom: Domain) -> None:
    """ENABLE_LOGDIRTY after the whole image (OFF first if it is on)."""
    domctl.shadow_op(hv, dom, xen_domctl_shadow_op(op=XEN_DOMCTL_SHADOW_OP_OFF))
    rc = domctl.shadow_op(hv, dom, xen_domctl_shadow_op(op=XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY))
    if rc:
        raise SaveError(f"failed to enable log-dirty mode ({rc})")


def stop_dirty_log(hv: Hypervisor, dom: Domain) -> None:
    if dom.domid in hv.domains:
        domctl.shadow_op(hv, dom, xen_domctl_shadow_op(op=XEN_DOMCTL_SHADOW_OP_OFF))


def dirty_since(hv: Hypervisor, dom: Domain, pages: int) -> np.ndarray:
    """CLEAN(FINAL) with the guest suspended: the pfns written since the last."""
    bitmap = np.zeros(-(-pages // 8), dtype=np.uint8)
    arg = xen_domctl_shadow_op(op=XEN_DOMCTL_SHADOW_OP_CLEAN, pages=pages,
                               mode=XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL)
    rc = domctl.shadow_op(hv, dom, arg, bitmap)
    if rc or arg.pages != pages:
        raise SaveError(f"failed to retrieve the log-dirty bitmap ({rc}, {arg.pages} bits "
                        f"for {pages} pfns)")
    return np.unpackbits(bitmap, bitorder="little")[:pages].astype(bool)


def write_increment(hv: Hypervisor, dom: Domain, out: BinaryIO, parent: Path,
                    parent_digest: bytes, seed: int | None = None) -> SaveStats:
    """An increment of a suspended domain whose log-dirty is on: write_image's
    layers, PAGE_DATA only for the pfns dirtied since the parent (and every
    pfn with no frame now, as XTAB), the parent named in the config."""
    stats = SaveStats()
    sc = x86_pv_setup(hv, dom, stats)
    dirty = dirty_since(hv, dom, int(sc.p2m.size))
    dirty |= sc.p2m == np.uint64(0xFFFFFFFFFFFFFFFF)
    config = json.loads(domain_config(dom, KIND, hv.seed if seed is None else seed,
                                      sc.devices))
    config["pvlab"]["parent"] = {"file": parent.name, "digest": parent_digest.hex()}
    hashed = savefile.DigestWriter(out)
    digest_offset = savefile.write_xl_header(hashed, json.dumps(config, sort_keys=True)
                                             .encode())
    savefile.write_libxl_header(hashed)
    savefile.write_libxl_record(hashed, LibxlRecType.LIBXC_CONTEXT)
    write_static_data(hv, dom, hashed, sc)
    todo = np.flatnonzero(dirty)
    for first in range(0, todo.size, stream.MAX_BATCH_SIZE):
        stats.pages += write_batch(hv, dom, hashed, sc, todo[first:first +
                                                             stream.MAX_BATCH_SIZE])
    write_end_of_checkpoint(hv, dom, hashed, sc, checkpoint=True)
    write_libxl_tail(hv, dom, hashed, sc, checkpoint=True)
    hashed.finish(digest_offset)
    return stats


def save_increment_to_file(hv: Hypervisor, dom: Domain, path: Path, parent: Path,
                           parent_digest: bytes, seed: int | None = None) -> SaveStats:
    """write_increment into a temporary file renamed into place."""
    def write(f: BinaryIO) -> SaveStats:
        stats = write_increment(hv, dom, f, parent, parent_digest, seed)
        stats.bytes = f.tell()
        return stats

    stats, stats.total_s = write_in_place(path, write)
    return stats


def image_digest(path: Path) -> bytes:
    """The integrity digest in an image's xl header (checked against its
    octets): what a child records of its parent."""
    with open(path, "rb") as f:
        xl = savefile.read_xl_header(f)
        savefile.check_digest(f, xl, required=True)
    assert xl.digest is not None
    return xl.digest


# --- the restore's side: reading a chain ----------------------------------------------

def parent_of(path: Path) -> dict | None:
    """The parent an image's config names, or None for a whole image (or for
    what is no regular file: a FIFO would block the open; the check refuses
    it)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return None
    with open(path, "rb") as f:
        xl = savefile.read_xl_header(f)
    try:
        config = json.loads(xl.config) if xl.config else {}
    except ValueError:
        return None
    parent = config.get("pvlab", {}).get("parent") if isinstance(config, dict) else None
    if parent is None:
        return None
    if not isinstance(parent, dict) or not isinstance(parent.get("file"), str) \
            or not isinstance(parent.get("digest"), str) or "/" in parent["file"]:
        raise ImageError(f"{path}: the config's pvlab.parent is not a file name and a digest")
    return parent


def chain_of(path: Path) -> list[Path]:
    """The images from the whole one to ``path``, each parent checked: it
    exists beside its child, its own digest holds, and it is the digest the
    child recorded. ImageError, one line, if not."""
    chain = [Path(path)]
    for _ in range(MAX_CHAIN):
        child = chain[0]
        parent = parent_of(child)
        if parent is None:
            return chain
        where = child.parent / parent["file"]
        if not where.is_file():
            raise ImageError(f"{child}: its parent {where} is missing: the chain is broken")
        try:
            digest = image_digest(where)
        except stream.StreamError as e:
            raise ImageError(f"{child}: its parent {where}: {e}") from None
        if digest.hex() != parent["digest"]:
            raise ImageError(f"{child}: its parent {where} has changed since the increment "
                             "was written (its digest differs): refusing the chain")
        chain.insert(0, where)
    raise ImageError(f"{path}: more than {MAX_CHAIN} parents: a loop in the chain")


Item = tuple[bool, int, bytes]  # (a libxc record?, its type, its body)


def _records(path: Path) -> tuple[stream.DomainHeader, list[Item], bytes]:
    """An image's records in stream order, from the libxc stream's first to
    libxl's END (libxl's checkpoint records inline after CHECKPOINT), and
    its config; every file's digest checked."""
    with open(path, "rb") as f:
        xl = savefile.read_xl_header(f)
        savefile.check_digest(f, xl, required=True)
        f.seek(xl.end)
        savefile.read_libxl_header(f, xl.end)
        if savefile.read_libxl_record(f).type != LibxlRecType.LIBXC_CONTEXT:
            raise ImageError(f"{path}: no libxc stream first in libxl's")
        _, header = stream.read_headers(f, f.tell())
        items: list[Item] = []
        libxc = True
        while True:
            if libxc:
                rec = stream.read_record(f, f.tell())
                libxc = rec.type not in (RecType.CHECKPOINT, RecType.END)
                items.append((True, rec.type, rec.body))
                continue
            lrec = savefile.read_libxl_record(f)
            items.append((False, lrec.type, lrec.body))
            if lrec.type == LibxlRecType.END:
                return header, items, xl.config
            libxc = lrec.type == LibxlRecType.CHECKPOINT_END


def write_chain(chain: list[Path], out: BinaryIO) -> None:
    """The chain as one stream (no digest: every file's was checked): the
    newest config without its parent, the newest image's static records,
    every image's pages in order, the newest image's other records."""
    files = [_records(p) for p in chain]
    header, newest, raw = files[-1]
    config = json.loads(raw)
    config["pvlab"].pop("parent", None)
    config["pvlab"]["kind"] = "checkpoint"
    savefile.write_xl_header(out, json.dumps(config, sort_keys=True).encode(), digest=False)
    savefile.write_libxl_header(out)
    savefile.write_libxl_record(out, LibxlRecType.LIBXC_CONTEXT)
    stream.write_headers(out, header.xen_major, header.xen_minor)
    static = (RecType.X86_PV_INFO, RecType.STATIC_DATA_END, RecType.X86_PV_P2M_FRAMES)
    pages = [i for _, items, _ in files for i in items if i[0] and i[1] == RecType.PAGE_DATA]
    head = [i for i in newest if i[0] and i[1] in static]
    rest = [i for i in newest if not (i[0] and (i[1] in static or i[1] == RecType.PAGE_DATA))]
    for _, rtype, body in [*head, *pages, *rest]:
        stream.write_record(out, rtype, body)


@contextmanager
def materialised(path: Path) -> Iterator[Path]:
    """A whole image of an increment's chain, in a temporary file while the
    caller reads it."""
    chain = chain_of(Path(path))
    with tempfile.TemporaryDirectory(prefix="pvlab-chain-") as tmp:
        whole = Path(tmp) / "chain.img"
        with open(whole, "wb") as f:
            write_chain(chain, f)
        yield whole


__all__ = ["chain_of", "materialised", "parent_of", "save_increment_to_file",
           "start_dirty_log", "stop_dirty_log", "write_increment"]
