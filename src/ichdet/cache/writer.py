"""The preprocessed pixel store: written in parallel and resumably, read by image id at random.

Layout of a cache folder::

    cache.json                          how it was built, the current generation, its shard counts
                                        (ichdet.cache.store.CacheManifest); written last
    index.parquet                       one row per image (see ichdet.cache.index) + ``shard``/``offset``
    errors.csv                          every file that was skipped, with the reason
    pixels/gen_00001/shard_00000.npy    int16 HU, shape (n, size, size), memory-mapped when read
    pixels/gen_00001/shard_00000.json   the shard's manifest: every source file of its chunk (path,
                                        size, mtime_ns), ok or error

Pixels are kept as integer HU clipped to :data:`STORE_RANGE`, which holds every window preset, so
windows are applied when a sample is read and a new window needs no new preprocessing.

Writing: files are split into fixed chunks in path order (:func:`_default_chunk_size` files each,
chosen from the file count at the first run and kept in ``cache.json``). A worker streams a chunk's
images into its ``.npy`` and then writes its manifest, each under a temporary name renamed into place,
and hands the manifest rows back to the parent, which merges them into the index. A rerun skips every
chunk whose manifest and shard check out (:func:`_load_done_chunk`: the same files with the same sizes
and mtimes, so a replaced or edited file is read again) and redoes only the rest.

Generations: a run writes its shards into a new generation folder (chunks unchanged since the current
generation are hard-linked into it), then index.parquet (stamped with the generation), errors.csv and
last cache.json, which names the new generation; only then is the old generation deleted. A run killed
at any moment leaves either the old cache whole or a cache that ``PixelCache`` refuses to open (never
one file's pixels under another's id), and a rerun resumes the unfinished generation.

Durability: every file appears atomically, so a killed or interrupted run never leaves a half-written
file under its final name. Only index.parquet, errors.csv and cache.json are also fsynced; the shards
and their manifests are not (their two fsyncs per chunk cost about 0.9 ms per file, nearly as much as
reading the file, and the cache can always be rebuilt from the DICOM files). After a power cut or OS
crash, a shard or manifest written shortly before may be empty or short even where the index was
saved (reading such a shard fails): rerun the same ``ichdet preprocess`` command, which checks every
chunk (the manifest parses and lists the chunk's files; the shard's header says ``(n stored, size,
size)`` int16 and the file has exactly that many bytes) and redoes those that fail.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.lib.format as npy
import pandas as pd
import pydicom
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from ichdet import __version__
from ichdet.cache.folder import check_compatible, check_out, start_generation
from ichdet.cache.folder import commit as _commit
from ichdet.cache.index import FileKey, build_index, default_workers, scan_dicom_files
from ichdet.cache.labels import read_labels
from ichdet.cache.provenance import SYNTH_IMPLEMENTATION_VERSION, cache_record
from ichdet.cache.store import (
    CACHE_VERSION,
    STORE_RANGE,
    CacheManifest,
    CacheSettings,
    CacheSummary,
    generation_dir,
    read_manifest,
    shard_file,
)
from ichdet.dicom.read import DEFAULT_MAX_PIXELS, ROW_FIELDS, Workspace, read_dicom
from ichdet.dicom.windowing import resize_square
from ichdet.errors import DicomError, IchdetError
from ichdet.io import (
    atomic_path,
    folder_lock,
)

#: The summary of one run (``ichdet.cache.store.CacheSummary``, kept in ``cache.json``).
PreprocessSummary = CacheSummary


class PreprocessOptions(BaseModel):
    """How ``ichdet preprocess`` builds a cache, validated on construction (IchdetError naming the value).

    ``max_pixels`` caps the decoded image (rows x columns x frames, counted in 16-bit pixels) and the
    padded square it is resized from; a file over it is skipped before any decode, inflation or resize.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(512, ge=16, le=2048)
    workers: int | None = Field(None, ge=1)
    n_folds: int = Field(5, ge=2)
    seed: int = Field(0, ge=0)
    chunk_size: int | None = Field(None, ge=1, le=4096)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=16 * 16, le=2**31)
    progress: bool = True

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}"
                                 for e in err.errors())
            raise IchdetError(f"preprocess options: {problems}") from None


