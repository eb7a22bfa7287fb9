"""Incremental checkpoints (incremental.py): `pvlab checkpoint` writes a
whole image, then increments holding only the pages dirtied since the one
before (log-dirty), each naming its parent and the parent's digest. A
restore of any of them gives what a restore of a whole checkpoint taken at
the same time gives; the increments are smaller; a chain whose parent was
changed or is missing is refused in one line."""

from __future__ import annotations

import shutil

import pytest

from hypervisor.toolstack.cli import main
from hypervisor.toolstack.image import ImageError
from hypervisor.toolstack.incremental import chain_of, parent_of
from hypervisor.toolstack.restore import restore_image
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, booting

EXAMPLE = ROOT / "examples" / "live-save.toml"
EVERY = ["--every", "2ms", "--max", "4"]
NAMES = [f"live-save-checkpoint-00{n}.img" for n in range(1, 5)]


@pytest.fixture(scope="module")
def taken(tmp_path_factory):
    """The same run checkpointed twice: increments, and whole images."""
    top = tmp_path_factory.mktemp("ck")
    for kind, extra in (("inc", []), ("full", ["--full"])):
        assert main(["checkpoint", str(EXAMPLE), str(top / kind), *EVERY, *extra]) == 0
    return top


def run_restored(path):
    with booting() as boot:
        hv, dom, _ = restore_image(path, hv=boot.bare(64))
        r = run_domain(hv, dom)
    assert r.reason == "poweroff"
    return r.console


def test_each_increment_names_its_parent_and_only_the_first_is_whole(taken):
    inc = taken / "inc"
    assert parent_of(inc / NAMES[0]) is None
    for parent, child in zip(NAMES[:-1], NAMES[1:], strict=True):
        assert parent_of(inc / child)["file"] == parent
    assert chain_of(inc / NAMES[3]) == [inc / n for n in NAMES]


def test_increments_are_smaller_than_whole_images(taken):
    whole = (taken / "full" / NAMES[1]).stat().st_size
    for name in NAMES[1:]:
        assert (taken / "inc" / name).stat().st_size < whole / 4
    assert (taken / "inc" / NAMES[0]).stat().st_size == whole


@pytest.mark.parametrize("name", [pytest.param(NAMES[1], marks=pytest.mark.slow), NAMES[3]])
def test_a_restore_of_an_increment_is_the_restore_of_a_whole_checkpoint(taken, name):
    assert run_restored(taken / "inc" / name) == run_restored(taken / "full" / name)


def test_a_chain_whose_parent_changed_is_refused_in_one_line(taken, tmp_path, capsys):
    chain = tmp_path / "chain"
    shutil.copytree(taken / "inc", chain)
    shutil.copy(taken / "full" / NAMES[1], chain / NAMES[1])  # another image, same name
    assert main(["restore", str(chain / NAMES[3])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has changed since the increment was written" in err[0], err
    shutil.copy(taken / "inc" / NAMES[1], chain / NAMES[1])
    (chain / NAMES[0]).unlink()
    with pytest.raises(ImageError, match="is missing"):
        chain_of(chain / NAMES[3])


def test_image_check_and_diff_read_an_increment_through_its_chain(taken, capsys):
    inc = str(taken / "inc" / NAMES[2])
    assert main(["image", "check", inc]) == 0
    assert "(incremental checkpoint)" in capsys.readouterr().out
    assert main(["image", "diff", inc, str(taken / "full" / NAMES[2])]) == 0
    assert "the images hold the same guest state" in capsys.readouterr().out
