from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from synth_support import synth_cache

from ichdet.cache.store import PixelCache
from ichdet.dicom.windowing import PRESETS, apply_windows
from ichdet.models.config import DataConfig, build_config
from ichdet.models.inputs import SliceDataset
from ichdet.train.augment import AugmentedSlices, build_augment

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> PixelCache:
    root = tmp_path_factory.mktemp("data")
    return PixelCache(synth_cache(root, studies=3, size=64, slices=(8, 8), seed=2, folds=3, data="synth"))


def _cfg(*overrides: str) -> DataConfig:
    return build_config({}, ["data.image_size=64", *overrides]).data


def test_channels_are_the_windows_of_the_stored_hu(cache: PixelCache) -> None:
    ds = SliceDataset(cache, np.arange(len(cache)), _cfg())
    image, target, row = ds[5]
    assert image.dtype.is_floating_point is False and tuple(image.shape) == (3, 64, 64)
    expected = apply_windows(cache.read_row(5), [PRESETS["brain"], PRESETS["subdural"], PRESETS["soft_tissue"]])
    np.testing.assert_array_equal(image.numpy(), expected.transpose(2, 0, 1))
    np.testing.assert_array_equal(target.numpy(), cache.index.iloc[5][["epidural", "intraparenchymal",
                                  "intraventricular", "subarachnoid", "subdural", "any"]].to_numpy(np.float32))
    assert row == 5


@pytest.mark.parametrize(("windows", "offsets", "channels"), [
    (["brain"], [0], 1), (["brain", "bone"], [0], 2), (["brain", "subdural", "soft_tissue"], [-1, 0, 1], 9),
])
def test_channel_count(cache: PixelCache, windows: list[str], offsets: list[int], channels: int) -> None:
    cfg = _cfg(f"data.windows=[{', '.join(windows)}]", f"data.slice_offsets={offsets}")
    assert cfg.in_chans == channels
    assert SliceDataset(cache, [0], cfg)[0][0].shape[0] == channels


def test_slice_context_uses_the_neighbours(cache: PixelCache) -> None:
    index = cache.index
    ds = SliceDataset(cache, np.arange(len(cache)), _cfg("data.windows=[brain]", "data.slice_offsets=[-1, 0, 1]"))
    middle = int(np.flatnonzero((index["slice_index"] == 3).to_numpy())[0])
    first = int(np.flatnonzero((index["slice_index"] == 0).to_numpy())[0])
    prev_row = cache.row_of(index.loc[middle, "prev_id"])
    next_row = cache.row_of(index.loc[middle, "next_id"])
    image = ds[middle][0].numpy()
    for channel, row in enumerate([prev_row, middle, next_row]):
        np.testing.assert_array_equal(image[channel], apply_windows(cache.read_row(row), [PRESETS["brain"]])[..., 0])
    edge = ds[first][0].numpy()
    np.testing.assert_array_equal(edge[0], edge[1])  # no slice before the first: it repeats itself


def test_resize_to_model_size(cache: PixelCache) -> None:
    assert tuple(SliceDataset(cache, [0], _cfg("data.image_size=32"))[0][0].shape) == (3, 32, 32)


def test_augmentation_is_seeded_per_epoch_and_sample(cache: PixelCache) -> None:
    cfg = _cfg("data.augment.shift_scale_rotate=1.0")  # a random affine on every draw
    a = AugmentedSlices(cache, np.arange(len(cache)), cfg, seed=0)
    b = AugmentedSlices(cache, np.arange(len(cache)), cfg, seed=0)
    plain = SliceDataset(cache, np.arange(len(cache)), cfg)
    assert np.array_equal(a[3][0].numpy(), b[3][0].numpy())
    first = a[3][0].numpy()
    a.set_epoch(1)
    assert not np.array_equal(first, a[3][0].numpy())  # a new epoch draws new augmentations
    assert not np.array_equal(first, plain[3][0].numpy())


def test_flip_only_augmentation_is_a_mirror(cache: PixelCache) -> None:
    cfg = _cfg("data.augment.hflip=1.0", "data.augment.shift_scale_rotate=0", "data.augment.brightness_contrast=0",
               "data.augment.random_crop=0")
    flipped = AugmentedSlices(cache, [4], cfg)[0][0].numpy()
    plain = SliceDataset(cache, [4], cfg)[0][0].numpy()
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_demo_config_builds_a_dataset(cache: PixelCache) -> None:
    cfg = build_config({}, []).data
    assert AugmentedSlices(cache, [0, 1], cfg)[1][0].shape[1:] == (cfg.image_size, cfg.image_size)


SEED3 = [PRESETS["brain"], PRESETS["subdural"], PRESETS["soft_tissue"]]


def _first_and_middle(cache: PixelCache) -> tuple[int, int]:
    index = cache.index
    first = int(np.flatnonzero((index["slice_index"] == 0).to_numpy())[0])
    middle = int(np.flatnonzero((index["slice_index"] == 3).to_numpy())[0])
    return first, middle


