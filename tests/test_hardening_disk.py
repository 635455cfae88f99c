"""A full disk: every command that writes fails with one line naming the file and the reason, leaves no
partial file under a final name and every earlier output as it was; preprocess resumes once there is room.

Without root tricks, a full disk is simulated with the file size limit: each command runs as a child
process with ``RLIMIT_FSIZE`` below the size of the file it fails on (and SIGXFSZ ignored, as Python
does anyway), so that write fails with EFBIG ("file too large") as a full file system fails with ENOSPC.
Where this machine lets root mount a tmpfs, the same is also checked on a really full file system.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from synth_support import synth_cache

from ichdet.cache.store import PixelCache
from ichdet.io import is_temp_name

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["model.backbone=resnet18", "data.image_size=64", "train.batch_size=16", "train.num_workers=0",
        "train.device=cpu", "train.amp=off", "train.channels_last=false", "train.epochs=1",
        "train.limit_train_batches=2", "train.warmup_epochs=0.2"]
NO_ROOM = ("file too large; raise the file size limit (ulimit -f) or write elsewhere and run the command "
           "again (files written before are as they were)")


def ichdet(*args: str, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m ichdet ARGS`` in a child whose files cannot grow past ``limit`` bytes (None: no limit)."""
    def no_room() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # type: ignore[arg-type]

    return subprocess.run([sys.executable, "-m", "ichdet", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, check=False, preexec_fn=None if limit is None else no_room)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (lock files aside: a run holds one) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".ichdet.lock"}


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if is_temp_name(p.name)]


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The command's only line on stderr, which must be an error (no traceback, no second line)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


@dataclass(frozen=True)
class World:
    """A tiny synthetic data set and everything made from it, each command's output made once."""

    data: Path
    cache: Path
    run: Path
    preds: Path
    submission: Path
    bundle: Path
    result: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("disk")
    synth_cache(root, studies=4, test_studies=1, size=64, slices=(10, 12), seed=2)
    w = World(root / "data", root / "cache", root / "run", root / "preds.parquet", root / "sub.csv",
              root / "model.ichdet", root / "result.json")
    steps: list[list[str]] = [
        ["train", "--data", str(w.cache), "--out", str(w.run), "--fold", "0", *[f"--set={s}" for s in TINY]],
        ["predict", "--data", str(w.cache), "--run", str(w.run), "--out", str(w.preds), "--device", "cpu", "--no-tta"],
        ["ensemble", str(w.preds), "--out", str(w.submission)],
        ["bundle", "--run", str(w.run), "--out", str(w.bundle)],
        ["predict-study", str(w.data / "stage_2_test_images"), "--bundle", str(w.bundle), "--out", str(w.result),
         "--device", "cpu", "--no-tta"],
    ]
    for args in steps:
        done = ichdet(*args)
        assert done.returncode == 0, done.stderr[-3000:]
    return w


