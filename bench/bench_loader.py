"""Sample loading throughput (samples/s per core): windowed, augmented slices read from the pixel cache.

What is measured: a cache of size 256 is built (untimed) from the real RSNA sample (stage_2_train_images +
stage_2_test_images, 296 slices; ``--images DIR`` to use other folders, ``--synthetic-studies N`` to add a
synthetic 256 px set), then ``ichdet.models.inputs.SliceDataset(cache, rows, DataConfig(image_size=256, ...),
augment=...)[i]`` is called for every row, in ONE process with ``torch.set_num_threads(1)`` and
``cv2.setNumThreads(1)``, so the rate is per core (a DataLoader with W workers scales it by at most W).
Each call is the full path a training step pays per sample: the int16 read from the memory-mapped
shard, the windows (lookup table), augmentation (albumentations: flip, affine, brightness/contrast,
random resized crop) and the uint8 CHW tensor.

Variants, timed in interleaved rounds with the order rotated (``--repeats``, median reported):

``2d_augment``     the seed's input: 3 windows, slice offset 0, augmentation on (the target: >= 400/s)
``2d_plain``       the same without augmentation (validation / prediction)
``25d_augment``    2.5D: slice offsets [-1, 0, 1] x 3 windows = 9 channels, augmentation on
``25d_plain``      the same without augmentation

The shard files are read once before timing (OS page cache warm), and one untimed pass over the rows
precedes the rounds (memory maps open, lookup tables built). The exit status is 0 whatever the
verdict: this is a measurement, not a test.

Usage::

    .venv/bin/python bench/bench_loader.py [--repeats 5] [--json out.json] [--images DIR ...]
        [--synthetic-studies N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import cv2
import numpy as np
import torch
from common import (
    RSNA_SAMPLE,
    Variant,
    add_common_args,
    add_input_args,
    format_machine,
    input_folder,
    machine_info,
    rate_table,
    run_interleaved,
    save_json,
    verdict,
    warm_files,
)

from ichdet.cache.store import PixelCache
from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.models.config import DataConfig
from ichdet.models.inputs import SliceDataset
from ichdet.train.augment import AugmentedSlices

SIZE = 256
TARGET = 400.0  # samples/s per core, 2d_augment
VARIANTS: dict[str, tuple[list[int], bool]] = {  # name -> (slice offsets, augment)
    "2d_augment": ([0], True),
    "2d_plain": ([0], False),
    "25d_augment": ([-1, 0, 1], True),
    "25d_plain": ([-1, 0, 1], False),
}


def build_cache(args: argparse.Namespace, tmp: Path) -> PixelCache:
    """Preprocess the input folder(s) at SIZE into ``tmp/cache`` (untimed)."""
    root = input_folder(tmp, args.images or [RSNA_SAMPLE], synthetic_studies=args.synthetic_studies, size=SIZE)
    summary = preprocess(root, tmp / "cache", None, PreprocessOptions(size=SIZE, workers=None, progress=False))
    print(f"cache: {summary.n_images} images at {SIZE} px from {root} ({summary.seconds:.1f} s, untimed)")
    return PixelCache(tmp / "cache")


def dataset(cache: PixelCache, offsets: list[int], augment: bool) -> SliceDataset:
    """A SliceDataset over every row of ``cache``."""
    cfg = DataConfig(image_size=SIZE, slice_offsets=offsets)
    rows = np.arange(len(cache))
    return AugmentedSlices(cache, rows, cfg, seed=0) if augment else SliceDataset(cache, rows, cfg)


def read_all(ds: SliceDataset) -> Callable[[], int]:
    """One pass of ``ds[i]`` over every row, checking the sample's shape on the way."""
    channels = len(ds.windows) * len(ds.offsets)

    def run() -> int:
        for i in range(len(ds)):
            image, _, _ = ds[i]
            if image.shape != (channels, SIZE, SIZE) or image.dtype != torch.uint8:
                raise SystemExit(f"unexpected sample {tuple(image.shape)} {image.dtype}")
        return len(ds)

    return run


def profile(ds: SliceDataset, top: int = 25) -> str:
    """cProfile of one pass (cumulative time), for finding what to speed up."""
    prof = cProfile.Profile()
    prof.runcall(read_all(ds))
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Build the cache, time the variants interleaved, print, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_input_args(parser, SIZE)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one 2d_augment pass")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\..*")  # ID_… UIDs, expected
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    machine = machine_info()
    machine["torch_threads"], machine["cv2_threads"] = torch.get_num_threads(), cv2.getNumThreads()
    print(format_machine(machine))
    print(f"one process, torch threads {torch.get_num_threads()}, cv2 threads {cv2.getNumThreads()}")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp_name:
        cache = build_cache(args, Path(tmp_name))
        nbytes = warm_files(sorted((cache.root / "pixels").glob("*.npy")))
        datasets = {name: dataset(cache, offsets, augment) for name, (offsets, augment) in VARIANTS.items()}
        for ds in datasets.values():
            read_all(ds)()  # untimed: memory maps opened, lookup tables built
        print(f"shards: {nbytes / 1e6:.0f} MB in the OS page cache; {args.repeats} rounds, interleaved\n")
        variants = [Variant(name, read_all(ds), None, "samples") for name, ds in datasets.items()]
        results = run_interleaved(variants, args.repeats)
        profile_text = profile(datasets["2d_augment"]) if args.profile else None
    rate = results["2d_augment"]["median_rate"]
    passed = rate >= TARGET
    print()
    print(rate_table(results, "ms/sample", lambda r: f"{1e3 / r['median_rate']:.2f}"))
    print(f"\n2d_augment {rate:.0f} samples/s per core, target >= {TARGET:.0f}: {verdict(passed)}")
    if profile_text:
        print("\ncProfile of one 2d_augment pass:\n" + profile_text)
    save_json(args.json, {
        "benchmark": "loader", "machine": machine,
        "setup": {"images": len(cache), "size": SIZE, "repeats": args.repeats, "processes": 1},
        "results": results, "target": {"variant": "2d_augment", "samples_per_s": TARGET, "pass": passed}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
