"""The one checkpoint writer: what ``pvlab checkpoint``, a ``checkpoint``
request of ``pvlab run`` and the save/restore demo all use. A checkpoint is a
save of a suspended domain that then runs on (its suspend hypercall returns
1: THAW), as ``xl save -c`` and Remus take them.

Images are named ``<domain>-checkpoint-<n>.img`` (n from 001), n one more
than the highest already in the directory, so checkpoints of several runs
into one directory never overwrite each other.

A save's outcome is a value (SaveOutcome): the image's statistics, or why it
failed, which the caller reports as it likes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.domctl import Domain, Hypervisor
from hypervisor.toolstack.incremental import (
    image_digest,
    save_increment_to_file,
    start_dirty_log,
)
from hypervisor.toolstack.save import Progress, SaveError, SaveStats, save_to_file
from hypervisor.toolstack.stream import StreamError

NAME_FORMAT = "{name}-checkpoint-{n:03d}.img"


@dataclass
class SaveOutcome:
    """What came of one save: the image and its statistics, or why not."""

    path: Path
    stats: SaveStats | None = None
    error: str = ""           # why the save failed; "" if it did not
    console_bytes: int = 0    # the guest's console output up to the save
    parent: str = ""          # an increment's parent image ("" for a whole image)

    @property
    def ok(self) -> bool:
        return self.stats is not None


def try_save(hv: Hypervisor, dom: Domain, path: Path, checkpoint: bool = False,
             seed: int | None = None, progress: Progress | None = None) -> SaveOutcome:
    """save_to_file, with its failure as a value (nothing is left at ``path``)."""
    out = SaveOutcome(Path(path), console_bytes=len(dom.console_out))
    try:
        out.stats = save_to_file(hv, dom, path, checkpoint=checkpoint, seed=seed,
                                 progress=progress)
    except (SaveError, OSError) as e:  # OSError: the temporary file could not be removed
        out.error = str(e)
    return out


def checkpoint_path(directory: Path, name: str) -> tuple[int, Path]:
    """The next checkpoint's number and file in ``directory``."""
    pattern = re.compile(re.escape(name) + r"-checkpoint-(\d+)\.img$")
    names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    taken = [int(m.group(1)) for name in names if (m := pattern.match(name))]
    n = max(taken, default=0) + 1
    return n, directory / NAME_FORMAT.format(name=name, n=n)


@dataclass
class CheckpointWriter:
    """Writes a domain's checkpoints into one directory and keeps their outcomes."""

    directory: Path
    progress: Progress | None = None
    # name the images by their path in what the toolstack says; a scratch
    # directory's path means nothing to the user (and differs every run)
    show_directory: bool = True
    # a whole image first, then only the pages dirtied since the last image
    incremental: bool = False
    outcomes: list[SaveOutcome] = field(default_factory=list)
    parent: Path | None = None  # the last image, an increment's parent

    @property
    def taken(self) -> list[Path]:
        return [o.path for o in self.outcomes if o.ok]

    def take(self, hv: Hypervisor, dom: Domain) -> tuple[SaveOutcome, str]:
        """Checkpoint a suspended domain (the caller resumes it cancelled).
        Returns the outcome and the line the toolstack says of it."""
        n, path = checkpoint_path(Path(self.directory), dom.name)
        if self.incremental and self.parent is not None:
            out = try_increment(hv, dom, path, self.parent)
        else:
            out = try_save(hv, dom, path, checkpoint=True, progress=self.progress)
            if out.ok and self.incremental:
                start_dirty_log(hv, dom)  # suspended: nothing is written before it
        self.outcomes.append(out)
        # a failed increment has cleaned the log: the next image is whole again
        self.parent = path if out.ok else None
        if not out.ok:
            return out, f"checkpoint {n} failed: {out.error}; the guest runs on"
        assert out.stats is not None
        where = path if self.show_directory else path.name
        what = "increment" if out.parent else "image"
        return out, (f"checkpoint {n}: {where}: {out.stats.bytes / (1 << 20):.1f} MiB {what} "
                     "written" + (f" ({out.stats.pages} pages dirtied since {out.parent})"
                                  if out.parent else ""))


def try_increment(hv: Hypervisor, dom: Domain, path: Path, parent: Path) -> SaveOutcome:
    """An increment over ``parent`` (incremental.save_increment_to_file), its
    failure as a value."""
    out = SaveOutcome(Path(path), console_bytes=len(dom.console_out), parent=parent.name)
    try:
        out.stats = save_increment_to_file(hv, dom, path, parent, image_digest(parent))
    except (SaveError, OSError, StreamError) as e:
        out.error = str(e)
    return out
