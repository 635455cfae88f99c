"""The preprocessed pixel store: written in parallel and resumably, read by image id at random.

Layout of a cache folder::

    cache.json                 how it was built (size, HU range, chunking) and what it holds
    index.parquet              one row per image (see ichdet.index) + ``shard``/``offset`` into the store
    errors.csv                 every file that was skipped, with the reason
    pixels/shard_00000.npy     int16 HU, shape (n, size, size), memory-mapped when read
    pixels/shard_00000.parquet the shard's manifest: every source file of its chunk, ok or error

Pixels are kept as integer HU clipped to :data:`STORE_RANGE`, which holds every window preset, so
windows are applied when a sample is read and a new window needs no new preprocessing. Files are
split into fixed chunks in path order; each chunk's ``.npy`` and then its manifest are written
atomically, so a rerun skips every chunk whose manifest matches and redoes only the rest.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ichdet.dicom import _read_dicom, _Workspace
from ichdet.errors import DicomError, IchdetError
from ichdet.index import build_index, list_dicom_files
from ichdet.io import atomic_path, write_json_atomic, write_parquet_atomic
from ichdet.labels import read_labels

#: Integer HU kept in the store: air (-1024) to dense bone (3071), the 12-bit CT range.
STORE_RANGE: tuple[int, int] = (-1024, 3071)
CACHE_VERSION = 1


@dataclass(frozen=True)
class PreprocessOptions:
    """How ``ichdet preprocess`` builds a cache (written to ``cache.json``)."""

    size: int = 512
    workers: int | None = None
    n_folds: int = 5
    seed: int = 0
    chunk_size: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class PreprocessSummary:
    """What one preprocessing run did."""

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


def default_workers() -> int:
    """The number of cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hu_to_store(hu: np.ndarray, size: int) -> np.ndarray:
    """Clip HU to :data:`STORE_RANGE`, pad to a square with air, resize to ``size``; int16 (size, size).

    Clipping comes first so scanner padding (-2000, -3024 outside the field of view) does not bleed
    into the head when resizing. Shrinking uses area interpolation, enlarging bilinear.
    """
    lo, hi = STORE_RANGE
    if hu.dtype in (np.int16, np.int32):
        # Integer HU (what the preprocessor reads): clip in integers. Equal to the float path below,
        # since every value kept is exact in float32 and np.rint of an integer is that integer.
        clipped = np.clip(hu, lo, hi)
        if clipped.shape == (size, size):
            return clipped.astype(np.int16, copy=False)
        img = clipped.astype(np.float32)
    else:
        img = np.clip(hu, lo, hi).astype(np.float32, copy=False)
    h, w = img.shape
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        img = cv2.copyMakeBorder(img, top, side - h - top, left, side - w - left,
                                 cv2.BORDER_CONSTANT, value=float(lo))
    if img.shape[0] != size:
        interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
    return np.rint(img).astype(np.int16)


def _store_into(hu: np.ndarray, size: int, out: np.ndarray) -> None:
    """``out[...] = hu_to_store(hu, size)``, clobbering ``hu`` (a scratch array) to spare two allocations."""
    if hu.dtype == np.int32 and hu.shape == (size, size) and hu.flags.writeable:
        np.clip(hu, *STORE_RANGE, out=hu)
        np.copyto(out, hu, casting="unsafe")  # exact: every value is in STORE_RANGE now
    else:
        out[...] = hu_to_store(hu, size)


@dataclass(frozen=True)
class _Chunk:
    number: int
    root: str
    files: tuple[str, ...]  # relative to root
    size: int
    shard_dir: str

    @property
    def npy(self) -> Path:
        return Path(self.shard_dir) / f"shard_{self.number:05d}.npy"

    @property
    def manifest(self) -> Path:
        return Path(self.shard_dir) / f"shard_{self.number:05d}.parquet"


def _process_chunk(chunk: _Chunk) -> int:
    """Read, convert and store every file of one chunk; returns the number of files handled."""
    # Images go straight into the shard's array, and the per-file arrays are reused (see _Workspace).
    stack = np.empty((len(chunk.files), chunk.size, chunk.size), np.int16)
    work = _Workspace()
    n_stored = 0
    rows: list[dict[str, object]] = []
    for rel in chunk.files:
        row: dict[str, object] = {"path": rel, "reason": None, "offset": -1}
        try:
            meta, hu = _read_dicom(Path(chunk.root) / rel, integer=True, work=work)  # int32 HU where exact
            _store_into(hu, chunk.size, stack[n_stored])
        except DicomError as err:
            row["reason"] = err.reason
        except Exception as err:  # a file must never stop the run; it is reported instead
            row["reason"] = f"unexpected error while reading: {type(err).__name__}: {err}"
        else:
            row.update(meta.as_row())
            row["offset"] = n_stored
            n_stored += 1
        rows.append(row)
    stack = stack[:n_stored]
    with atomic_path(chunk.npy) as tmp, open(tmp, "wb") as fh:
        np.save(fh, stack)
    write_parquet_atomic(pd.DataFrame(rows).assign(shard=chunk.number), chunk.manifest)
    return len(chunk.files)


def _chunk_is_done(chunk: _Chunk) -> bool:
    if not (chunk.manifest.exists() and chunk.npy.exists()):
        return False
    try:
        done = pd.read_parquet(chunk.manifest, columns=["path", "offset"])
        n_stored = np.load(chunk.npy, mmap_mode="r").shape[0]
    except (OSError, ValueError):
        return False
    return tuple(done["path"]) == chunk.files and int((done["offset"] >= 0).sum()) == n_stored


