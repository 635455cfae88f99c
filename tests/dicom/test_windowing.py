"""Windowing: exact hand-computed values, channel order, the integer LUT path, config parsing, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ichdet.dicom.windowing import (
    PRESETS,
    SEED_WINDOWS,
    Window,
    apply_windows,
    get_window,
    resize_square,
    resolve_windows,
    window_range,
)
from ichdet.errors import ConfigError

BRAIN, SUBDURAL, SOFT = PRESETS["brain"], PRESETS["subdural"], PRESETS["soft_tissue"]

# value = rint(clip((hu - low) / width, 0, 1) * 255), rint = round half to even.
# brain 40/80 (low 0): 8 -> 25.5 -> 26, 24 -> 76.5 -> 76 (half to even, not 77), 40 -> 127.5 -> 128,
#   56 -> 178.5 -> 178.
# subdural 80/200 (low -20): 0 -> 25.5 -> 26, 30 -> 63.75 -> 64, 40 -> 76.5 -> 76, 80 -> 127.5 -> 128.
# soft tissue 40/380 (low -150): -112 -> 25.5 -> 26, -100 -> 33.55 -> 34, -36 -> 76.5 -> 76,
#   0 -> 100.66 -> 101, 40 -> 127.5 -> 128, 100 -> 167.76 -> 168.
# stroke 32/8 (low 28): 29 -> 31.875 -> 32, 30 -> 63.75 -> 64, 35 -> 223.125 -> 223.
CASES = [
    ("brain", [-1000, 0, 40, 80, 3000], [0, 0, 128, 255, 255]),
    ("brain", [-1, 8, 24, 56, 79, 81], [0, 26, 76, 178, 252, 255]),
    ("subdural", [-1000, -20, 0, 30, 40, 80, 180, 1000], [0, 0, 26, 64, 76, 128, 255, 255]),
    ("soft_tissue", [-1000, -150, -112, -100, -36, 0, 40, 100, 230, 3000],
     [0, 0, 26, 34, 76, 101, 128, 168, 255, 255]),
    ("stroke", [27, 28, 29, 30, 32, 35, 36, 100], [0, 0, 32, 64, 128, 223, 255, 255]),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int32])
@pytest.mark.parametrize(("name", "hu", "expected"), CASES)
def test_window_values_are_exact(name: str, hu: list[int], expected: list[int], dtype: type) -> None:
    out = apply_windows(np.array([hu], dtype=dtype), [get_window(name)])
    assert out.dtype == np.uint8
    assert out.shape == (1, len(hu), 1)
    assert out[0, :, 0].tolist() == expected


def test_non_integer_hu_is_windowed_in_float() -> None:
    # brain: 40.4 -> 128.775 -> 129, 39.6 -> 126.225 -> 126, 0.1 -> 0.31875 -> 0
    out = apply_windows(np.array([[40.4, 39.6, 0.1]], dtype=np.float32), [BRAIN])
    assert out[0, :, 0].tolist() == [129, 126, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_channel_order_is_window_order(dtype: type) -> None:
    hu: np.ndarray = np.array([[0, 40]], dtype=dtype)
    # brain: [0, 128]; subdural: [26, 76]; soft tissue: 0 -> 101, 40 -> 128
    seed = apply_windows(hu)
    assert seed[0].tolist() == [[0, 26, 101], [128, 76, 128]]
    reverse = apply_windows(hu, (SOFT, SUBDURAL, BRAIN))
    assert reverse.tolist() == seed[..., ::-1].tolist()


@pytest.mark.parametrize("n_windows", [1, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_shape_dtype_and_layout(n_windows: int, dtype: type) -> None:
    windows = list(PRESETS.values())[:n_windows]
    out = apply_windows(np.zeros((7, 5), dtype=dtype), windows)
    assert out.shape == (7, 5, n_windows)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_default_windows_are_the_seed_windows() -> None:
    assert [(w.name, w.center, w.width) for w in SEED_WINDOWS] == [
        ("brain", 40, 80), ("subdural", 80, 200), ("soft_tissue", 40, 380)]
    hu = np.arange(-200, 300, dtype=np.int16).reshape(20, 25)
    assert np.array_equal(apply_windows(hu), apply_windows(hu, SEED_WINDOWS))


def test_input_is_not_modified() -> None:
    hu = np.array([[-1000.0, 40.0, 3000.0]], dtype=np.float32)
    before = hu.copy()
    apply_windows(hu)
    assert np.array_equal(hu, before)


@pytest.mark.parametrize("name", list(PRESETS))
def test_lut_path_equals_float_path_exhaustively(name: str) -> None:
    window = PRESETS[name]
    every = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16).reshape(256, 256)
    lut = apply_windows(every, [window])
    float_path = apply_windows(every.astype(np.float32), [window])
    assert np.array_equal(lut, float_path)
    # the range the brief names, -2048..4095, once more on its own
    cache_range = np.arange(-2048, 4096, dtype=np.int16).reshape(1, -1)
    assert np.array_equal(apply_windows(cache_range, [window]),
                          apply_windows(cache_range.astype(np.float32), [window]))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.uint16, np.int32, np.int64])
def test_other_integer_dtypes_match_float_path(dtype: type) -> None:
    info = np.iinfo(dtype)
    values: np.ndarray = np.linspace(max(info.min, -3000), min(info.max, 5000), 997).astype(dtype)
    values = values.reshape(1, -1)
    assert np.array_equal(apply_windows(values), apply_windows(values.astype(np.float32)))


def test_integers_beyond_int16_take_the_float_path() -> None:
    hu = np.array([[-100_000, 40, 100_000]], dtype=np.int32)
    assert apply_windows(hu, [BRAIN])[0, :, 0].tolist() == [0, 128, 255]


def test_custom_window_shares_lut_with_equal_preset() -> None:
    from ichdet.dicom.windowing import _lut

    hu = np.arange(-100, 200, dtype=np.int16).reshape(3, 100)
    _lut.cache_clear()
    assert np.array_equal(apply_windows(hu, [Window("40/80", 40, 80)]), apply_windows(hu, [BRAIN]))
    assert (_lut.cache_info().misses, _lut.cache_info().hits) == (1, 1)  # one table, keyed by centre/width


@pytest.mark.parametrize(("hu", "error", "match"), [
    (np.zeros((2, 2, 1), np.float32), ValueError, r"2-D \(H, W\)"),
    (np.zeros(4, np.int16), ValueError, r"2-D \(H, W\)"),
    (np.zeros((2, 2), bool), TypeError, "numeric"),
])
def test_apply_windows_rejects_bad_input(hu: np.ndarray, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        apply_windows(hu)


def test_apply_windows_rejects_no_windows() -> None:
    with pytest.raises(ValueError, match="no windows"):
        apply_windows(np.zeros((2, 2), np.float32), [])


def test_window_low_high() -> None:
    assert (BRAIN.low, BRAIN.high) == (0.0, 80.0)
    assert (SOFT.low, SOFT.high) == (-150.0, 230.0)
    assert (PRESETS["bone"].low, PRESETS["bone"].high) == (-800.0, 2000.0)


@pytest.mark.parametrize(("center", "width", "match"), [
    (40, 0, r"window 'bad': width must be > 0"),
    (40, -80, r"window 'bad': width must be > 0"),
    (float("nan"), 80, r"window 'bad': center and width must be finite"),
    (40, float("inf"), r"window 'bad': center and width must be finite"),
])
def test_window_validates(center: float, width: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Window("bad", center, width)


def test_presets_are_named_by_their_key() -> None:
    assert all(name == window.name for name, window in PRESETS.items())
    assert {"brain", "subdural", "soft_tissue", "bone", "stroke"} <= set(PRESETS)


@pytest.mark.parametrize(("name", "match"), [
    ("subdurall", r"unknown window 'subdurall'\. Did you mean 'subdural'\?"),
    ("Brain", r"Did you mean 'brain'\?"),
    ("soft-tissue", r"Did you mean 'soft_tissue'\?"),
    ("xyz", r"unknown window 'xyz'\. Presets: brain, subdural, soft_tissue, stroke"),
])
def test_get_window_unknown_name(name: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_window(name)


def test_resolve_windows_accepts_names_center_width_and_windows() -> None:
    custom = Window("mine", 10, 20)
    resolved = resolve_windows(["brain", "80/200", " -20.5 / 100 ", custom])
    assert resolved == (BRAIN, Window("80/200", 80, 200), Window("-20.5 / 100", -20.5, 100), custom)


@pytest.mark.parametrize(("spec", "match"), [
    ([], "at least one window"),
    ("brain", r"must be a list, got the string 'brain'; write \[brain\]"),
    (["brian"], r"unknown window 'brian'\. Did you mean 'brain'\?"),
    (["40/0"], r"window '40/0': width must be > 0"),
    (["40/-80"], r"window '40/-80': width must be > 0"),
    ([42], r"window 42: expected a preset name"),
])
def test_resolve_windows_rejects_bad_specs(spec: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_windows(spec)


@pytest.mark.parametrize(("windows", "expected"), [
    (SEED_WINDOWS, (-150.0, 230.0)),
    ((BRAIN,), (0.0, 80.0)),
    ((BRAIN, PRESETS["bone"]), (-800.0, 2000.0)),
    ((PRESETS["stroke"], SUBDURAL), (-20.0, 180.0)),
])
def test_window_range(windows: tuple[Window, ...], expected: tuple[float, float]) -> None:
    assert window_range(windows) == expected


def test_window_range_needs_windows() -> None:
    with pytest.raises(ValueError, match="no windows"):
        window_range([])


def test_window_tables_are_apply_windows_row_per_window() -> None:
    from ichdet.dicom.windowing import window_tables

    values = np.arange(65536, dtype=np.uint16).view(np.int16).reshape(1, -1)
    tables = window_tables(SEED_WINDOWS)
    assert tables.shape == (3, 65536) and tables.flags.c_contiguous
    # against the float path, which uses no table (the integer path is these tables themselves)
    np.testing.assert_array_equal(tables, apply_windows(values.astype(np.float32), SEED_WINDOWS)[0].T)


# ------------------------------------------------------------------------------------ the one resize rule

_BLOCKS = np.array([[0, 0, 8, 8], [0, 0, 8, 8], [4, 4, 12, 12], [4, 4, 12, 12]], np.float32)


@pytest.mark.parametrize(("image", "size", "expected"), [
    (_BLOCKS, 2, [[0, 8], [4, 12]]),  # shrink: area, each output the mean of its 2x2 block
    (np.array([[0, 1, 2, 3]] * 4, np.float32), 2, [[0.5, 2.5], [0.5, 2.5]]),
    (np.array([[0, 8], [0, 8]], np.float32), 4, [[0, 2, 6, 8]] * 4),  # enlarge: bilinear
    (_BLOCKS, 4, _BLOCKS.tolist()),  # already at size: unchanged
])
def test_resize_square(image: np.ndarray, size: int, expected: list[list[float]]) -> None:
    np.testing.assert_array_equal(resize_square(image, size), np.array(expected, np.float32))


@pytest.mark.parametrize("channels", [1, 3, 4, 5, 9])
def test_resize_square_channels_each_like_alone(channels: int) -> None:
    image = np.stack([_BLOCKS * (c + 1) for c in range(channels)], axis=-1).astype(np.uint8)
    out = resize_square(image, 2)
    assert out.shape == (2, 2, channels) and out.dtype == np.uint8
    for c in range(channels):
        np.testing.assert_array_equal(out[..., c], resize_square(np.ascontiguousarray(image[..., c]), 2))
        np.testing.assert_array_equal(out[..., c], (np.array([[0, 8], [4, 12]]) * (c + 1)).astype(np.uint8))