def test_25d_channels_are_every_window_of_every_slice(cache: PixelCache) -> None:
    _, middle = _first_and_middle(cache)
    ds = SliceDataset(cache, np.arange(len(cache)), _cfg("data.slice_offsets=[-1, 0, 1]"))
    image = ds[middle][0].numpy()
    assert image.shape == (9, 64, 64)
    rows = [cache.row_of(cache.index.loc[middle, "prev_id"]), middle, cache.row_of(cache.index.loc[middle, "next_id"])]
    for i, row in enumerate(rows):  # channel i * 3 + j: window j of slice i
        expected = apply_windows(cache.read_row(row), SEED3).transpose(2, 0, 1)
        np.testing.assert_array_equal(image[3 * i:3 * i + 3], expected)
    np.testing.assert_array_equal(ds.image(middle), image.transpose(1, 2, 0))


@pytest.mark.parametrize("size", [32, 48, 100])  # halve, a non-integer shrink, enlarge
@pytest.mark.parametrize("offsets", ["[0]", "[-1, 0, 1]"])
def test_resized_channels_are_the_resized_windows(cache: PixelCache, size: int, offsets: str) -> None:
    _, middle = _first_and_middle(cache)
    ds = SliceDataset(cache, [middle], _cfg(f"data.image_size={size}", f"data.slice_offsets={offsets}"))
    image = ds[0][0].numpy()
    interp = cv2.INTER_AREA if size < 64 else cv2.INTER_LINEAR
    centre = image[3:6] if offsets != "[0]" else image
    assert image.shape == (3 * len(ds.offsets), size, size)
    for j, window in enumerate(SEED3):
        plane = apply_windows(cache.read_row(middle), [window])[..., 0]
        np.testing.assert_array_equal(centre[j], cv2.resize(plane, (size, size), interpolation=interp))


AUGMENTS = {
    "flip": ["data.augment.hflip=1.0", "data.augment.shift_scale_rotate=0", "data.augment.brightness_contrast=0",
             "data.augment.random_crop=0"],
    "affine": ["data.augment.hflip=0", "data.augment.shift_scale_rotate=1.0", "data.augment.brightness_contrast=0",
               "data.augment.random_crop=0"],
    "everything": ["data.augment.hflip=1.0", "data.augment.shift_scale_rotate=1.0",
                   "data.augment.brightness_contrast=1.0", "data.augment.random_crop=1.0"],
}


@pytest.mark.parametrize("augment", list(AUGMENTS))
def test_25d_augmentation_is_one_transform_for_every_channel(cache: PixelCache, augment: str) -> None:
    first, _ = _first_and_middle(cache)
    # At the first slice of a series, offsets -2 and -1 repeat the slice: three copies of one image.
    ds = AugmentedSlices(cache, [first], _cfg(*AUGMENTS[augment], "data.slice_offsets=[-2, -1, 0]"))
    plain = SliceDataset(cache, [first], _cfg("data.slice_offsets=[-2, -1, 0]"))[0][0].numpy()
    np.testing.assert_array_equal(plain[0:3], plain[6:9])
    for epoch in range(4):
        ds.set_epoch(epoch)
        image = ds[0][0].numpy()
        assert not np.array_equal(image, plain)  # it was transformed ...
        np.testing.assert_array_equal(image[0:3], image[3:6])  # ... and every slice the same way
        np.testing.assert_array_equal(image[0:3], image[6:9])
    if augment == "flip":
        np.testing.assert_array_equal(image, plain[:, :, ::-1])


@pytest.mark.parametrize("augment", list(AUGMENTS))
def test_25d_augmentation_matches_the_2d_one(cache: PixelCache, augment: str) -> None:
    _, middle = _first_and_middle(cache)
    rows = np.arange(len(cache))
    two = AugmentedSlices(cache, rows, _cfg(*AUGMENTS[augment]), seed=7)
    three = AugmentedSlices(cache, rows, _cfg(*AUGMENTS[augment], "data.slice_offsets=[-1, 0, 1]"), seed=7)
    for epoch in range(3):
        two.set_epoch(epoch)
        three.set_epoch(epoch)
        # the same seed draws the same transform; the centre slice's channels are the 2D sample
        np.testing.assert_array_equal(three[middle][0].numpy()[3:6], two[middle][0].numpy())


def test_five_windows_resize_one_channel_at_a_time(cache: PixelCache) -> None:
    windows = ["brain", "subdural", "soft_tissue", "bone", "stroke"]  # more channels than OpenCV resizes at once
    ds = SliceDataset(cache, [2], _cfg("data.image_size=48", f"data.windows=[{', '.join(windows)}]",
                                       "data.slice_offsets=[-1, 0, 1]"))
    image = ds[0][0].numpy()
    assert image.shape == (15, 48, 48)
    for j, name in enumerate(windows):
        plane = apply_windows(cache.read_row(2), [PRESETS[name]])[..., 0]
        np.testing.assert_array_equal(image[5 + j], cv2.resize(plane, (48, 48), interpolation=cv2.INTER_AREA))


