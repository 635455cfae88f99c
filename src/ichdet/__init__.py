"""ichdet: intracranial hemorrhage detection on head CT, the RSNA 2019 way."""

from __future__ import annotations

from ichdet.errors import IchdetError
from ichdet.names import LABELS

__all__ = ["LABELS", "IchdetError"]
__version__ = "0.1.0"