def hu_to_store(hu: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Clip HU to :data:`STORE_RANGE`, pad to a square with air, resize to ``size``; int16 (size, size).

    Clipping comes first so scanner padding (-2000, -3024 outside the field of view) does not bleed
    into the head when resizing (:func:`ichdet.dicom.windowing.resize_square`: area to shrink, bilinear to
    enlarge). Integer HU (what the preprocessor reads) already at ``size`` are clipped straight into the
    result, exactly:
    every value kept is exact in float32 and np.rint of an integer is that integer. With ``out``, the
    result is written there.
    """
    lo, hi = STORE_RANGE
    if out is None:
        out = np.empty((size, size), np.int16)
    if hu.dtype in (np.int16, np.int32) and hu.shape == (size, size):
        return np.clip(hu, lo, hi, out=out, casting="unsafe")  # every clipped value fits int16
    img = np.clip(hu, lo, hi).astype(np.float32, copy=False)
    h, w = img.shape
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        img = cv2.copyMakeBorder(img, top, side - h - top, left, side - w - left,
                                 cv2.BORDER_CONSTANT, value=float(lo))
    out[...] = np.rint(resize_square(img, size))
    return out


@dataclass(frozen=True)
class _Chunk:
    number: int
    root: str
    files: tuple[FileKey, ...]  # (path relative to root, size, mtime_ns)
    size: int
    shard_dir: str
    max_pixels: int

    @property
    def npy(self) -> Path:
        return shard_file(self.shard_dir, self.number, ".npy")

    @property
    def manifest(self) -> Path:
        return shard_file(self.shard_dir, self.number, ".json")


#: A chunk's manifest: one dict per source file, in the chunk's order (see :func:`_process_chunk`).
_Rows = list[dict[str, object]]

#: The header fields every good manifest row holds (``DicomMeta.as_row``), in index column order.
_META_FIELDS: tuple[str, ...] = ROW_FIELDS

#: Per-thread pixel buffers for :func:`_process_chunk` (``.work``, created on first use in each worker).
_local = threading.local()


def _npy_header(n: int, size: int) -> bytes:
    """numpy's own NPY 1.0 header for C-order int16 ``(n, size, size)``.

    numpy pads the header so the first axis can grow without changing its length, which lets a shard
    be written with a count of 0 and the header rewritten in place with the final count.
    """
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<i2", "fortran_order": False, "shape": (n, size, size)})
    return buf.getvalue()


def _process_chunk(chunk: _Chunk) -> _Rows:
    """Read, convert and store every file of one chunk; returns its manifest rows (also written to disk).

    Each stored image is appended to the shard file as soon as it is converted (constant memory
    whatever the chunk size); the header, written first with a count of 0, is rewritten with the
    final count at the end, all under a temporary name.
    """
    work = _local.work = getattr(_local, "work", None) or Workspace()  # per-file arrays reused (see Workspace)
    image = np.empty((chunk.size, chunk.size), np.int16)
    n_stored = 0
    rows: _Rows = []
    with atomic_path(chunk.npy, fsync=False) as tmp, open(tmp, "wb") as fh:
        fh.write(_npy_header(0, chunk.size))
        for rel, file_size, mtime_ns in chunk.files:
            row: dict[str, object] = {"path": rel, "file_size": file_size, "mtime_ns": mtime_ns,
                                      "reason": None, "offset": -1}
            try:
                meta, hu = read_dicom(Path(chunk.root) / rel, integer=True, work=work,
                                      max_pixels=chunk.max_pixels)  # int16/int32 HU where exact
                hu_to_store(hu, chunk.size, out=image)
            except DicomError as err:
                row["reason"] = err.reason
            except Exception as err:  # a file must never stop the run; it is reported instead
                row["reason"] = f"unexpected error while reading: {type(err).__name__}: {err}"
            else:
                row["offset"] = n_stored
                row.update(meta.as_row())
                row["synthetic"] = meta.implementation_version == SYNTH_IMPLEMENTATION_VERSION
                fh.write(image.data)
                n_stored += 1
            rows.append(row)
        final = _npy_header(n_stored, chunk.size)
        if len(final) != len(_npy_header(0, chunk.size)):
            raise IchdetError(f"{chunk.npy}: the NPY header grew with the image count; use smaller chunks")
        fh.seek(0)
        fh.write(final)
    _write_manifest(chunk, rows)
    return rows


def is_synthetic(path: Path) -> bool:
    """Whether ``path`` was written by ``ichdet synth``: its file meta header's Implementation Version
    Name (0002,0013) is :data:`~ichdet.cache.provenance.SYNTH_IMPLEMENTATION_VERSION` (preprocess reads
    it from the header it parses anyway, :attr:`DicomMeta.implementation_version`)."""
    try:
        file_meta = pydicom.filereader.read_file_meta_info(path)
    except (OSError, InvalidDicomError):
        return False
    return str(file_meta.get("ImplementationVersionName", "")).strip() == SYNTH_IMPLEMENTATION_VERSION


def _write_manifest(chunk: _Chunk, rows: _Rows) -> None:
    """The chunk's rows as JSON (cheaper to write and read back than Parquet at 16-256 rows)."""
    with atomic_path(chunk.manifest, fsync=False) as tmp:
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "size": chunk.size,
                                   "max_pixels": chunk.max_pixels, "rows": rows}))