# command -> (its arguments, given the world and its output, the output's name, a file size limit
# below that output's size)
COMMANDS: dict[str, tuple[Callable[[World, Path], list[str]], Callable[[World], Path], int]] = {
    "predict": (lambda w, out: ["--data", str(w.cache), "--run", str(w.run), "--out", str(out), "--device", "cpu",
                                "--no-tta"], lambda w: w.preds, 2048),
    "ensemble": (lambda w, out: [str(w.preds), "--out", str(out)], lambda w: w.submission, 1024),
    "bundle": (lambda w, out: ["--run", str(w.run), "--out", str(out)], lambda w: w.bundle, 1 << 20),
    "predict-study": (lambda w, out: [str(w.data / "stage_2_test_images"), "--bundle", str(w.bundle), "--out",
                                      str(out), "--device", "cpu", "--no-tta"], lambda w: w.result, 1024),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_output_that_does_not_fit_keeps_the_earlier_one(world: World, tmp_path: Path, command: str) -> None:
    args, made, limit = COMMANDS[command]
    out = tmp_path / made(world).name
    shutil.copyfile(made(world), out)  # an earlier output of the command, which a rerun would replace
    earlier = out.read_bytes()
    assert len(earlier) > limit
    done = ichdet(command, *args(world, out), limit=limit)
    assert done.returncode == 1
    assert one_error_line(done) == f"error: could not write {out}: {NO_ROOM}"
    assert out.read_bytes() == earlier and temp_files(tmp_path) == []


def test_train_that_does_not_fit_keeps_the_other_folds(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    before = snapshot(run)
    done = ichdet("train", "--data", str(world.cache), "--out", str(run), "--fold", "1",
                  *[f"--set={s}" for s in TINY], limit=1 << 20)  # a resnet18 is 45 MB
    assert done.returncode == 1
    assert one_error_line(done) == f"error: could not write {run / 'fold1' / 'best.safetensors'}: {NO_ROOM}"
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("fold1/")} == before  # fold 0 and config as they were
    assert not {"fold1/best.safetensors", "fold1/checkpoints/last.pt", "fold1/oof.parquet"} & after.keys()
    assert temp_files(run) == []


def _pixels(cache: Path) -> dict[str, np.ndarray]:
    return {image_id: pixels.copy() for image_id, pixels in PixelCache(cache).iter_rows()}


def test_preprocess_that_does_not_fit_keeps_the_cache_and_resumes(world: World, tmp_path: Path) -> None:
    files = sorted((world.data / "stage_2_train_images").iterdir())
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    for f in files[:32]:  # two chunks of 16 files
        shutil.copyfile(f, images / f.name)
    done = ichdet("preprocess", "--images", str(images), "--out", str(cache), "--size", "64", "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    before, pixels = snapshot(cache), _pixels(cache)
    for f in files[32:]:  # new files sort after the old ones: the first two chunks stay as they were
        shutil.copyfile(f, images / f.name)
    # a shard of 16 images of 64 x 64 int16 is 128 KiB: the first new one does not fit
    done = ichdet("preprocess", "--images", str(images), "--out", str(cache), "--size", "64", "--workers", "1",
                  limit=64 << 10)
    assert done.returncode == 1
    shard = cache / "pixels" / "gen_00002" / "shard_00002.npy"
    assert one_error_line(done) == f"error: could not write {shard}: {NO_ROOM}"
    assert {k: v for k, v in snapshot(cache).items() if not k.startswith("pixels/gen_00002/")} == before
    assert temp_files(cache) == []
    after = _pixels(cache)  # the old cache opens and serves the same pixels
    assert after.keys() == pixels.keys() and all(np.array_equal(after[k], pixels[k]) for k in pixels)

    done = ichdet("preprocess", "--images", str(images), "--out", str(cache), "--size", "64", "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"chunks: {-(-len(files) // 16)} (2 reused from an earlier run)" in done.stdout
    resumed = _pixels(cache)
    assert len(resumed) == len(files) and all(np.array_equal(resumed[k], pixels[k]) for k in pixels)


# ------------------------------------------------------------------ a really full file system (tmpfs)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``tmp_path/disk`` (root with CAP_SYS_ADMIN only; skipped with the reason elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    tried = subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                           text=True, check=False) if mount and os.geteuid() == 0 else None
    if tried is None or tried.returncode != 0:
        reason = "not root" if tried is None else tried.stderr.strip()
        pytest.skip(f"cannot mount a tmpfs here to fill a real file system ({reason}); the file size limit "
                    "cases above cover the same code")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)


NO_SPACE = ("no space left on device; free space on that file system and run the command again (files written "
            "before are as they were)")


@pytest.mark.parametrize("command", ["ensemble", "predict-study"])
def test_full_file_system_keeps_the_earlier_output(world: World, small_disk: Path, command: str) -> None:
    args, made, _ = COMMANDS[command]
    out = small_disk / made(world).name
    shutil.copyfile(made(world), out)
    earlier = out.read_bytes()
    fill(small_disk)
    done = ichdet(command, *args(world, out))
    assert done.returncode == 1
    assert one_error_line(done) == f"error: could not write {out}: {NO_SPACE}"
    assert out.read_bytes() == earlier and temp_files(small_disk) == []


def test_preprocess_on_a_full_file_system_resumes_once_there_is_room(world: World, small_disk: Path) -> None:
    files = sorted((world.data / "stage_2_train_images").iterdir())
    cache = small_disk / "cache"
    subprocess.run(["mount", "-o", "remount,size=200k", str(small_disk)], check=True)  # one shard of 128 KiB fits
    args = ["preprocess", "--images", str(world.data / "stage_2_train_images"), "--out", str(cache), "--size", "64",
            "--workers", "1"]
    done = ichdet(*args)
    assert done.returncode == 1
    assert one_error_line(done) == f"error: could not write {cache / 'pixels' / 'gen_00001' / 'shard_00001.npy'}: " \
                                   f"{NO_SPACE}"
    assert temp_files(cache) == [] and not (cache / "cache.json").exists()
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # room again
    done = ichdet(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"chunks: {-(-len(files) // 16)} (1 reused from an earlier run)" in done.stdout
    assert _pixels(cache).keys() == _pixels(world.cache).keys()
