from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate

import ichdet.io
from ichdet.cache import writer as cache_mod
from ichdet.cache.store import STORE_RANGE, PixelCache, generation_dir, read_manifest
from ichdet.cache.writer import PreprocessOptions, hu_to_store, preprocess
from ichdet.dicom.read import read_hu
from ichdet.errors import IchdetError, LockError
from ichdet.synth import SynthSpec, make_dataset

OPTS = PreprocessOptions(size=64, workers=1, n_folds=2, chunk_size=8, progress=False)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_dataset(out, SynthSpec(n_studies=4, n_test_studies=1, size=64, slices_per_study=(8, 10), seed=3))
    return out


@pytest.mark.parametrize(("hu", "size", "expected"), [
    (np.array([[-3024.0, 0.0], [40.4, 5000.0]]), 2, [[-1024, 0], [40, 3071]]),  # clip, round
    (np.full((4, 4), 35.0), 2, [[35, 35], [35, 35]]),  # area shrink of a flat image
    (np.full((2, 4), 100.0), 4, [[-1024] * 4, [100] * 4, [100] * 4, [-1024] * 4]),  # pad with air, centred
])
def test_hu_to_store(hu: np.ndarray, size: int, expected: list[list[int]]) -> None:
    out = hu_to_store(hu, size)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, np.array(expected, dtype=np.int16))


def test_store_range_holds_every_preset() -> None:
    from ichdet.dicom.windowing import PRESETS, window_range

    lo, hi = window_range(list(PRESETS.values()))
    assert STORE_RANGE[0] <= max(lo, -1024) and hi <= STORE_RANGE[1]


def test_cache_round_trip(synth_dir: Path, tmp_path: Path) -> None:
    images = synth_dir / "stage_2_train_images"
    summary = preprocess(images, tmp_path / "c", synth_dir / "stage_2_train.csv", OPTS)
    files = sorted(images.glob("*.dcm"))
    assert (summary.n_files, summary.n_images, summary.n_errors) == (len(files), len(files), 0)
    store = PixelCache(tmp_path / "c")
    for path in files[::7]:  # random access by id == the HU of the file, converted once
        image_id = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        np.testing.assert_array_equal(store.read(image_id), hu_to_store(read_hu(path), 64))
    assert set(store.index["fold"]) == {0, 1}
    assert pd.read_csv(tmp_path / "c" / "errors.csv").empty
    with pytest.raises(KeyError, match="ID_nope"):
        store.read("ID_nope")


def _corrupt(folder: Path, source: Path) -> dict[str, str]:
    """One file of each kind of damage, named after it; returns name -> expected reason pattern."""
    good = source.read_bytes()
    ds = pydicom.dcmread(source)
    del ds.PixelData
    ds.save_as(folder / "no_pixels.dcm")
    (folder / "not_dicom.dcm").write_bytes(b"this is a text file, not an image\n" * 20)
    (folder / "truncated.dcm").write_bytes(good[: int(len(good) * 0.6)])
    (folder / "empty.dcm").write_bytes(b"")
    rle = pydicom.dcmread(source)
    rle.compress(pydicom.uid.RLELossless)
    rle.SOPInstanceUID = "ID_0badc0de"
    rle.save_as(folder / "undecodable.dcm")
    raw = bytearray((folder / "undecodable.dcm").read_bytes())
    start, end = raw.rfind(b"\xfe\xff\x00\xe0") + 80, len(raw) - 16  # inside the frame's RLE stream
    raw[start:end] = b"\x7f" * (end - start)  # every byte a literal-run header: runs past the end
    (folder / "undecodable.dcm").write_bytes(bytes(raw))
    return {"no_pixels.dcm": "no pixel data", "not_dicom.dcm": "not a DICOM file",
            "truncated.dcm": "truncated", "empty.dcm": "not a DICOM file",
            "undecodable.dcm": "undecodable RLE Lossless"}


