"""The pixel store's reader: random access by image id into a preprocessed cache (no pydicom).

:mod:`ichdet.cache.writer` writes a cache folder; this module reads it. The training and inference side
(data, train, engine, predict) imports only this module, so it never pulls in the DICOM readers.
See :mod:`ichdet.cache.writer` for the folder layout.

A cache cannot lie: ``cache.json`` (:class:`CacheManifest`) names the current generation and how many
images each of its shards holds, and is written last; :class:`PixelCache` refuses to open a cache whose
index, shards and manifest disagree instead of serving one file's pixels under another file's id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.lib.format as npy
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ichdet.cache.provenance import DataRecord
from ichdet.errors import IchdetError

#: Integer HU kept in the store: air (-1024) to dense bone (3071), the 12-bit CT range.
STORE_RANGE: tuple[int, int] = (-1024, 3071)
#: 2: generation folders (``pixels/gen_00001/``), files keyed by path, size and mtime, shard counts.
CACHE_VERSION = 2


class CacheSummary(BaseModel):
    """What the preprocessing run that wrote a generation did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache: str
    n_files: int
    n_images: int
    n_errors: int
    n_chunks: int
    n_chunks_resumed: int
    n_unlabelled: int
    labelled_without_image: list[str]
    seconds: float

    def lines(self) -> list[str]:
        """Human-readable summary lines for the command line."""
        out = [f"cache: {self.cache}",
               f"files: {self.n_files}  images: {self.n_images}  skipped (see errors.csv): {self.n_errors}",
               f"chunks: {self.n_chunks} ({self.n_chunks_resumed} reused from an earlier run)",
               f"time: {self.seconds:.1f} s ({self.n_files / max(self.seconds, 1e-9):.0f} files/s)"]
        if self.labelled_without_image:
            out.append(f"labelled images without a usable file: {len(self.labelled_without_image)} "
                       f"(e.g. {', '.join(self.labelled_without_image[:3])})")
        return out


class CacheSettings(BaseModel):
    """How a cache was built: a rerun into the same folder must agree on the first four."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[2]
    size: int = Field(ge=16, le=2048)
    store_range: tuple[int, int]
    images: str
    chunk_size: int = Field(ge=1)
    labels: str | None
    n_folds: int = Field(ge=2)
    seed: int
    max_pixels: int = Field(ge=1)


class CacheManifest(CacheSettings):
    """``cache.json``: the settings, the current generation and its shards, the run's summary."""

    generation: int = Field(ge=1)
    shards: list[int]  # images stored in shard k of the generation, for every k
    summary: CacheSummary
    #: What the cache holds (ichdet.cache.provenance); None in caches written before it was recorded.
    provenance: DataRecord | None = None


def read_manifest(root: str | Path) -> CacheManifest | None:
    """The validated ``cache.json`` of cache folder ``root``; None if it has none; IchdetError if bad."""
    path = Path(root) / "cache.json"
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return CacheManifest.model_validate(json.loads(text))
    except (ValueError, ValidationError) as err:
        detail = ("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:3])
                  if isinstance(err, ValidationError) else f"not JSON ({err})")
        raise IchdetError(f"{path}: not a cache manifest of this ichdet version (cache format "
                          f"{CACHE_VERSION}): {detail}; rebuild the cache with `ichdet preprocess` into "
                          "a new folder") from None


def generation_dir(root: str | Path, generation: int) -> Path:
    """``pixels/gen_00003``: the shard folder of one generation of the cache at ``root``."""
    return Path(root) / "pixels" / f"gen_{generation:05d}"


def shard_file(shard_dir: str | Path, number: int, suffix: str) -> Path:
    """``shard_00012.npy`` (the pixels) or ``.json`` (the manifest) of chunk ``number`` in ``shard_dir``."""
    return Path(shard_dir) / f"shard_{number:05d}{suffix}"


def shard_count(path: Path, size: int) -> int:
    """The image count of an int16 ``(n, size, size)`` NPY shard whose length matches its header.

    Raises ValueError (or OSError) when the file is not such a shard, or is shorter or longer.
    """
    with open(path, "rb") as fh:
        version = npy.read_magic(fh)
        header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = header(fh)
        if fortran or dtype != np.dtype("<i2") or len(shape) != 3 or tuple(shape[1:]) != (size, size):
            raise ValueError(f"{path}: not an int16 (n, {size}, {size}) shard")
        expected = fh.tell() + shape[0] * size * size * 2
        if os.fstat(fh.fileno()).st_size != expected:
            raise ValueError(f"{path}: {os.fstat(fh.fileno()).st_size} bytes, its header says {expected}")
    return int(shape[0])