def _load_done_chunk(chunk: _Chunk) -> _Rows | None:
    """The manifest rows of a chunk finished by an earlier run, or None if it must be (re)done.

    Done means: the manifest parses and lists exactly the chunk's files with the same sizes and mtimes
    (a replaced or edited file, good or bad before, is read again), and the shard's NPY header is the
    one for int16 ``(n stored, size, size)`` with the file exactly that long. Shards are not fsynced,
    so after a power cut either file may be empty or short; such a chunk fails this check and is redone.
    """
    try:
        manifest = json.loads(chunk.manifest.read_bytes())
        rows: _Rows = manifest["rows"]
        keys = tuple((r["path"], r["file_size"], r["mtime_ns"]) for r in rows)
        if (manifest.get("size"), manifest.get("max_pixels")) != (chunk.size, chunk.max_pixels) \
                or keys != chunk.files:
            return None
        n_stored = sum(isinstance(r["offset"], int) and r["offset"] >= 0 for r in rows)
        header = _npy_header(n_stored, chunk.size)
        with open(chunk.npy, "rb") as fh:
            ok = (fh.read(len(header)) == header
                  and os.fstat(fh.fileno()).st_size == len(header) + n_stored * chunk.size * chunk.size * 2)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rows if ok else None


def _default_chunk_size(n_files: int) -> int:
    """Files per chunk for ``n_files``: ~64 chunks, 16 to 256 files each (a function of the list only).

    A chunk's fixed cost (two small files renamed into place, a task round trip to a worker) is about
    1 ms, under 0.1 ms per file at 16 files. Larger chunks would lose load balance on small sets (the
    last chunk of each worker is the run's tail) and resume granularity on large ones (256 files is
    under a second of one core's work); memory does not grow with them (images are streamed to disk).
    """
    return int(np.clip(np.ceil(n_files / 64), 16, 256))


def _plan_chunks(images: Path, shard_dir: Path, opts: PreprocessOptions,
                 step: int | None) -> tuple[int, list[_Chunk], list[tuple[str, str]]]:
    """Split the sorted file list into chunks of ``step`` files (default: :func:`_default_chunk_size`);
    also returns the entries that could not be listed as files (path, reason)."""
    files, problems = scan_dicom_files(images)
    if not files:
        raise IchdetError(f"{images}: no files found{' that can be read' if problems else ''}; pass the "
                          "folder that holds the DICOM files")
    step = step or _default_chunk_size(len(files))
    return step, [_Chunk(i // step, str(images), tuple(files[i:i + step]), opts.size, str(shard_dir),
                         opts.max_pixels) for i in range(0, len(files), step)], problems


def _run_chunks(todo: list[_Chunk], workers: int, progress: bool, total: int, done: int) -> dict[int, _Rows]:
    """Process ``todo`` (in this process, or in a pool of ``workers``); returns rows by chunk number."""
    results: dict[int, _Rows] = {}
    with tqdm(total=total, initial=done, unit="file", disable=not progress, desc="preprocess") as bar:
        if workers <= 1 or len(todo) <= 1:
            try:
                for chunk in todo:
                    results[chunk.number] = rows = _process_chunk(chunk)
                    bar.update(len(rows))
            finally:
                _local.work = None  # the caller's process does not keep the per-file buffers
            return results
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            futures = {pool.submit(_process_chunk, c): c.number for c in todo}
            for fut in as_completed(futures):
                results[futures[fut]] = rows = fut.result()
                bar.update(len(rows))
    return results