def test_corrupt_files_are_skipped_and_reported(synth_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "stage_2_train_images", images)
    good = sorted(images.glob("*.dcm"))
    expected = _corrupt(images, good[0])
    summary = preprocess(images, tmp_path / "c", None, OPTS)
    errors = pd.read_csv(tmp_path / "c" / "errors.csv").set_index("path")
    assert sorted(errors.index) == sorted(expected)
    for name, pattern in expected.items():
        assert pattern.lower() in errors.loc[name, "reason"].lower()
    assert summary.n_errors == len(expected)
    assert summary.n_images == len(good)  # every good file kept, none substituted
    assert set(PixelCache(tmp_path / "c").index["path"]) == {p.name for p in good}


def test_interrupted_run_resumes(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = synth_dir / "stage_2_train_images", synth_dir / "stage_2_train.csv"
    reference = preprocess(images, tmp_path / "ref", labels, OPTS)
    calls: list[int] = []
    real = cache_mod._process_chunk

    def dies_on_third_chunk(chunk: cache_mod._Chunk) -> int:
        calls.append(chunk.number)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed ^C mid-run
        return real(chunk)

    monkeypatch.setattr(cache_mod, "_process_chunk", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        preprocess(images, tmp_path / "c", labels, OPTS)
    assert not (tmp_path / "c" / "index.parquet").exists()
    monkeypatch.setattr(cache_mod, "_process_chunk", real)
    resumed = preprocess(images, tmp_path / "c", labels, OPTS)
    assert resumed.n_chunks_resumed == 2
    assert resumed.n_chunks == reference.n_chunks
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "c" / "index.parquet"),
                                  pd.read_parquet(tmp_path / "ref" / "index.parquet"))
    assert not list((tmp_path / "c").rglob(".*tmp*"))  # no temp file left behind


def test_rerun_with_other_size_is_refused(synth_dir: Path, tmp_path: Path) -> None:
    images = synth_dir / "stage_2_train_images"
    preprocess(images, tmp_path / "c", None, OPTS)
    with pytest.raises(IchdetError, match=r"size=64, not 32"):
        preprocess(images, tmp_path / "c", None, PreprocessOptions(size=32, workers=1, progress=False))


def test_parallel_equals_serial(synth_dir: Path, tmp_path: Path) -> None:
    images = synth_dir / "stage_2_train_images"
    preprocess(images, tmp_path / "one", None, OPTS)
    preprocess(images, tmp_path / "two", None, PreprocessOptions(size=64, workers=2, n_folds=2, chunk_size=8,
                                                                 progress=False))
    one, two = PixelCache(tmp_path / "one"), PixelCache(tmp_path / "two")
    pd.testing.assert_frame_equal(one.index, two.index)
    for (id1, a), (id2, b) in zip(one.iter_rows(), two.iter_rows(), strict=True):
        assert id1 == id2
        np.testing.assert_array_equal(a, b)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(IchdetError, match="no files found"):
        preprocess(tmp_path / "empty", tmp_path / "c", None, OPTS)


def test_real_sample_cache(rsna_sample: Path, tmp_path: Path) -> None:
    summary = preprocess(rsna_sample / "stage_2_train_images", tmp_path / "c", rsna_sample / "stage_2_train.csv",
                         PreprocessOptions(size=128, workers=2, n_folds=3, progress=False))
    assert (summary.n_images, summary.n_errors, summary.labelled_without_image) == (232, 0, [])
    store = PixelCache(tmp_path / "c")
    path = sorted((rsna_sample / "stage_2_train_images").glob("*.dcm"))[0]
    np.testing.assert_array_equal(store.read(path.stem), hu_to_store(read_hu(path), 128))


def _pixels(root: Path) -> list[tuple[str, np.ndarray]]:
    return list(PixelCache(root).iter_rows())


