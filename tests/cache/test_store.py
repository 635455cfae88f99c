"""The cache reader: a cache whose parts disagree, or whose manifest is not one, is refused, never read."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synth_support import synth_cache

from ichdet.cache.store import CACHE_VERSION, PixelCache, generation_dir, read_manifest, shard_count
from ichdet.errors import IchdetError


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    return synth_cache(root, studies=2, size=32, slices=(8, 8), seed=1, labelled=False, data="synth", chunk_size=4)


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "cache"))


def _edit_json(path: Path, change: Callable[[dict[str, object]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_index(path: Path, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    index = pd.read_parquet(path)
    attrs = dict(index.attrs)
    index = change(index)
    index.attrs = {**attrs, **index.attrs}
    index.to_parquet(path, index=False)


def test_a_complete_cache_opens(cache: Path) -> None:
    store = PixelCache(cache)
    manifest = read_manifest(cache)
    assert manifest is not None and manifest.version == CACHE_VERSION and manifest.generation == 1
    assert len(store) == manifest.summary.n_images == sum(manifest.shards) == 16
    assert manifest.shards == [4, 4, 4, 4]
    assert store.size == 32 and store.read_row(0).shape == (32, 32)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "not JSON": (lambda c: (c / "cache.json").write_text("{not json"), r"not a cache manifest.*not JSON"),
    "old version": (lambda c: _edit_json(c / "cache.json", lambda d: d.update(version=1)),
                    r"not a cache manifest of this ichdet version \(cache format 2\): version"),
    "unknown key": (lambda c: _edit_json(c / "cache.json", lambda d: d.update(extra=1)), r"extra: Extra inputs"),
    "size out of range": (lambda c: _edit_json(c / "cache.json", lambda d: d.update(size=0)), r"size: Input should"),
    "no cache.json": (lambda c: (c / "cache.json").unlink(), r"no cache.json; build the cache"),
    "no index": (lambda c: (c / "index.parquet").unlink(), r"no index.parquet; build the cache"),
    "newer index": (lambda c: _edit_index(c / "index.parquet", lambda i: i.assign(path=i["path"]).pipe(
        lambda i: (i.attrs.update(generation=2), i)[1])), r"index.parquet is of generation 2, cache.json names 1"),
    "index without a generation": (lambda c: pd.read_parquet(c / "index.parquet").pipe(
        lambda i: (i.attrs.clear(), i.to_parquet(c / "index.parquet", index=False))),
        r"index.parquet is of generation None"),
    "index rows dropped": (lambda c: _edit_index(c / "index.parquet", lambda i: i.iloc[:-1]),
                           r"index.parquet has 15 rows, cache.json says 16"),
    "shard count": (lambda c: _edit_json(c / "cache.json", lambda d: d.update(shards=[4, 4, 4, 3])),
                    r"shard_00003.npy holds 4 images, cache.json says 3"),
    "shard missing": (lambda c: (generation_dir(c, 1) / "shard_00001.npy").unlink(),
                      r"shard shard_00001.npy: .*No such file"),
    "offset outside": (lambda c: _edit_index(c / "index.parquet", lambda i: i.assign(offset=i["offset"] + 1)),
                       r"index rows point outside the shards"),
    "generation folder gone": (lambda c: _edit_json(c / "cache.json", lambda d: d.update(generation=5)),
                               r"index.parquet is of generation 1, cache.json names 5"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_cache_whose_parts_disagree_is_refused(cache: Path, damage: str) -> None:
    change, match = DAMAGE[damage]
    change(cache)
    with pytest.raises(IchdetError, match=match):
        PixelCache(cache)


@pytest.mark.parametrize(("tail", "match"), [(b"", None), (b"\0" * 2, "bytes, its header says"),
                                             (None, "bytes, its header says")])
def test_shard_count_checks_the_length(cache: Path, tail: bytes | None, match: str | None) -> None:
    path = generation_dir(cache, 1) / "shard_00000.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-1] if tail is None else data + tail)
    if match is None:
        assert shard_count(path, 32) == 4 == len(np.load(path))
    else:
        with pytest.raises(ValueError, match=match):
            shard_count(path, 32)



@pytest.mark.parametrize(("change", "match"), [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), r"mmap length is greater than file size"),  # cut short
    (lambda p: p.unlink(), r"No such file or directory"),  # removed
])
def test_a_shard_that_changes_after_opening_is_an_error_naming_it(cache: Path, change: Callable[[Path], None],
                                                                  match: str) -> None:
    store = PixelCache(cache)  # checked and opened; the shards are mapped on first read (in each worker)
    change(generation_dir(cache, 1) / "shard_00001.npy")
    row, other = (int(np.flatnonzero(store.index["shard"].to_numpy() == k)[0]) for k in (1, 0))
    with pytest.raises(IchdetError, match=rf"{cache}: the cache's parts disagree \(shard shard_00001.npy changed "
                                          rf"since the cache was opened: .*{match}.*\): an interrupted or mixed"):
        store.read_row(row)
    assert store.read_row(other).shape == (32, 32)  # the other shards still read
