"""Weight averaging (EMA) and checkpoint selection: what ``best.safetensors`` holds is what the log says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from synth_support import synth_cache

from ichdet.evaluate.metrics import weighted_log_loss
from ichdet.models.checkpoint import load_state
from ichdet.models.config import build_config
from ichdet.names import LABELS
from ichdet.train.loop import train

TINY = ["model.backbone=resnet10t", "data.image_size=32", "train.batch_size=8", "train.num_workers=0",
        "train.device=cpu", "train.lr=0.003", "train.warmup_epochs=0.2", "train.channels_last=false",
        "train.patience=10", "train.limit_train_batches=3", "train.tta=false"]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return synth_cache(root, studies=6, size=32, slices=(8, 8), seed=2)


def _log(run: Path) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(epoch records, the selection record) of fold 0's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "fold0" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "epoch" in r], records[-1]


# the two rules, each with and without the average (two runs, not four: the machine is shared)
@pytest.mark.parametrize(("select", "ema"), [("best", 0.0), ("last", 0.9)])
def test_selected_checkpoint_is_the_one_the_log_says(tiny_cache: Path, tmp_path: Path, select: str,
                                                     ema: float) -> None:
    cfg = build_config({}, [*TINY, "train.epochs=3", f"train.select={select}", f"train.ema_decay={ema}"])
    result = train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    epochs, chosen = _log(tmp_path / "run")
    losses = [e["val_loss"] for e in epochs]
    expected = int(np.argmin(losses)) + 1 if select == "best" else len(epochs)
    assert chosen["selected_epoch"] == expected == result[0]["epoch"]
    assert (chosen["select"], chosen["weights"], chosen["epochs_run"]) == (select, "ema" if ema else "raw", 3)
    assert chosen["val_loss"] == losses[expected - 1]
    assert 0.0 <= chosen["val_ece"] <= 1.0
    # the kept weights, scored again from oof.parquet (no TTA), reproduce the logged epoch's loss
    oof = pd.read_parquet(tmp_path / "run" / "fold0" / "oof.parquet").set_index("image_id")
    index = pd.read_parquet(tiny_cache / "index.parquet").set_index("image_id")
    truth = index.loc[oof.index, list(LABELS)].to_numpy(dtype=np.float64)
    score = weighted_log_loss(truth, oof[list(LABELS)].to_numpy(dtype=np.float64))
    assert score == pytest.approx(chosen["val_loss"], rel=1e-5)
    assert chosen["oof_loss"] == pytest.approx(score, rel=1e-5)
    if len(set(losses)) == len(losses) and expected != len(losses):  # another epoch would score otherwise
        assert score != pytest.approx(losses[-1], rel=1e-5)


def test_ema_weights_are_saved_not_the_raw_ones(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = build_config({}, [*TINY, "train.epochs=2", "train.select=last", "train.ema_decay=0.9"])
    train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    saved = load_file(str(tmp_path / "run" / "fold0" / "best.safetensors"))
    state = load_state(tmp_path / "run" / "fold0" / "checkpoints" / "last.pt")
    assert state["ema"] is not None
    name = "conv1.0.weight"  # resnet10t's stem: trained every step
    torch.testing.assert_close(saved[name], state["ema"][name], rtol=0, atol=0)
    assert not torch.allclose(saved[name], state["model"][name])  # the average lags the last step
    # running BN statistics are averaged too (they are buffers of the averaged module)
    bn = "bn1.running_mean"
    torch.testing.assert_close(saved[bn], state["ema"][bn], rtol=0, atol=0)


def test_without_ema_the_raw_weights_are_saved(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = build_config({}, [*TINY, "train.epochs=1", "train.select=last"])
    train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    saved = load_file(str(tmp_path / "run" / "fold0" / "best.safetensors"))
    state = load_state(tmp_path / "run" / "fold0" / "checkpoints" / "last.pt")
    assert state["ema"] is None
    torch.testing.assert_close(saved["conv1.0.weight"], state["model"]["conv1.0.weight"], rtol=0, atol=0)
