"""Label order and the Kaggle long CSV format (``ID_<image>_<label>,Label``)."""

from __future__ import annotations

LABELS: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
