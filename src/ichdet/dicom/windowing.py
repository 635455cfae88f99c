"""CT windows: Hounsfield units to uint8 channels, one channel per window. Pure numpy, no I/O.

A window (center ``c``, width ``w``, in HU) maps ``[c - w/2, c + w/2]`` linearly onto ``[0, 255]``
and clips everything outside. The seed stacks three windows (brain, subdural, soft tissue) as the
three channels of an RGB-like image.

Example::

    >>> hu = np.array([[-1000.0, 0.0, 40.0, 80.0, 3000.0]], dtype=np.float32)
    >>> apply_windows(hu, [get_window("brain")])[..., 0]
    array([[  0,   0, 128, 255, 255]], dtype=uint8)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from ichdet.errors import ConfigError
from ichdet.names import did_you_mean

__all__ = [
    "PRESETS",
    "SEED_WINDOWS",
    "Window",
    "apply_windows",
    "get_window",
    "resolve_windows",
    "window_range",
]


@dataclass(frozen=True)
class Window:
    """A CT display window in Hounsfield units: ``center`` (level) and ``width``, both finite, width > 0."""

    name: str
    center: float
    width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise ValueError(f"window {self.name!r}: center and width must be finite, got "
                             f"{self.center}/{self.width}")
        if self.width <= 0:
            raise ValueError(f"window {self.name!r}: width must be > 0 HU, got {self.width}")

    @property
    def low(self) -> float:
        """Lowest HU of the window: maps to 0."""
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        """Highest HU of the window: maps to 255."""
        return self.center + self.width / 2


def _presets(*windows: Window) -> dict[str, Window]:
    return {w.name: w for w in windows}


# Head-CT presets, center/width in HU, from Radiopaedia "Windowing (CT)"; brain, subdural and
# soft_tissue are the seed's three channels (DESIGN.md).
PRESETS: dict[str, Window] = _presets(
    Window("brain", 40, 80),  # grey/white matter, fresh blood just above the top
    Window("subdural", 80, 200),  # thin extra-axial blood against the skull ("blood" window)
    Window("soft_tissue", 40, 380),  # scalp, orbits, broad overview
    Window("stroke", 32, 8),  # very narrow: subtle early ischaemic grey/white contrast
    Window("bone", 600, 2800),  # skull and skull base, the widest: fractures, calvarium
    Window("narrow_bone", 400, 1800),  # finer contrast within the calvarium
)

SEED_WINDOWS: tuple[Window, ...] = (PRESETS["brain"], PRESETS["subdural"], PRESETS["soft_tissue"])

_CENTER_WIDTH = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?)\s*/\s*([-+]?\d+(?:\.\d*)?)\s*$")


def get_window(name: str) -> Window:
    """The preset called ``name``; an unknown name raises ConfigError with close matches and all presets."""
    try:
        return PRESETS[name]
    except KeyError:
        hint = did_you_mean(name, PRESETS, cutoff=0.5)
        raise ConfigError(
            f"unknown window {name!r}.{hint} Presets: {', '.join(PRESETS)}; "
            "or give 'center/width' in HU, e.g. '40/80'."
        ) from None


def _parse_window(item: str | Window) -> Window:
    if isinstance(item, Window):
        return item
    if not isinstance(item, str):
        raise ConfigError(f"window {item!r}: expected a preset name, 'center/width' or a Window")
    match = _CENTER_WIDTH.match(item)
    if match is None:
        return get_window(item.strip())
    try:
        return Window(item.strip(), float(match[1]), float(match[2]))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resolve_windows(spec: Sequence[str | Window]) -> tuple[Window, ...]:
    """Windows from a config list: preset names, ``"center/width"`` strings (``"40/80"``) or Window objects.

    The order is kept (it is the channel order). Raises ConfigError on an empty list, a bare string
    (write ``[brain]``, not ``brain``), an unknown name or a width <= 0.
    """
    if isinstance(spec, str):
        raise ConfigError(f"windows must be a list, got the string {spec!r}; write [{spec}]")
    windows = tuple(_parse_window(item) for item in spec)
    if not windows:
        raise ConfigError("windows: at least one window is needed (one per image channel)")
    return windows


def window_range(windows: Sequence[Window]) -> tuple[float, float]:
    """The HU range ``(min low, max high)`` the windows look at: values outside it all clip the same way."""
    if not windows:
        raise ValueError("window_range: no windows given")
    return min(w.low for w in windows), max(w.high for w in windows)


def _window_float(hu: np.ndarray, window: Window) -> np.ndarray:
    """One window on a float32 array: ``rint(clip((hu - low) / width, 0, 1) * 255)`` as uint8.

    np.rint rounds half to even (40 HU in 40/80 is 127.5 -> 128). Computed in float32 so that the
    integer lookup tables, built with this very function, match it bit for bit.
    """
    scaled = (hu - np.float32(window.low)) / np.float32(window.width)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= np.float32(255.0)
    return np.rint(scaled, out=scaled).astype(np.uint8)


@lru_cache(maxsize=64)
def _lut(params: tuple[tuple[float, float], ...]) -> np.ndarray:
    """uint8 table (65536, C) indexed by the int16 value reinterpreted as uint16 (so -1 -> 65535)."""
    values = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.float32)
    table = np.stack([_window_float(values, Window("lut", c, w)) for c, w in params], axis=-1)
    table.flags.writeable = False
    return table


def window_tables(windows: Sequence[Window]) -> np.ndarray:
    """The tables :func:`apply_windows` uses for integer HU: uint8 (len(windows), 65536), one row per window.

    Row ``j`` at the int16 value ``v`` viewed as uint16 (``-1`` -> 65535) is window ``j`` of ``v``; the
    data loader takes one row per channel so each lookup writes one contiguous channel.
    """
    return np.ascontiguousarray(_lut(tuple((w.center, w.width) for w in windows)).T)


def _as_int16(hu: np.ndarray) -> np.ndarray | None:
    """The integer array as int16 when that is lossless, else None (the float path handles it)."""
    if hu.dtype == np.int16:
        return hu
    if hu.dtype.itemsize == 1:
        return hu.astype(np.int16)
    if hu.size and (hu.min() < -32768 or hu.max() > 32767):
        return None
    return hu.astype(np.int16)


def apply_windows(hu: np.ndarray, windows: Sequence[Window] = SEED_WINDOWS) -> np.ndarray:
    """Window an HU image into a uint8 image (H, W, len(windows)), channel ``i`` = ``windows[i]``.

    Each channel is ``rint(clip((hu - low) / width, 0, 1) * 255)``, rounding half to even, computed in
    float32 (float64 input is cast to float32 first). Integer input (int16 from the cache: the data
    loader's hot path) goes through a cached per-window-set lookup table with ``np.take``; the result
    is identical to the float path. HU values must be finite (NaN has no window value).
    """
    if hu.ndim != 2:
        raise ValueError(f"apply_windows: expected a 2-D (H, W) HU image, got shape {hu.shape}")
    if not windows:
        raise ValueError("apply_windows: no windows given")
    if np.issubdtype(hu.dtype, np.integer):
        small = _as_int16(hu)
        if small is not None:
            table = _lut(tuple((w.center, w.width) for w in windows))
            return np.take(table, small.view(np.uint16), axis=0)
    elif not np.issubdtype(hu.dtype, np.floating):
        raise TypeError(f"apply_windows: expected a numeric HU array, got dtype {hu.dtype}")
    hu32 = hu.astype(np.float32, copy=False)
    out = np.empty((*hu.shape, len(windows)), dtype=np.uint8)
    for i, window in enumerate(windows):
        out[..., i] = _window_float(hu32, window)
    return out


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """A square ``(H, H)`` or ``(H, H, C)`` image at ``(size, size)`` (channels kept): the one resize rule.

    Area interpolation to shrink (each output pixel the mean of the input it covers, no aliasing),
    bilinear to enlarge; an image already at ``size`` is returned as it is. OpenCV's area resize takes
    at most four channels at a non-integer ratio, so more channels are resized one by one.
    """
    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    dsize = (size, size)
    if img.ndim == 3 and img.shape[2] > 4:
        return np.stack([cv2.resize(np.ascontiguousarray(img[..., c]), dsize, interpolation=interp)
                         for c in range(img.shape[2])], axis=-1)
    out = cv2.resize(img, dsize, interpolation=interp)
    return out[..., None] if img.ndim == 3 and out.ndim == 2 else out
