"""How a person is told which slice: by the Instance Number a PACS shows and the slice position in mm.

ichdet orders slices foot to head along the slice normal (``index`` in the result JSON); a PACS numbers
them by Instance Number (0020,0013), often head to foot. Every text a reader sees (report, SR, secondary
capture, command output) names slices with these functions, never by ``index``. A slice without an
Instance Number is named by its position alone, saying so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["range_name", "ranges_text", "slice_name"]


def _mm(position_mm: float) -> str:
    return f"{float(position_mm):.1f} mm"


def slice_name(instance_number: int | None, position_mm: float) -> str:
    """``"image 12 (at 34.5 mm)"``; ``"image without Instance Number (at 34.5 mm)"`` when it has none.

    >>> slice_name(12, 34.49)
    'image 12 (at 34.5 mm)'
    >>> slice_name(None, -2.0)
    'image without Instance Number (at -2.0 mm)'
    """
    where = f"at {_mm(position_mm)}"
    return f"image {instance_number} ({where})" if instance_number is not None else \
        f"image without Instance Number ({where})"


def range_name(r: Mapping[str, Any]) -> str:
    """One entry of ``summary.slice_ranges[label]`` as text, lower Instance Number first.

    >>> range_name({"first_instance_number": 12, "last_instance_number": 7,
    ...             "first_position_mm": -5.0, "last_position_mm": 20.0})
    'images 7-12 (-5.0 to 20.0 mm)'
    >>> range_name({"first_instance_number": 4, "last_instance_number": 4,
    ...             "first_position_mm": 3.0, "last_position_mm": 3.0})
    'image 4 (at 3.0 mm)'
    >>> range_name({"first_instance_number": None, "last_instance_number": 9,
    ...             "first_position_mm": 0.0, "last_position_mm": 10.0})
    'images without Instance Number (0.0 to 10.0 mm)'
    """
    a, b = r.get("first_instance_number"), r.get("last_instance_number")
    lo, hi = sorted((float(r["first_position_mm"]), float(r["last_position_mm"])))
    if a == b and lo == hi:
        return slice_name(a, lo)
    where = f"{lo:.1f} to {hi:.1f} mm"
    if a is None or b is None:
        return f"images without Instance Number ({where})"
    first, last = sorted((int(a), int(b)))
    return f"images {first}-{last} ({where})"


def ranges_text(ranges: Sequence[Mapping[str, Any]], series_names: Mapping[str, str] | None = None) -> str:
    """Every range of one label, ``"; "``-separated; with ``series_names`` (series UID -> name, given when the
    study has several analysed series) each range is prefixed by its series' name. ``""`` when none."""
    parts = []
    for r in ranges:
        text = range_name(r)
        if series_names:
            text = f"{series_names.get(r['series_instance_uid'], 'series ?')}: {text}"
        parts.append(text)
    return "; ".join(parts)
