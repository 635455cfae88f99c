"""The pixel cache: DICOM folder -> index + integer HU shards (preprocess), the store reader, folds, labels (no torch).

The names other stages may use::

    from ichdet.cache import PixelCache, read_labels, assign_folds
    cache = PixelCache("cache/")               # .index (DataFrame), .read(image_id) -> int16 HU

The writer (which reads DICOM through pydicom) loads on first use of its names (PEP 562): the store
reader, folds and labels never import pydicom.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ichdet.cache.folds import assign_folds
from ichdet.cache.index import build_index, list_dicom_files
from ichdet.cache.labels import (
    read_labels,
    read_submission,
    to_long,
    validate_submission,
    write_labels,
    write_submission,
)
from ichdet.cache.store import PixelCache

if TYPE_CHECKING:
    from ichdet.cache.writer import PreprocessOptions, hu_to_store, preprocess

_LAZY = dict.fromkeys(["PreprocessOptions", "hu_to_store", "preprocess"], "ichdet.cache.writer")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ichdet.cache' has no attribute {name!r}")

__all__ = ["PixelCache", "PreprocessOptions", "assign_folds", "build_index", "hu_to_store", "list_dicom_files",
           "preprocess", "read_labels", "read_submission", "to_long", "validate_submission", "write_labels",
           "write_submission"]
