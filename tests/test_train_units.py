"""Pure parts of the training loop: schedule, early stopping, loss, precision on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ichdet.config import build_config
from ichdet.errors import ConfigError
from ichdet.metrics import weighted_log_loss
from ichdet.train import WeightedBCE, lr_lambda, precision, should_stop, update_best


@pytest.mark.parametrize(("step", "factor"), [(0, 0.25), (3, 1.0), (4, 1.0), (8, 0.5), (12, 0.0), (20, 0.0)])
def test_warmup_then_cosine(step: int, factor: float) -> None:
    assert lr_lambda(total_steps=12, warmup_steps=4)(step) == pytest.approx(factor, abs=1e-12)


# (val losses per epoch, patience, epochs) -> (epochs run, best epoch)
@pytest.mark.parametrize(("losses", "patience", "epochs", "ran", "best_epoch"), [
    ([0.5, 0.4, 0.3, 0.2], 2, 4, 4, 4),
    ([0.5, 0.6, 0.7, 0.1], 2, 4, 3, 1),
    ([0.5, 0.4, 0.45, 0.41, 0.3], 2, 5, 4, 2),
    ([0.5, 0.5], 1, 5, 2, 1),  # equal is not better
])
def test_early_stopping(losses: list[float], patience: int, epochs: int, ran: int, best_epoch: int) -> None:
    cfg = build_config({}, [f"train.patience={patience}", f"train.epochs={epochs}"])
    best = {"val_loss": math.inf, "epoch": -1, "bad_epochs": 0}
    epoch = 0
    while not should_stop(cfg, epoch, best):
        epoch += 1
        best, _ = update_best(best, losses[epoch - 1], epoch)
    assert (epoch, best["epoch"]) == (ran, best_epoch)


def test_loss_is_the_competition_metric() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.0, 0.5, -3.0, 1.0], [-2.0, 1.0, 0.3, -0.5, 3.0, -1.0]])
    target = torch.tensor([[1.0, 0, 0, 1, 0, 1], [0, 1, 1, 0, 0, 1]])
    expected = weighted_log_loss(target.numpy(), torch.sigmoid(logits).numpy())
    assert float(WeightedBCE()(logits, target)) == pytest.approx(expected, rel=1e-6)
    all_half = WeightedBCE()(torch.zeros(3, 6), torch.ones(3, 6))
    assert float(all_half) == pytest.approx(np.log(2), rel=1e-6)


def test_precision_on_cpu() -> None:
    autocast, scaler = precision(torch.device("cpu"), "auto")
    with autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    assert not scaler.is_enabled()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        precision(torch.device("cpu"), "bf16")
