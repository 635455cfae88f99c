"""Atomic writes: the target is either the old file or the complete new one, and no temp file is left."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdet.io import atomic_path, remove_stale_temps, write_json_atomic, write_parquet_atomic, write_text_atomic


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_path_writes_and_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(".a.txt.") and tmp.suffix == ".txt"
        assert not target.exists()  # nothing visible until the block succeeds
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_path_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_path_failure_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_path_failure_without_old_file_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_body_that_writes_nothing_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="did not write a file"), atomic_path(tmp_path / "a.txt"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_creates_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "run" / "fold0" / "a.txt"
    with atomic_path(target, fsync=False) as tmp:
        tmp.write_text("x")
    assert target.read_text() == "x"


def test_temp_names_are_unique(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "a.txt") as first, atomic_path(tmp_path / "a.txt") as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert (tmp_path / "a.txt").read_text() == "1"  # the outer block finishes last and wins


def test_final_file_permissions_follow_umask(tmp_path: Path, umask_022: None) -> None:
    path = write_text_atomic(tmp_path / "a.txt", "x")
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("text", ["", "plain\n", "ünïcödé ✓\nline 2"])
def test_write_text_atomic_round_trip(tmp_path: Path, text: str) -> None:
    path = write_text_atomic(tmp_path / "t.txt", text)
    assert path == tmp_path / "t.txt"
    assert path.read_bytes() == text.encode("utf-8")


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"a": 1, "b": [1.5, "x"]}, {"a": 1, "b": [1.5, "x"]}),
        ({"n": np.int64(3), "f": np.float32(0.5), "arr": np.arange(3)}, {"n": 3, "f": 0.5, "arr": [0, 1, 2]}),
        ({"path": Path("runs/x")}, {"path": "runs/x"}),
    ],
)
def test_write_json_atomic_converts_numpy_and_paths(tmp_path: Path, obj: object, expected: object) -> None:
    path = write_json_atomic(tmp_path / "m.json", obj)
    text = path.read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == expected


def test_write_json_atomic_nan_is_readable(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "m.json", {"auc": float("nan")}, indent=None)
    assert path.read_text() == '{"auc": NaN}\n'
    assert math.isnan(json.loads(path.read_text())["auc"])


def test_write_json_atomic_unserialisable_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="object of type set is not JSON serialisable"):
        write_json_atomic(tmp_path / "m.json", {"s": {1, 2}})
    assert list(tmp_path.iterdir()) == []


def test_write_parquet_atomic_round_trip(tmp_path: Path) -> None:
    df = pd.DataFrame({"x": [1, 2], "y": [0.5, 0.25]}, index=pd.Index(["ID_a", "ID_b"], name="image_id"))
    path = write_parquet_atomic(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), df)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_remove_stale_temps_removes_only_atomic_path_leftovers(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "shard.npy") as tmp:
        tmp.write_bytes(b"done")
    tmp.write_bytes(b"half")  # the temporary name a SIGKILL-ed writer would have left behind
    keep = ["shard.npy", ".hidden", "shard.npy.tmp", ".x.tmp.npy", ".shard.npy.0123456789ab.npy", "ID_1.dcm"]
    for name in keep[1:]:
        (tmp_path / name).write_bytes(b"keep")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
