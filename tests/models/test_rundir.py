"""Which config changes block a resume: only those that change what a run learns."""

from __future__ import annotations

import pytest

from ichdet.models.config import build_config
from ichdet.models.rundir import RESULT_FREE_KEYS, flatten, result_changes

BASE = ["train.epochs=3", "train.device=cpu"]


@pytest.mark.parametrize(("overrides", "changed"), [
    ([], []),
    (["train.num_workers=7", "train.device=auto", "train.compile=true", "train.tta=false",
      "train.channels_last=false", "name=other"], []),
    (["train.lr=0.1"], ["train.lr"]),
    (["train.epochs=4", "train.seed=1"], ["train.epochs", "train.seed"]),
    (["train.amp=off", "train.limit_train_batches=2"], ["train.amp", "train.limit_train_batches"]),
    (["data.augment.hflip=0.1"], ["data.augment.hflip"]),
    (["data.slice_offsets=[-1, 0, 1]", "model.backbone=resnet18"], ["data.slice_offsets", "model.backbone"]),
])
def test_result_changes(overrides: list[str], changed: list[str]) -> None:
    saved = build_config({}, BASE).model_dump(mode="json")
    assert result_changes(saved, build_config({}, [*BASE, *overrides])) == changed


def test_a_key_the_checkpoint_lacks_counts_as_changed() -> None:
    saved = build_config({}, BASE).model_dump(mode="json")
    del saved["train"]["grad_clip"]
    saved["train"]["ema"] = 0.99  # a key this version does not know
    assert result_changes(saved, build_config({}, BASE)) == ["train.ema", "train.grad_clip"]


def test_free_keys_exist_in_the_config() -> None:
    assert flatten(build_config({}).model_dump(mode="json")).keys() >= RESULT_FREE_KEYS