def _collect(chunks: list[_Chunk], rows: dict[int, _Rows],
             problems: list[tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame, tuple[int, int]]:
    """Merge the chunks' manifest rows: (good rows with shard/offset, error rows with path/reason, and
    how many good rows came from ``ichdet synth`` and how many are of unknown origin).

    ``problems`` (entries the folder scan could not list as files) come first in the error rows.
    """
    good: _Rows = []
    shard: list[int] = []
    bad: list[tuple[object, object]] = list(problems)
    duplicates: list[tuple[object, object]] = []  # listed after the unreadable files
    seen: dict[object, object] = {}  # image id -> path of its first file
    for chunk in chunks:
        for row in rows[chunk.number]:
            if row["reason"] is not None:
                bad.append((row["path"], row["reason"]))
            elif row["image_id"] in seen:
                duplicates.append((row["path"], f"duplicate image id {row['image_id']} (already read from "
                                                f"{seen[row['image_id']]}); file skipped"))
            else:
                seen[row["image_id"]] = row["path"]
                good.append(row)
                shard.append(chunk.number)
    columns: dict[str, object] = {"path": [r["path"] for r in good],
                                  "offset": np.array([r["offset"] for r in good], np.int32)}
    columns.update({name: [r[name] for r in good] for name in _META_FIELDS})
    columns["shard"] = np.array(shard, np.int32)
    origin = ([r.get("synthetic") for r in good].count(True), sum("synthetic" not in r for r in good))
    return pd.DataFrame(columns), pd.DataFrame(bad + duplicates, columns=["path", "reason"]), origin


def _reuse(chunk: _Chunk, old_dir: Path) -> _Rows | None:
    """A chunk done in the current generation, hard-linked (or copied) into the new one; else None."""
    old = _Chunk(chunk.number, chunk.root, chunk.files, chunk.size, str(old_dir), chunk.max_pixels)
    rows = _load_done_chunk(old)
    if rows is None:
        return None
    for src, dst in ((old.npy, chunk.npy), (old.manifest, chunk.manifest)):
        with atomic_path(dst, fsync=False) as tmp:
            try:
                os.link(src, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(src, tmp)
    return rows


def _resume(chunks: list[_Chunk], old_dir: Path | None) -> dict[int, _Rows]:
    """Rows of every chunk already done in the new generation, or reusable from the current one."""
    rows: dict[int, _Rows] = {}
    for chunk in chunks:
        done = _load_done_chunk(chunk)
        if done is None and old_dir is not None:
            done = _reuse(chunk, old_dir)
        if done is not None:
            rows[chunk.number] = done
    return rows


def preprocess(images: str | Path, out: str | Path, labels_csv: str | Path | None = None,
               options: PreprocessOptions | None = None) -> PreprocessSummary:
    """Build (or resume, or update) a cache from a DICOM folder; see the module docstring for the layout.

    Bad files are skipped and listed in ``errors.csv``; the caller decides whether that is fatal.
    Every argument is checked (and the label file read) before any pixel work. The output folder is
    locked for the run (:func:`ichdet.io.folder_lock`): a second run into it fails at once.
    """
    opts = options or PreprocessOptions()
    start = time.perf_counter()
    images, out = Path(images).resolve(), Path(out)
    if not images.is_dir():
        raise IchdetError(f"--images {images}: {'not a folder' if images.exists() else 'no such folder'}; "
                          "pass the folder that holds the DICOM files")
    labels = read_labels(labels_csv) if labels_csv is not None else None
    previous = read_manifest(out) if out.is_dir() else None
    check_out(out, previous)
    with folder_lock(out, "ichdet preprocess"):
        current = previous.generation if previous else 0
        step, chunks, problems = _plan_chunks(images, generation_dir(out, current + 1), opts,
                                              opts.chunk_size or (previous.chunk_size if previous else None))
        settings = CacheSettings(
            version=CACHE_VERSION, size=opts.size, store_range=STORE_RANGE, images=str(images), chunk_size=step,
            labels=str(Path(labels_csv).resolve()) if labels_csv else None, n_folds=opts.n_folds,
            seed=opts.seed, max_pixels=opts.max_pixels)
        check_compatible(out, previous, settings)
        start_generation(out, current)  # only now, after every check, is anything in --out changed
        rows = _resume(chunks, generation_dir(out, previous.generation) if previous else None)
        todo = [c for c in chunks if c.number not in rows]
        n_resumed = len(rows)
        n_files = sum(len(c.files) for c in chunks)
        rows.update(_run_chunks(todo, opts.workers or default_workers(), opts.progress, n_files,
                                n_files - sum(len(c.files) for c in todo)))
        good, errors, (n_synthetic, n_unknown) = _collect(chunks, rows, problems)
        index, missing = build_index(good, labels, n_folds=opts.n_folds, seed=opts.seed)
        summary = PreprocessSummary(
            cache=str(out), n_files=n_files + len(problems), n_images=len(index), n_errors=len(errors),
            n_chunks=len(chunks), n_chunks_resumed=n_resumed,
            n_unlabelled=int((index["fold"] < 0).sum()), labelled_without_image=missing,
            seconds=time.perf_counter() - start)
        shards = [sum(isinstance(r["offset"], int) and r["offset"] >= 0 for r in rows[c.number]) for c in chunks]
        manifest = CacheManifest(**settings.model_dump(), generation=current + 1, shards=shards, summary=summary,
                                 provenance=cache_record(index, opts.size, n_synthetic, n_unknown, __version__))
        _commit(out, index, errors, manifest, previous)
    return summary
