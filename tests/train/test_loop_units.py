"""Pure parts of the training loop: schedule, early stopping, loss, precision on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichdet.errors import ConfigError, RunFailed
from ichdet.evaluate.metrics import weighted_log_loss
from ichdet.models.config import build_config
from ichdet.models.engine import precision
from ichdet.train.loop import Best, WeightedBCE, check_finite_loss, lr_lambda, should_stop, update_best


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
    best = Best()
    epoch = 0
    while not should_stop(cfg, epoch, best):
        epoch += 1
        best, _ = update_best(best, losses[epoch - 1], epoch)
    assert (epoch, best.epoch) == (ran, best_epoch)
    assert best.val_loss == min(losses[:ran])


@pytest.mark.parametrize("best", [Best(), Best(0.25, 3, 2)])
def test_best_record_round_trips_as_plain_values(best: Best) -> None:
    plain = best.as_dict()
    assert all(type(v) in {int, float} for v in plain.values())  # loadable with weights_only=True
    assert Best.from_dict(plain) == best


@pytest.mark.parametrize(("record", "match"), [
    ({"epoch": 3, "train_loss": float("nan"), "lr": 1e-7, "first_bad_step": 7},
     r"fold 2 epoch 3: the training loss became nan at step 7 \(train.lr 1000\); likely causes: a learning rate"),
    ({"epoch": 1, "train_loss": float("inf"), "lr": 0.1, "first_bad_step": 1}, r"fold 2 epoch 1: .* inf at step 1"),
    ({"epoch": 1, "train_loss": float("inf"), "lr": 0.1}, r"fold 2 epoch 1: .* at a step"),
])
def test_non_finite_loss_fails_the_run(record: dict[str, float], match: str) -> None:
    with pytest.raises(RunFailed, match=match):
        check_finite_loss(record, fold=2, lr=1e3)


def test_finite_loss_passes_and_drops_the_step_field() -> None:
    record = {"epoch": 1, "train_loss": 0.5, "lr": 0.1, "first_bad_step": -1}
    check_finite_loss(record, fold=0, lr=0.1)
    assert record == {"epoch": 1, "train_loss": 0.5, "lr": 0.1}


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


@pytest.mark.parametrize("tta", [False, True])
def test_predict_batches_many_models_equal_one_at_a_time(tta: bool) -> None:
    from contextlib import nullcontext

    from torch import nn
    from torch.utils.data import DataLoader

    from ichdet.models.engine import Normalizer, predict_batches

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
              for _ in range(3)]
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    batches = [(images[i:i + 4], torch.zeros(len(images[i:i + 4]), 6), torch.arange(i, min(i + 4, 10)))
               for i in range(0, 10, 4)]
    loader: DataLoader[object] = DataLoader(batches, batch_size=None)  # type: ignore[arg-type]
    norm = Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25), channels_last=False)
    rows, together = predict_batches(models, norm, loader, torch.device("cpu"), nullcontext, tta)
    assert rows.tolist() == list(range(10)) and together.shape == (3, 10, 6)
    x = (images.float() / 255.0 - 0.5) / 0.25  # the normalisation written out: (x / 255 - mean) / std
    with torch.no_grad():
        for k, model in enumerate(models):
            expected = torch.sigmoid(model(x))
            if tta:
                expected = (expected + torch.sigmoid(model(x.flip(3)))) / 2
            np.testing.assert_allclose(together[k], expected.numpy(), rtol=1e-5, atol=1e-6)
    for k, model in enumerate(models):
        _, alone = predict_batches([model], norm, loader, torch.device("cpu"), nullcontext, tta)
        np.testing.assert_allclose(together[k], alone[0], rtol=1e-6)
    if tta:  # the mirror image counts: different from the plain prediction
        _, plain = predict_batches(models, norm, loader, torch.device("cpu"), nullcontext, False)
        assert not np.allclose(plain, together)


# select=last keeps every new epoch (whatever its loss) and never stops early
@pytest.mark.parametrize(("select", "losses", "ran", "kept"), [
    ("best", [0.5, 0.6, 0.7, 0.1], 3, 1),
    ("last", [0.5, 0.6, 0.7, 0.1], 4, 4),
    ("last", [0.1, 0.5, 0.6, 0.7], 4, 4),
])
def test_selection_rule(select: str, losses: list[float], ran: int, kept: int) -> None:
    cfg = build_config({}, ["train.patience=2", "train.epochs=4", f"train.select={select}"])
    best = Best()
    epoch = 0
    while not should_stop(cfg, epoch, best):
        epoch += 1
        best, _ = update_best(best, losses[epoch - 1], epoch, cfg.train.select)
    assert (epoch, best.epoch, best.val_loss) == (ran, kept, losses[kept - 1])
