from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nobody_support import as_nobody

from ichdet.cache.index import build_index, list_dicom_files, order_slices, relative_dicom_files, scan_dicom_files
from ichdet.cache.labels import LABELS, read_labels
from ichdet.dicom.read import read_meta
from ichdet.errors import IchdetError, LabelError


def _meta(rows: list[tuple[str, str, float, int]]) -> pd.DataFrame:
    """(image_id, series_uid, z, instance_number) -> a minimal header table."""
    df = pd.DataFrame(rows, columns=["image_id", "series_uid", "z", "instance_number"])
    df["patient_id"] = "P_" + df["series_uid"]
    df["study_uid"] = df["series_uid"]
    return df


# Each case: header rows, then the expected (image_id, slice_index, prev_id, next_id) in output order.
CASES = {
    "by z, not by instance number": (
        [("c", "s", 10.0, 1), ("a", "s", -5.0, 3), ("b", "s", 0.0, 2)],
        [("a", 0, None, "b"), ("b", 1, "a", "c"), ("c", 2, "b", None)]),
    "same z: instance number breaks the tie": (
        [("x", "s", 5.0, 9), ("y", "s", 5.0, 2), ("z", "s", 0.0, 1)],
        [("z", 0, None, "y"), ("y", 1, "z", "x"), ("x", 2, "y", None)]),
    "same z and instance number: id breaks the tie": (
        [("q", "s", 5.0, 1), ("p", "s", 5.0, 1)],
        [("p", 0, None, "q"), ("q", 1, "p", None)]),
    "missing z sorts last": (
        [("m", "s", np.nan, 1), ("n", "s", 3.0, 2)],
        [("n", 0, None, "m"), ("m", 1, "n", None)]),
    "two series never neighbour": (
        [("a1", "A", 1.0, 1), ("b1", "B", 0.0, 1), ("a0", "A", 0.0, 2)],
        [("a0", 0, None, "a1"), ("a1", 1, "a0", None), ("b1", 0, None, None)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_order_slices(case: str) -> None:
    rows, expected = CASES[case]
    out = order_slices(_meta(rows))
    got = list(out[["image_id", "slice_index", "prev_id", "next_id"]].itertuples(index=False, name=None))
    assert got == expected
    assert (out.groupby("series_uid")["n_slices"].first() == out.groupby("series_uid").size()).all()


def test_build_index_labels_and_folds() -> None:
    rows = [(f"ID_{p}{i}", f"S{p}", float(i), i) for p in "abcdef" for i in range(4)]
    meta = _meta(rows)
    labels = pd.DataFrame(0, index=pd.Index([r[0] for r in rows[:-4]], name="image_id"), columns=list(LABELS),
                          dtype="uint8")
    labels.loc["ID_a1", ["subdural", "any"]] = 1
    index, missing = build_index(meta, labels, n_folds=2, seed=0)
    assert missing == []
    unlabelled = index["series_uid"] == "Sf"
    assert (index.loc[unlabelled, "fold"] == -1).all()
    assert index.loc[unlabelled, list(LABELS)].isna().all().all()
    assert set(index.loc[~unlabelled, "fold"]) == {0, 1}
    assert index.loc[~unlabelled].groupby("patient_id")["fold"].nunique().max() == 1
    assert index.set_index("image_id").loc["ID_a1", "subdural"] == 1.0


def test_build_index_reports_labels_without_images() -> None:
    meta = _meta([("ID_a", "s", 0.0, 1), ("ID_b", "t", 0.0, 1)])
    labels = pd.DataFrame(0, index=pd.Index(["ID_a", "ID_b", "ID_gone"], name="image_id"), columns=list(LABELS))
    _, missing = build_index(meta, labels, n_folds=2)
    assert missing == ["ID_gone"]


def test_duplicate_ids_are_an_error() -> None:
    with pytest.raises(LabelError, match=r"more than one file: \['ID_a'\]"):
        build_index(_meta([("ID_a", "s", 0.0, 1), ("ID_a", "t", 0.0, 1)]))


def test_list_dicom_files_skips_non_images(tmp_path: Path) -> None:
    for name in ["b/IM0001", "a/x.dcm", "DICOMDIR", ".hidden", "notes.txt", "labels.csv", ".git/obj"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_dicom_files(tmp_path)] == ["a/x.dcm", "b/IM0001"]
    assert relative_dicom_files(tmp_path) == ["a/x.dcm", "b/IM0001"]


def test_relative_dicom_files_sorts_by_relative_path_at_every_depth(tmp_path: Path) -> None:
    names = ["s2/b/IM2", "s10/IM1", "s2/IM3", "s2/a/IM1", "IM9", "s2/a.b/IM0", "s2/.cache/IM5"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = ["IM9", "s10/IM1", "s2/IM3", "s2/a.b/IM0", "s2/a/IM1", "s2/b/IM2"]  # plain string order
    assert relative_dicom_files(tmp_path) == expected
    assert list_dicom_files(tmp_path) == [tmp_path / rel for rel in expected]
    with pytest.raises(IchdetError, match="not a folder"):
        relative_dicom_files(tmp_path / "IM9")


def test_real_studies_slice_order(rsna_sample: Path) -> None:
    meta = pd.DataFrame([read_meta(p).as_row() for p in list_dicom_files(rsna_sample / "stage_2_train_images")])
    index, missing = build_index(meta, read_labels(rsna_sample / "stage_2_train.csv"), n_folds=5)
    assert missing == []
    assert len(index) == 232
    assert index["series_uid"].nunique() == 7
    assert index["n_slices"].between(28, 36).all()
    for _, series in index.groupby("series_uid"):
        assert series["slice_index"].tolist() == list(range(len(series)))
        assert series["z"].is_monotonic_increasing
        ids = series["image_id"].tolist()
        assert series["prev_id"].tolist() == [None, *ids[:-1]]
        assert series["next_id"].tolist() == [*ids[1:], None]
        ties = series[series["z"].duplicated(keep=False)]
        assert ties["instance_number"].is_monotonic_increasing
    # the README's tie: two slices of one series share a z position
    assert index.duplicated(["series_uid", "z"]).sum() >= 1


def test_more_folds_than_patients_names_the_option() -> None:
    meta = _meta([("ID_a", "s", 0.0, 1)])
    labels = pd.DataFrame(0, index=pd.Index(["ID_a"], name="image_id"), columns=list(LABELS))
    with pytest.raises(IchdetError, match=r"--folds"):
        build_index(meta, labels, n_folds=5)


def _scan_as_nobody(folder: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]]]:
    """:func:`scan_dicom_files` as nobody (root reads every folder)."""
    found, problems = as_nobody(lambda: scan_dicom_files(folder))
    return [tuple(f) for f in found], [tuple(p) for p in problems]


def test_scan_reports_fifos_and_unreadable_folders() -> None:
    folder = Path(tempfile.mkdtemp())  # not under pytest's tmp folder, which only root can enter
    try:
        folder.chmod(0o755)
        (folder / "a.dcm").write_bytes(b"x" * 5)
        os.mkfifo(folder / "pipe.dcm")
        (folder / "locked").mkdir()
        (folder / "locked" / "b.dcm").write_bytes(b"y")
        (folder / "locked").chmod(0o000)
        mtime = (folder / "a.dcm").stat().st_mtime_ns
        scan = _scan_as_nobody(folder) if os.geteuid() == 0 else scan_dicom_files(folder)
        found, problems = scan
        assert found == [("a.dcm", 5, mtime)]
        assert [p for p, _ in problems] == ["locked", "pipe.dcm"]
        assert "cannot list this folder (Permission denied)" in problems[0][1]
        assert problems[1][1].startswith("not a regular file (a FIFO")
    finally:
        (folder / "locked").chmod(0o755)
        shutil.rmtree(folder)


def test_scan_keys_change_when_a_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x" * 5)
    before = scan_dicom_files(tmp_path)[0]
    (tmp_path / "new.tmp").write_bytes(b"y" * 7)
    os.replace(tmp_path / "new.tmp", tmp_path / "a.dcm")
    os.utime(tmp_path / "a.dcm", ns=(before[0][2] + 1, before[0][2] + 1))
    assert scan_dicom_files(tmp_path)[0] == [("a.dcm", 7, before[0][2] + 1)]


_AGAIN = "a link to a folder already scanned (a loop or a second link); not entered again, its files are listed once"


@pytest.mark.parametrize(("links", "files", "problems"), [
    # two self-links in a study folder (the scan hung with memory growing)
    ({"s/x": ".", "s/y": "."}, ["s/a.dcm", "s/b.dcm"], [("s/x", _AGAIN), ("s/y", _AGAIN)]),
    ({"s/up": ".."}, ["s/a.dcm", "s/b.dcm"], [("s/up", _AGAIN)]),  # a link to the parent (it hung)
    ({"s/top": "{root}"}, ["s/a.dcm", "s/b.dcm"], [("s/top", _AGAIN)]),  # an absolute link to the root
    ({"t": "s"}, ["s/a.dcm", "s/b.dcm"], [("t", _AGAIN)]),  # a second link to a folder: entered once
    ({"s/c.dcm": "missing.dcm"}, ["s/a.dcm", "s/b.dcm"],
     [("s/c.dcm", "a link that cannot be followed: its target does not exist")]),
    ({"s/d": "d"}, ["s/a.dcm", "s/b.dcm"],
     [("s/d", "a link that cannot be followed: it points to itself (a link loop)")]),
])
def test_scan_walks_each_folder_once(tmp_path: Path, links: dict[str, str], files: list[str],
                                     problems: list[tuple[str, str]]) -> None:
    root = tmp_path / "root"
    (root / "s").mkdir(parents=True)
    for name in ("a.dcm", "b.dcm"):
        (root / "s" / name).write_bytes(b"x")
    for name, target in links.items():
        (root / name).symlink_to(target.format(root=root))
    found, reported = scan_dicom_files(root)
    assert [rel for rel, _, _ in found] == files
    assert reported == problems