def _plan_chunks(images: Path, out: Path, size: int, step: int | None) -> tuple[int, list[_Chunk]]:
    """Split the sorted file list into chunks of ``step`` files (default: ~64 chunks, 16 to 256)."""
    files = [p.relative_to(images).as_posix() for p in list_dicom_files(images)]
    if not files:
        raise IchdetError(f"{images}: no files found; pass the folder that holds the DICOM files")
    step = step or int(np.clip(np.ceil(len(files) / 64), 16, 256))
    shard_dir = out / "pixels"
    return step, [_Chunk(i // step, str(images), tuple(files[i:i + step]), size, str(shard_dir))
                  for i in range(0, len(files), step)]


def _previous_settings(out: Path) -> dict[str, object]:
    meta = out / "cache.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def _check_compatible(out: Path, old: dict[str, object], settings: dict[str, object]) -> None:
    for key in ("size", "store_range", "version", "images"):
        if old and old.get(key) != settings[key]:
            raise IchdetError(f"{out} holds a cache built with {key}={old.get(key)!r}, not "
                              f"{settings[key]!r}; choose another --out or delete that folder")


def _run_chunks(todo: list[_Chunk], workers: int, progress: bool, total: int, done: int) -> None:
    bar = tqdm(total=total, initial=done, unit="file", disable=not progress, desc="preprocess")
    with bar:
        if workers <= 1 or len(todo) <= 1:
            for chunk in todo:
                bar.update(_process_chunk(chunk))
            return
        with ProcessPoolExecutor(workers) as pool:
            for fut in as_completed([pool.submit(_process_chunk, c) for c in todo]):
                bar.update(fut.result())


def _collect(chunks: list[_Chunk]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge the shard manifests: (good rows with shard/offset, error rows with path/reason)."""
    table = pd.concat([pd.read_parquet(c.manifest) for c in chunks], ignore_index=True)
    failed = table["reason"].notna()
    errors = table.loc[failed, ["path", "reason"]]
    good = table.loc[~failed].drop(columns=["reason"])
    dup = good["image_id"].duplicated(keep="first")
    if dup.any():
        first = good.drop_duplicates("image_id").set_index("image_id")["path"]
        extra = good.loc[dup, ["path", "image_id"]]
        reasons = [f"duplicate image id {i} (already read from {first[i]}); file skipped"
                   for i in extra["image_id"]]
        errors = pd.concat([errors, pd.DataFrame({"path": extra["path"], "reason": reasons})])
        good = good.loc[~dup]
    good = good.astype({"shard": "int32", "offset": "int32"})
    return good.reset_index(drop=True), errors.reset_index(drop=True)


def preprocess(images: str | Path, out: str | Path, labels_csv: str | Path | None = None,
               options: PreprocessOptions | None = None) -> PreprocessSummary:
    """Build (or resume) a cache from a DICOM folder; see the module docstring for the layout.

    Bad files are skipped and listed in ``errors.csv``; the caller decides whether that is fatal.
    The label file is read first so a malformed one fails before any pixel work.
    """
    opts = options or PreprocessOptions()
    start = time.perf_counter()
    images, out = Path(images).resolve(), Path(out)
    labels = read_labels(labels_csv) if labels_csv is not None else None
    previous = _previous_settings(out)
    step, chunks = _plan_chunks(images, out, opts.size,
                                opts.chunk_size or previous.get("chunk_size"))  # type: ignore[arg-type]
    settings: dict[str, object] = {
        "version": CACHE_VERSION, "size": opts.size, "store_range": list(STORE_RANGE),
        "chunk_size": step, "images": str(images),
        "labels": str(Path(labels_csv).resolve()) if labels_csv else None,
        "n_folds": opts.n_folds, "seed": opts.seed}
    _check_compatible(out, previous, settings)
    (out / "pixels").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "cache.json", settings)
    todo = [c for c in chunks if not _chunk_is_done(c)]
    n_files = sum(len(c.files) for c in chunks)
    _run_chunks(todo, opts.workers or default_workers(), opts.progress, n_files,
                n_files - sum(len(c.files) for c in todo))
    good, errors = _collect(chunks)
    index, missing = build_index(good, labels, n_folds=opts.n_folds, seed=opts.seed)
    write_parquet_atomic(index, out / "index.parquet")
    with atomic_path(out / "errors.csv") as tmp:
        errors.to_csv(tmp, index=False)
    summary = PreprocessSummary(
        cache=str(out), n_files=n_files, n_images=len(index), n_errors=len(errors),
        n_chunks=len(chunks), n_chunks_resumed=len(chunks) - len(todo),
        n_unlabelled=int((index["fold"] < 0).sum()), labelled_without_image=missing,
        seconds=time.perf_counter() - start)
    write_json_atomic(out / "cache.json", {**settings, "summary": asdict(summary)})
    return summary


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

    def read_row(self, row: int) -> np.ndarray:
        """The stored int16 HU image of index row ``row`` (a copy, safe to modify)."""
        shard = int(self._shard[row])
        store = self._maps.get(shard)
        if store is None:
            path = self.root / "pixels" / f"shard_{shard:05d}.npy"
            store = self._maps[shard] = np.load(path, mmap_mode="r")
        return np.array(store[self._offset[row]])

    def read(self, image_id: str) -> np.ndarray:
        """The stored int16 HU image of ``image_id``."""
        return self.read_row(self.row_of(image_id))

    def iter_rows(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every (image id, HU image) in index order."""
        for row, image_id in enumerate(self.index["image_id"]):
            yield image_id, self.read_row(row)
