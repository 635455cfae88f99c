"""Shared fixtures: the real RSNA sample (skipped with a reason where absent) and offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RSNA_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-sample"


@pytest.fixture(scope="session")
def rsna_sample() -> Path:
    """The folder of real RSNA challenge DICOMs, ``../shared/data/rsna-sample`` next to the repository."""
    if not (RSNA_SAMPLE / "stage_2_train_images").is_dir():
        pytest.skip(f"real RSNA sample not found at {RSNA_SAMPLE} (it lives outside the repository)")
    return RSNA_SAMPLE
