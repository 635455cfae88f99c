"""The exception types ichdet raises on bad input; each message names the bad file or value and the fix."""

from __future__ import annotations

from pathlib import Path


class IchdetError(Exception):
    """Base class of every error ichdet raises on bad input."""


class DicomError(IchdetError):
    """A DICOM file that cannot be used: not DICOM, truncated, no pixel data, or undecodable."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class LabelError(IchdetError):
    """A label or submission table that does not follow the Kaggle format."""


class ConfigError(IchdetError):
    """A configuration value or key that does not exist or is out of range."""


class CheckpointError(IchdetError):
    """A checkpoint that is missing, incomplete, or unsafe to load."""


class LockError(IchdetError):
    """An output folder that another ichdet process is writing."""


class RunFailed(IchdetError):
    """A run that started on valid input and failed (diverging loss, full disk): the CLI exits 1, not 2."""
