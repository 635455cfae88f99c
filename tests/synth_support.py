"""Synthetic caches for tests: one helper instead of a make_dataset + preprocess pair in every module."""

from __future__ import annotations

from pathlib import Path

from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.synth import SynthSpec, make_dataset


def synth_cache(root: Path, *, studies: int, size: int, slices: tuple[int, int], seed: int, folds: int = 2,
                test_studies: int = 0, labelled: bool = True, data: str = "data", **options: int) -> Path:
    """Synthetic studies in ``root/<data>`` (Kaggle layout) preprocessed into ``root/cache``; returns the cache.

    ``labelled=False`` preprocesses without the label CSV; ``options`` go to :class:`PreprocessOptions`
    (e.g. ``chunk_size``). One worker, no progress bar: a test's cache is built the same way every time.
    """
    make_dataset(root / data, SynthSpec(n_studies=studies, n_test_studies=test_studies, size=size,
                                        slices_per_study=slices, seed=seed))
    labels = root / data / "stage_2_train.csv" if labelled else None
    preprocess(root / data / "stage_2_train_images", root / "cache", labels,
               PreprocessOptions(size=size, workers=1, n_folds=folds, progress=False, **options))
    return root / "cache"