def _same_cache(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(a / "index.parquet"), pd.read_parquet(b / "index.parquet"))
    pd.testing.assert_frame_equal(pd.read_csv(a / "errors.csv"), pd.read_csv(b / "errors.csv"))
    for (id1, x), (id2, y) in zip(_pixels(a), _pixels(b), strict=True):
        assert id1 == id2
        np.testing.assert_array_equal(x, y)


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# What a power cut can leave of a chunk whose files were renamed into place but never flushed.
DAMAGE = {
    "shard emptied": lambda npy, manifest: _truncate(npy, 0),
    "shard cut short": lambda npy, manifest: _truncate(npy, npy.stat().st_size - 1),
    "shard header only": lambda npy, manifest: _truncate(npy, 128),
    "shard one image long": lambda npy, manifest: npy.write_bytes(npy.read_bytes() + bytes(64 * 64 * 2)),
    "manifest emptied": lambda npy, manifest: _truncate(manifest, 0),
    "manifest cut short": lambda npy, manifest: _truncate(manifest, manifest.stat().st_size // 2),
    "manifest missing": lambda npy, manifest: manifest.unlink(),
    "shard missing": lambda npy, manifest: npy.unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_rerun_redoes_a_damaged_chunk(synth_dir: Path, tmp_path: Path, damage: str) -> None:
    images, labels = synth_dir / "stage_2_train_images", synth_dir / "stage_2_train.csv"
    reference = preprocess(images, tmp_path / "ref", labels, OPTS)
    preprocess(images, tmp_path / "c", labels, OPTS)
    pixels = generation_dir(tmp_path / "c", 1)
    DAMAGE[damage](pixels / "shard_00001.npy", pixels / "shard_00001.json")
    if damage.startswith("shard"):  # the reader checks every shard against cache.json
        with pytest.raises(IchdetError, match=r"parts disagree \(shard.*shard_00001"):
            PixelCache(tmp_path / "c")
    again = preprocess(images, tmp_path / "c", labels, OPTS)
    assert (again.n_chunks, again.n_chunks_resumed) == (reference.n_chunks, reference.n_chunks - 1)
    assert sorted(p.name for p in (tmp_path / "c" / "pixels").iterdir()) == ["gen_00002"]
    _same_cache(tmp_path / "ref", tmp_path / "c")


def test_complete_rerun_reuses_every_chunk(synth_dir: Path, tmp_path: Path) -> None:
    images = synth_dir / "stage_2_train_images"
    first = preprocess(images, tmp_path / "c", None, OPTS)
    again = preprocess(images, tmp_path / "c", None, OPTS)
    assert again.n_chunks_resumed == first.n_chunks > 1
    assert again.n_images == first.n_images


def test_shards_are_plain_npy(synth_dir: Path, tmp_path: Path) -> None:
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "c", None, OPTS)
    index = pd.read_parquet(tmp_path / "c" / "index.parquet")
    for shard, count in index["shard"].value_counts().items():
        array = np.load(generation_dir(tmp_path / "c", 1) / f"shard_{shard:05d}.npy")
        assert array.dtype == np.int16 and array.shape == (count, 64, 64)


def test_only_the_final_files_are_fsynced(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    monkeypatch.setattr(ichdet.io, "_fsync_file", lambda path: synced.append(Path(path).name))
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "c", None, OPTS)
    # temporary names: .<final name>.<random>.tmp<suffix>, renamed once flushed
    assert sorted(name.split(".")[1] for name in synced) == ["cache", "errors", "index"]


def test_stale_temp_files_are_removed(synth_dir: Path, tmp_path: Path) -> None:
    images = synth_dir / "stage_2_train_images"
    preprocess(images, tmp_path / "c", None, OPTS)
    stale = tmp_path / "c" / "pixels" / ".shard_00000.npy.0123456789ab.tmp.npy"  # left by a killed worker
    stale.write_bytes(b"half a shard")
    preprocess(images, tmp_path / "c", None, OPTS)
    assert not stale.exists()


def test_index_columns_do_not_depend_on_errors(synth_dir: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    shutil.copytree(synth_dir / "stage_2_train_images", clean)
    damaged = tmp_path / "damaged"
    shutil.copytree(clean, damaged)
    _corrupt(damaged, sorted(damaged.glob("*.dcm"))[0])
    preprocess(clean, tmp_path / "a", None, OPTS)
    preprocess(damaged, tmp_path / "b", None, OPTS)
    a, b = (pd.read_parquet(tmp_path / c / "index.parquet") for c in "ab")
    assert a.dtypes.to_dict() == b.dtypes.to_dict()
    assert a["instance_number"].dtype == np.int64 and b["shard"].dtype == np.int32


def test_duplicate_files_are_reported(synth_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "stage_2_train_images", images)
    original = sorted(images.glob("*.dcm"))[2]
    shutil.copy(original, images / "zz_copy.dcm")
    summary = preprocess(images, tmp_path / "c", None, OPTS)
    errors = pd.read_csv(tmp_path / "c" / "errors.csv")
    assert list(errors["path"]) == ["zz_copy.dcm"]
    assert f"already read from {original.name}" in errors.loc[0, "reason"]
    assert summary.n_images == len(list(images.glob("*.dcm"))) - 1


def _fails_on_chunk_2(chunk: cache_mod._Chunk) -> object:
    """_process_chunk that fails on chunk 2 (module level, so it pickles into forked workers)."""
    if chunk.number == 2:
        raise RuntimeError("worker failed on chunk 2")
    return _REAL_PROCESS_CHUNK(chunk)


_REAL_PROCESS_CHUNK = cache_mod._process_chunk


def test_failed_parallel_run_resumes(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = synth_dir / "stage_2_train_images"
    opts = PreprocessOptions(size=64, workers=2, n_folds=2, chunk_size=8, progress=False)
    preprocess(images, tmp_path / "ref", None, opts)
    monkeypatch.setattr(cache_mod, "_process_chunk", _fails_on_chunk_2)
    with pytest.raises(RuntimeError, match="chunk 2"):
        preprocess(images, tmp_path / "c", None, opts)
    assert not (tmp_path / "c" / "index.parquet").exists()
    monkeypatch.setattr(cache_mod, "_process_chunk", _REAL_PROCESS_CHUNK)
    resumed = preprocess(images, tmp_path / "c", None, opts)
    # the pool finishes every other submitted chunk before the error propagates: only chunk 2 is redone
    assert resumed.n_chunks_resumed == resumed.n_chunks - 1
    _same_cache(tmp_path / "ref", tmp_path / "c")
    assert not list((tmp_path / "c").rglob(".*tmp*"))


@pytest.mark.parametrize(("n_files", "chunk"), [(1, 16), (296, 16), (1024, 16), (10_000, 157), (752_803, 256)])
def test_default_chunk_size(n_files: int, chunk: int) -> None:
    assert cache_mod._default_chunk_size(n_files) == chunk


def test_view_row_is_a_read_only_view(synth_dir: Path, tmp_path: Path) -> None:
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "c", None, OPTS)
    store = PixelCache(tmp_path / "c")
    view = store.view_row(3)
    np.testing.assert_array_equal(view, store.read_row(3))
    assert not view.flags.writeable


# ------------------------------------------------------------------------------- hostile input (issue 8)


@pytest.mark.parametrize(("options", "match"), [
    ({"size": 0}, r"size=0: Input should be greater than or equal to 16"),
    ({"size": -5}, r"size=-5: Input should be greater than or equal to 16"),
    ({"size": 100_000}, r"size=100000: Input should be less than or equal to 2048"),
    ({"n_folds": 1}, r"n_folds=1: Input should be greater than or equal to 2"),
    ({"workers": 0}, r"workers=0: Input should be greater than or equal to 1"),
    ({"chunk_size": 0}, r"chunk_size=0: Input should be greater than or equal to 1"),
    ({"max_pixels": 10}, r"max_pixels=10: Input should be greater than or equal to 256"),
    ({"sizes": 64}, r"sizes=64: Extra inputs are not permitted"),
])
def test_bad_options_fail_before_any_work(options: dict[str, object], match: str) -> None:
    with pytest.raises(IchdetError, match=rf"^preprocess options: {match}"):
        PreprocessOptions(**options)


def _crafted(source: Path, path: Path, syntax: pydicom.uid.UID | None, rows: int, cols: int,
             pixel_data: bytes) -> Path:
    """``source`` with another size and pixel data, saved in transfer syntax ``syntax`` (None: as it is)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = "ID_" + path.stem
    ds.Rows, ds.Columns = rows, cols
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB" if syntax == pydicom.uid.RLELossless else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def _bombs(folder: Path, source: Path) -> dict[str, str]:
    """The issue's memory bombs, each a few kilobytes on disk; returns name -> expected reason."""
    rle_frame = encapsulate([b"\x00" * 64])
    _crafted(source, folder / "rle_20000.dcm", pydicom.uid.RLELossless, 20000, 20000, rle_frame)
    _crafted(source, folder / "deflate_60000.dcm", pydicom.uid.DeflatedExplicitVRLittleEndian, 60000, 60000,
             bytes(128))
    _crafted(source, folder / "strip.dcm", None, 1, 65535, bytes(2 * 65535))
    # honest header, 4 MB of deflated zeros behind it: caught while inflating, with a cap of 256x256
    _crafted(source, folder / "deflate_bomb.dcm", pydicom.uid.DeflatedExplicitVRLittleEndian, 64, 64,
             bytes(4 * 2**20))
    return {"rle_20000.dcm": r"image too large: 20000 x 20000 pixels x 1 frame\(s\) x 2 byte\(s\)",
            "deflate_60000.dcm": r"image too large: 60000 x 60000 pixels",
            "strip.dcm": r"image too large: 1 x 65535 pixels x 1 frame\(s\) x 2 byte\(s\) \(padded square 65535\^2\)",
            "deflate_bomb.dcm": r"image too large: the deflated data set inflates to over 1179648 bytes"}


def test_memory_bombs_are_refused_before_allocation(synth_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "stage_2_train_images", images)
    good = sorted(images.glob("*.dcm"))
    expected = _bombs(images, good[0])
    assert max(p.stat().st_size for p in images.glob("*.dcm")) < 200_000  # tiny files, huge claims
    opts = PreprocessOptions(size=64, workers=1, n_folds=2, chunk_size=8, max_pixels=256 * 256, progress=False)
    summary = preprocess(images, tmp_path / "c", None, opts)
    errors = pd.read_csv(tmp_path / "c" / "errors.csv").set_index("path")["reason"]
    assert sorted(errors.index) == sorted(expected)
    for name, pattern in expected.items():
        assert re.match(pattern, errors[name]), (name, errors[name])
    assert summary.n_images == len(good)


def test_fifo_in_the_folder_is_reported_not_opened(synth_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "stage_2_train_images", images)
    os.mkfifo(images / "pipe.dcm")  # opening it for reading would block until a writer comes
    summary = preprocess(images, tmp_path / "c", None, OPTS)
    errors = pd.read_csv(tmp_path / "c" / "errors.csv")
    assert list(errors["path"]) == ["pipe.dcm"]
    assert errors.loc[0, "reason"].startswith("not a regular file (a FIFO, socket or device)")
    assert summary.n_errors == 1


def test_replaced_and_edited_files_are_read_again(synth_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "stage_2_train_images", images)
    files = sorted(images.glob("*.dcm"))
    files[0].write_bytes(b"not yet copied")  # an error row first
    (tmp_path / "keep").write_bytes((synth_dir / "stage_2_train_images" / files[0].name).read_bytes())
    preprocess(images, tmp_path / "c", None, OPTS)
    assert list(pd.read_csv(tmp_path / "c" / "errors.csv")["path"]) == [files[0].name]
    shutil.copy(tmp_path / "keep", files[0])  # the good file arrives: its stale error must go
    ds = pydicom.dcmread(files[9])  # edited in place, same id and size, other pixels
    ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(files[9])
    again = preprocess(images, tmp_path / "c", None, OPTS)
    assert again.n_errors == 0 and again.n_chunks_resumed == again.n_chunks - 2
    store = PixelCache(tmp_path / "c")
    for path in (files[0], files[9]):
        np.testing.assert_array_equal(store.read(path.stem), hu_to_store(read_hu(path), 64))


@pytest.mark.parametrize(("make", "match"), [
    (lambda d: (d / "notes.txt").write_text("mine"), r"holds files that are not an ichdet cache \(no cache.json\), "
                                                     r"e\.g\. \['notes\.txt'\]; preprocess never overwrites"),
    (lambda d: (d / "index.parquet").write_text("mine"), r"holds files that are not an ichdet cache"),
    (lambda d: (d / "cache.json").write_text("{oops"), r"cache.json: not a cache manifest .*not JSON"),
    (lambda d: (d / "cache.json").write_text('{"version": 1, "size": 64}'),
     r"cache.json: not a cache manifest of this ichdet version \(cache format 2\): version"),
])
def test_a_folder_that_is_not_our_cache_is_left_as_it_was(synth_dir: Path, tmp_path: Path,
                                                          make: Callable[[Path], object], match: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(IchdetError, match=match):
        preprocess(synth_dir / "stage_2_train_images", out, None, OPTS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_images_and_out_paths(synth_dir: Path, tmp_path: Path) -> None:
    images = synth_dir / "stage_2_train_images"
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "absent", tmp_path / "c", r"--images .*absent: no such folder"),
             (tmp_path / "file", tmp_path / "c", r"--images .*file: not a folder"),
             (images, tmp_path / "file", r"--out .*file is a file, not a folder")]
    for source, out, match in cases:
        with pytest.raises(IchdetError, match=match):
            preprocess(source, out, None, OPTS)
    assert not (tmp_path / "c").exists()


def _python(code: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def test_a_second_writer_gets_a_clear_error(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    holder = _python(f"import sys, time\nfrom ichdet.io import folder_lock\n"
                     f"with folder_lock({str(out)!r}, 'ichdet preprocess'):\n"
                     f"    print('held', flush=True)\n    sys.stdin.read()\n", stdin=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        run = subprocess.run([sys.executable, "-m", "ichdet", "preprocess", "--images",
                              str(synth_dir / "stage_2_train_images"), "--out", str(out), "--size", "64"],
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")},
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2
        assert re.fullmatch(rf"error: {re.escape(str(out))} is being written by pid {holder.pid} "
                            r"\(ichdet preprocess\); wait for it to finish or choose another output folder\n",
                            run.stderr), run.stderr
        assert sorted(p.name for p in out.iterdir()) == [".ichdet.lock"]  # nothing else was written
    finally:
        holder.communicate("")


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every image id of a cache with its stored pixels."""
    return {image_id: pixels.tobytes() for image_id, pixels in PixelCache(root).iter_rows()}


def _change_folder(images: Path, newcomers: Path) -> None:
    """What happens to an input folder between runs: files removed, one edited in place, files added."""
    files = sorted(images.glob("*.dcm"))
    for path in files[:3]:
        path.unlink()
    ds = pydicom.dcmread(files[10])  # same id, other pixels
    ds.PixelData = (ds.pixel_array + 11).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(files[10])
    for path in sorted(newcomers.glob("*.dcm"))[:3]:
        shutil.copy(path, images)


def _killed_run(images: Path, out: Path, opts: PreprocessOptions, delay: float) -> None:
    """Run preprocess in a forked process group and SIGKILL all of it (workers too) after ``delay`` s."""
    pid = os.fork()
    if pid == 0:  # the child: its own process group, so the kill takes its pool workers with it
        try:
            os.setsid()
            preprocess(images, out, None, opts)
        finally:
            os._exit(0)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    for _ in range(600):  # the kernel releases the killed workers' lock as it tears them down
        try:
            with ichdet.io.folder_lock(out):
                return
        except LockError:
            time.sleep(0.05)
    raise AssertionError(f"{out}: the killed run's lock was never released")


def test_a_rerun_killed_at_random_moments_never_serves_wrong_pixels(synth_dir: Path, tmp_path: Path) -> None:
    """After the input folder changed, a rerun is SIGKILLed at random moments: every time, the cache
    reads exactly as the old one or the new one, or refuses to open; a further rerun repairs it."""
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "stage_2_train_images", images)
    opts = PreprocessOptions(size=32, workers=2, n_folds=2, chunk_size=4, progress=False)
    preprocess(images, tmp_path / "old", None, opts)
    old = _snapshot(tmp_path / "old")
    _change_folder(images, synth_dir / "stage_2_test_images")
    start = time.perf_counter()  # only to spread the kills over a run, never asserted on
    preprocess(images, tmp_path / "new", None, opts)
    duration = time.perf_counter() - start
    new = _snapshot(tmp_path / "new")
    assert old.keys() != new.keys() and len(old.keys() & new.keys()) > 10
    rng = np.random.default_rng(8)
    outcomes = []
    for trial, delay in enumerate(rng.uniform(0.0, 1.5 * duration, size=6)):
        out = shutil.copytree(tmp_path / "old", tmp_path / f"trial{trial}")
        _killed_run(images, out, opts, float(delay))
        try:
            seen = _snapshot(out)
        except IchdetError as err:
            assert "parts disagree" in str(err) or "no index.parquet" in str(err)
            outcomes.append("refused")
        else:
            assert seen in (old, new), f"trial {trial} (kill after {delay:.2f} s) serves mixed pixels"
            outcomes.append("old" if seen == old else "new")
        preprocess(images, out, None, opts)  # the rerun repairs whatever the kill left
        assert _snapshot(out) == new
        manifest = read_manifest(out)
        assert manifest is not None
        assert [p.name for p in (out / "pixels").iterdir()] == [f"gen_{manifest.generation:05d}"]
    assert len(outcomes) == 6
    print("outcomes after each kill:", outcomes)


@pytest.mark.parametrize(("args", "match"), [
    (["--size", "0"], r"size=0: Input should be greater than or equal to 16"),
    (["--size", "-5"], r"size=-5: Input should be greater than or equal to 16"),
    (["--size", "100000"], r"size=100000: Input should be less than or equal to 2048"),
    (["--folds", "1"], r"n_folds=1: Input should be greater than or equal to 2"),
    (["--max-pixels", "0"], r"max_pixels=0: Input should be greater than or equal to 256"),
])
def test_cli_rejects_bad_numbers_before_any_work(synth_dir: Path, tmp_path: Path, args: list[str],
                                                 match: str) -> None:
    from typer.testing import CliRunner

    from ichdet.cli import app

    result = CliRunner().invoke(app, ["preprocess", "--images", str(synth_dir / "stage_2_train_images"),
                                      "--out", str(tmp_path / "c"), *args])
    assert result.exit_code == 2
    assert re.fullmatch(rf"error: preprocess options: {match}\n", result.stderr), result.stderr
    assert not (tmp_path / "c").exists()


def test_read_only_out_is_refused(synth_dir: Path) -> None:
    """Checked as a user who cannot write there (root writes anywhere, so the check runs as nobody)."""
    root = Path(tempfile.mkdtemp())  # not under pytest's tmp folder, which only root can enter
    try:
        root.chmod(0o755)
        images = shutil.copytree(synth_dir / "stage_2_train_images", root / "images")
        (root / "out").mkdir(mode=0o555)
        (root / "out").chmod(0o555)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody where root, try, report the message, exit without cleanup
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                preprocess(images, root / "out", None, OPTS)
                os.write(write, b"no error")
            except IchdetError as err:
                os.write(write, str(err).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            message = fh.read().decode()
        os.waitpid(pid, 0)
        assert message == f"--out {root / 'out'}: permission denied, the folder is not writable; choose another"
        assert list((root / "out").iterdir()) == []
    finally:
        shutil.rmtree(root)
