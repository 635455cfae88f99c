"""One DICOM file in: header rules, stored pixels -> Hounsfield units, windowing, series rules (no torch).

The names other stages may use::

    from ichdet.dicom import read_hu, apply_windows
    hu = read_hu("ID_000012eaf.dcm")           # float32 (H, W) in HU
    img = apply_windows(hu)                     # uint8 (H, W, 3): brain, blood/subdural, soft tissue


Windowing is pure arithmetic and loads at once; the names that need pydicom load on first use
(PEP 562), so the torch side, which windows cached HU, never imports pydicom.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ichdet.dicom.windowing import SEED_WINDOWS, Window, apply_windows, get_window, resize_square, resolve_windows

if TYPE_CHECKING:
    from ichdet.dicom.read import (
        DicomMeta,
        hu_from_dataset,
        hu_from_stored,
        read_dicom,
        read_header,
        read_hu,
        read_meta,
    )
    from ichdet.dicom.series import (
        MIN_SLICES,
        SliceHeader,
        SliceRef,
        header_from_dataset,
        order_series,
        series_reason,
    )

_LAZY = {**dict.fromkeys(["DicomMeta", "hu_from_dataset", "hu_from_stored", "read_dicom", "read_header", "read_hu",
                          "read_meta"], "ichdet.dicom.read"),
         **dict.fromkeys(["MIN_SLICES", "SliceHeader", "SliceRef", "header_from_dataset", "order_series",
                          "series_reason"], "ichdet.dicom.series")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ichdet.dicom' has no attribute {name!r}")


__all__ = ["MIN_SLICES", "SEED_WINDOWS", "DicomMeta", "SliceHeader", "SliceRef", "Window", "apply_windows",
           "get_window", "header_from_dataset", "hu_from_dataset", "hu_from_stored", "order_series", "read_dicom",
           "read_header", "read_hu", "read_meta", "resize_square", "resolve_windows", "series_reason"]
