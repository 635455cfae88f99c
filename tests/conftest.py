"""Shared fixtures: the real RSNA sample (skipped with a reason where absent) and offline settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from seq_support import SeqRuns

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Real RSNA challenge DICOMs (never in the repository): $ICHDET_RSNA_SAMPLE, else the folder the
#: development machines keep beside the checkout.
RSNA_SAMPLE = Path(os.environ.get("ICHDET_RSNA_SAMPLE")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-sample")


@pytest.fixture(scope="session")
def rsna_sample() -> Path:
    """The folder of real RSNA challenge DICOMs (:data:`RSNA_SAMPLE`), in the Kaggle layout."""
    if not (RSNA_SAMPLE / "stage_2_train_images").is_dir():
        pytest.skip(f"real RSNA sample not found at {RSNA_SAMPLE} (set ICHDET_RSNA_SAMPLE to a folder in the "
                    "Kaggle layout; the data is not in the repository)")
    return RSNA_SAMPLE


@pytest.fixture(scope="session")
def seq_runs(tmp_path_factory: pytest.TempPathFactory) -> SeqRuns:
    """A tiny 2D base run and two sequence runs on it (tests/seq_support.py), trained once a session."""
    from seq_support import tiny_seq_runs  # ichdet imported after HF_HUB_OFFLINE is set above

    return tiny_seq_runs(tmp_path_factory.mktemp("tiny_seq_runs"))


@pytest.fixture(scope="session")
def seq_bundle(seq_runs: SeqRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of ``seq_runs.seq`` (its base run inside)."""
    from ichdet.infer.bundle import write_bundle

    return write_bundle([seq_runs.seq], tmp_path_factory.mktemp("seq_bundle") / "seq.ichdet")