def test_worker_processes_deliver_after_the_parent_used_opencv(cache: PixelCache) -> None:
    """Regression: configuring OpenCV inside forked workers deadlocked once the parent had used its threads."""
    import threading

    import cv2
    import torch

    from ichdet.models.engine import make_loader

    cv2.resize(np.ones((2048, 2048), np.float32), (1000, 1000), interpolation=cv2.INTER_AREA)  # start the pool
    loader = make_loader(SliceDataset(cache, np.arange(len(cache)), _cfg()), 8, 2, torch.device("cpu"))
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.extend(len(b[2]) for b in loader), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the data loader's workers hung"
    assert sum(seen) == len(cache)


def test_augmentations_fire_independently(cache: PixelCache) -> None:
    """Flip and crop at p=0.5 each: every combination occurs (one seed per transform made them fire together)."""
    cfg = _cfg("data.augment.hflip=0.5", "data.augment.shift_scale_rotate=0", "data.augment.brightness_contrast=0",
               "data.augment.random_crop=0.5")
    rows = np.arange(len(cache))
    ds, plain = AugmentedSlices(cache, rows, cfg), SliceDataset(cache, rows, cfg)
    seen = {"unchanged": 0, "flipped only": 0, "cropped": 0}
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(rows)):
            image, original = ds[i][0].numpy(), plain[i][0].numpy()
            if np.array_equal(image, original):
                seen["unchanged"] += 1
            elif np.array_equal(image, original[:, :, ::-1]):
                seen["flipped only"] += 1
            else:
                seen["cropped"] += 1
    n = 2 * len(rows)
    assert all(0.1 * n < count for count in seen.values()), seen  # expected: 1/4, 1/4 and 1/2 of n


@pytest.mark.parametrize("n_windows", [5, 6])
def test_more_than_four_windows_resize_at_a_non_integer_ratio(cache: PixelCache, n_windows: int) -> None:
    names = ["brain", "subdural", "soft_tissue", "bone", "stroke", "narrow_bone"][:n_windows]
    ds = SliceDataset(cache, [3], _cfg("data.image_size=48", f"data.windows=[{', '.join(names)}]"))
    image = ds[0][0].numpy()
    assert image.shape == (n_windows, 48, 48)
    for j, name in enumerate(names):
        plane = apply_windows(cache.read_row(3), [PRESETS[name]])[..., 0]
        np.testing.assert_array_equal(image[j], cv2.resize(plane, (48, 48), interpolation=cv2.INTER_AREA))


def test_offsets_two_slices_away_follow_the_neighbour_chain(cache: PixelCache) -> None:
    _, middle = _first_and_middle(cache)
    index = cache.index

    def walk(row: int, column: str, steps: int) -> int:
        for _ in range(steps):
            row = cache.row_of(index.loc[row, column])
        return row

    ds = SliceDataset(cache, [middle], _cfg("data.windows=[brain]", "data.slice_offsets=[-2, 0, 2]"))
    image = ds[0][0].numpy()
    for channel, row in enumerate([walk(middle, "prev_id", 2), middle, walk(middle, "next_id", 2)]):
        np.testing.assert_array_equal(image[channel], apply_windows(cache.read_row(row), [PRESETS["brain"]])[..., 0])
    assert len({walk(middle, "prev_id", 2), middle, walk(middle, "next_id", 2)}) == 3  # three distinct slices


@pytest.mark.parametrize(("augment", "persistent"), [(True, False), (False, True)])
def test_only_augmenting_loaders_restart_their_workers(cache: PixelCache, augment: bool, persistent: bool) -> None:
    """Augmentation is seeded by the epoch, which reaches workers only when they restart each epoch."""
    import torch

    from ichdet.models.engine import make_loader

    ds = (AugmentedSlices if augment else SliceDataset)(cache, [0, 1], _cfg())
    loader = make_loader(ds, 2, 1, torch.device("cpu"))
    assert loader.persistent_workers is persistent


SHIPPED_2D = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("seq_"))


@pytest.mark.parametrize("config", SHIPPED_2D)
def test_shipped_augmentation_never_changes_intensity(config: str) -> None:
    """A pixel is a Hounsfield unit through a fixed window: no shipped config brightens or dims it (issue 20).

    A uniform image through the config's augmentation, 200 draws: flips, affines and crops may bring in the
    zero border and blend it at edges, but no pixel ends up brighter than the image, and the centre keeps
    its value exactly.
    """
    data = build_config(yaml.safe_load((CONFIGS / config).read_text())).data
    augment = build_augment(data.augment, 64)
    image = np.full((64, 64, 3), 140, np.uint8)
    for seed in range(200):
        augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = augment(image=image)["image"]
        assert out.max() == 140 and (out[28:36, 28:36] == 140).all(), (config, seed)


def test_brightness_contrast_when_asked_changes_intensity() -> None:
    """The check above can fail: with brightness/contrast switched on, a uniform image changes value."""
    augment = build_augment(_cfg("data.augment.brightness_contrast=1.0").augment, 64)
    image = np.full((64, 64, 3), 140, np.uint8)
    changed = 0
    for seed in range(20):
        augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
        changed += int(augment(image=image)["image"][32, 32, 0] != 140)
    assert changed >= 15
