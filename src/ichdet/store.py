"""The pixel store's reader: random access by image id into a preprocessed cache (no pydicom).

:mod:`ichdet.cache` writes a cache folder; this module reads it. The training and inference side
(data, train, engine, predict) imports only this module, so it never pulls in the DICOM readers.
See :mod:`ichdet.cache` for the folder layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ichdet.errors import IchdetError

#: Integer HU kept in the store: air (-1024) to dense bone (3071), the 12-bit CT range.
STORE_RANGE: tuple[int, int] = (-1024, 3071)
CACHE_VERSION = 1


def shard_file(shard_dir: str | Path, number: int, suffix: str) -> Path:
    """``pixels/shard_00012.npy`` (the pixels) or ``.json`` (the manifest) of chunk ``number``."""
    return Path(shard_dir) / f"shard_{number:05d}{suffix}"


class PixelCache:
    """Random access to a cache's pixels by image id; cheap to pickle into data-loader workers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / "index.parquet"
        if not index_path.exists():
            raise IchdetError(f"{self.root}: no index.parquet; build the cache with `ichdet preprocess`")
        self.settings: dict[str, object] = json.loads((self.root / "cache.json").read_text())
        self.index = pd.read_parquet(index_path)
        self._position = pd.Index(self.index["image_id"])
        self._shard = self.index["shard"].to_numpy()
        self._offset = self.index["offset"].to_numpy()
        self._maps: dict[int, np.ndarray] = {}

    @property
    def size(self) -> int:
        """Side length in pixels of every stored image."""
        return int(self.settings["size"])  # type: ignore[call-overload]

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
            store = self._maps[shard] = np.load(shard_file(self.root / "pixels", shard, ".npy"), mmap_mode="r")
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
