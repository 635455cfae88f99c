"""predict-study's folder scan lists what it cannot read (FIFOs, dangling links, unreadable folders, links
back to a folder already scanned) in ``skipped_files`` with the reason, and ends on link loops."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from nobody_support import as_nobody

from ichdet.study.scan import scan_folder

_AGAIN = "a link to a folder already scanned (a loop or a second link); not entered again, its files are listed once"


def _scan_as_nobody(folder: Path) -> tuple[list[tuple[str, str]], int, int]:
    """(skipped files, n_files, slices selected) of :func:`scan_folder` as nobody (root reads every folder)."""
    def scan() -> tuple[list[tuple[str, str]], int, int]:
        found = scan_folder(folder, min_slices=1)
        return ([(f.path, f.reason) for f in found.skipped_files], found.n_files,
                sum(len(s.slices) for study in found.studies for s in study.selected))

    skipped, n_files, slices = as_nobody(scan)
    return [tuple(s) for s in skipped], n_files, slices


@pytest.fixture
def folder(rsna_sample: Path) -> Iterator[Path]:
    """A study folder (two real slices) readable by nobody, outside pytest's root-only tmp folder."""
    root = Path(tempfile.mkdtemp())
    root.chmod(0o755)
    (root / "study").mkdir(mode=0o755)
    for src in sorted((rsna_sample / "stage_2_train_images").glob("*.dcm"))[:2]:
        shutil.copyfile(src, root / "study" / src.name)
        (root / "study" / src.name).chmod(0o644)
    yield root
    for path in root.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(root)


def _fifo(root: Path) -> None:
    os.mkfifo(root / "study" / "pipe.dcm")


def _dangling(root: Path) -> None:
    (root / "study" / "gone.dcm").symlink_to(root / "nowhere.dcm")


def _locked(root: Path) -> None:
    (root / "study" / "locked").mkdir()
    (root / "study" / "locked").chmod(0o000)


def _loops(root: Path) -> None:
    (root / "study" / "x").symlink_to(".")
    (root / "study" / "y").symlink_to(".")
    (root / "study" / "up").symlink_to("..")


@pytest.mark.parametrize(("make", "skipped"), [
    (_fifo, [("study/pipe.dcm", "not a regular file (a FIFO, socket or device); skipped without opening it: "
              "copy the image into a regular file")]),
    (_dangling, [("study/gone.dcm", "a link that cannot be followed: its target does not exist")]),
    (_locked, [("study/locked", "cannot list this folder (Permission denied); its files were not read: "
                "fix its permissions and rerun")]),
    (_loops, [("study/up", _AGAIN), ("study/x", _AGAIN), ("study/y", _AGAIN)]),
])
def test_unreadable_entries_are_listed_with_the_reason(folder: Path, make, skipped) -> None:  # type: ignore[no-untyped-def]
    make(folder)
    assert _scan_as_nobody(folder) == (skipped, 2, 2)