class PixelCache:
    """Random access to a cache's pixels by image id; cheap to pickle into data-loader workers.

    Opening checks that the parts agree: ``cache.json`` names the generation the index was written for,
    every shard it lists holds the image count it says, and every index row points inside its shard.
    A cache interrupted between them (or edited by hand) raises IchdetError naming the fix.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / "index.parquet"
        manifest = read_manifest(self.root)
        if manifest is None or not index_path.exists():
            missing = "cache.json" if manifest is None else "index.parquet"
            raise IchdetError(f"{self.root}: no {missing}; build the cache with `ichdet preprocess`")
        self.manifest = manifest
        self.index = pd.read_parquet(index_path)
        self._shard_dir = generation_dir(self.root, manifest.generation)
        self._check_parts()
        self._position = pd.Index(self.index["image_id"])
        self._shard = self.index["shard"].to_numpy()
        self._offset = self.index["offset"].to_numpy()
        self._maps: dict[int, np.ndarray] = {}

    def _disagree(self, what: str) -> IchdetError:
        return IchdetError(f"{self.root}: the cache's parts disagree ({what}): an interrupted or mixed "
                           "`ichdet preprocess`; rerun the same preprocess command to repair it")

    def _check_parts(self) -> None:
        """Raise unless index, shards and manifest belong to one complete generation."""
        manifest, index = self.manifest, self.index
        generation = index.attrs.get("generation")
        if generation != manifest.generation:
            raise self._disagree(f"index.parquet is of generation {generation}, cache.json names "
                                 f"{manifest.generation}")
        if len(index) != manifest.summary.n_images:
            raise self._disagree(f"index.parquet has {len(index)} rows, cache.json says {manifest.summary.n_images}")
        counts = np.array(manifest.shards, np.int64)
        for number, count in enumerate(manifest.shards):
            path = shard_file(self._shard_dir, number, ".npy")
            try:
                found = shard_count(path, manifest.size)
            except (OSError, ValueError) as err:
                raise self._disagree(f"shard {path.name}: {err}") from None
            if found != count:
                raise self._disagree(f"{path.name} holds {found} images, cache.json says {count}")
        shard, offset = index["shard"].to_numpy(), index["offset"].to_numpy()
        if len(index) and (shard.min() < 0 or shard.max() >= len(counts) or offset.min() < 0
                           or (offset >= counts[np.clip(shard, 0, max(len(counts) - 1, 0))]).any()):
            raise self._disagree("index rows point outside the shards")

    @property
    def size(self) -> int:
        """Side length in pixels of every stored image."""
        return self.manifest.size

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are reopened in each worker process
        return state

    def row_of(self, image_id: str) -> int:
        """Row number of an image id in :attr:`index`; KeyError naming the id if absent."""
        try:
            return int(self._position.get_loc(image_id))
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in the cache at {self.root}") from None

    def rows_of(self, image_ids: pd.Series | Sequence[str | None]) -> np.ndarray:
        """Row numbers of many image ids at once, -1 where an id (or None) is not in the cache."""
        return self._position.get_indexer(pd.Index(image_ids))

    def view_row(self, row: int) -> np.ndarray:
        """The stored int16 HU image of index row ``row``: a read-only view into the memory-mapped shard."""
        shard = int(self._shard[row])
        store = self._maps.get(shard)
        if store is None:
            path = shard_file(self._shard_dir, shard, ".npy")
            try:
                store = self._maps[shard] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:  # replaced, cut short or removed since the cache was opened
                raise self._disagree(f"shard {path.name} changed since the cache was opened: {err}") from None
        return store[self._offset[row]]

    def read_row(self, row: int) -> np.ndarray:
        """The stored int16 HU image of index row ``row`` (a copy, safe to modify)."""
        return np.array(self.view_row(row))

    def read(self, image_id: str) -> np.ndarray:
        """The stored int16 HU image of ``image_id``."""
        return self.read_row(self.row_of(image_id))

    def iter_rows(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every (image id, HU image) in index order."""
        for row, image_id in enumerate(self.index["image_id"]):
            yield image_id, self.read_row(row)
