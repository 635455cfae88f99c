"""Shared by test_study.py and test_bundle.py: two tiny trained runs, made once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.models.config import build_config
from ichdet.synth import SynthSpec, make_dataset
from ichdet.train.loop import train

TINY = ["model.backbone=resnet18", "data.image_size=64", "train.batch_size=16", "train.num_workers=0",
        "train.device=cpu", "train.amp=off", "train.channels_last=false", "train.epochs=1",
        "train.limit_train_batches=2", "train.warmup_epochs=0.2"]


def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Runs ``a`` (64 px) and ``b`` (48 px, 2.5D), 2 folds each, and the label CSV of their cache.

    Built under the session's base temp folder once; later calls (from any test module) reuse them.
    """
    root = tmp_path_factory.getbasetemp() / "study_tiny_runs"
    a, b, labels = root / "runs" / "a", root / "runs" / "b", root / "data" / "stage_2_train.csv"
    if (root / "done").exists():
        return a, b, labels
    shutil.rmtree(root, ignore_errors=True)
    make_dataset(root / "data", SynthSpec(n_studies=6, n_test_studies=1, size=64, slices_per_study=(8, 10), seed=3))
    preprocess(root / "data" / "stage_2_train_images", root / "cache", labels,
               PreprocessOptions(size=64, workers=1, n_folds=2, progress=False))
    train(build_config({}, TINY), root / "cache", a, fold="all", progress=False)
    train(build_config({}, [*TINY, "data.image_size=48", "data.slice_offsets=[-1,0,1]", "data.windows=[brain]"]),
          root / "cache", b, fold="all", progress=False)
    (root / "done").touch()
    return a, b, labels


def copy_study(src_files: list[Path], dest: Path, nested: bool = True) -> list[Path]:
    """Copy DICOM files into ``dest`` under opaque names (nested two folders deep when ``nested``)."""
    out = []
    for i, f in enumerate(src_files):
        target = dest / f"d{i % 3}" / f"x{i % 2}" / f"IM{i:05d}" if nested else dest / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        out.append(target)
    return out


def study_files(folder: Path, study_uid: str) -> list[Path]:
    """The files of one study in a flat folder of DICOMs."""
    return sorted(p for p in folder.iterdir()
                  if str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) == study_uid)
