from __future__ import annotations

import pytest

from ichdet.names import close_matches, did_you_mean

PRESETS = ["brain", "subdural", "soft_tissue", "bone"]


@pytest.mark.parametrize(("name", "choices", "expected"), [
    ("brian", PRESETS, ["brain"]),
    ("Brain", PRESETS, ["brain"]),
    ("SUBDURALL", PRESETS, ["subdural"]),
    ("xyz", PRESETS, []),
    ("epoch", ["epochs", "lr", "batch_size"], ["epochs"]),
    ("resnet3", ["resnet34", "resnet101", "resnet", "vgg19"], ["resnet34", "resnet", "resnet101"]),
    ("a", [], []),
])
def test_close_matches(name: str, choices: list[str], expected: list[str]) -> None:
    assert close_matches(name, choices) == expected


@pytest.mark.parametrize(("name", "choices", "expected"), [
    ("brian", PRESETS, " Did you mean 'brain'?"),
    ("resnet3", ["resnet34", "resnet"], " Did you mean 'resnet34', 'resnet'?"),
    ("zzz", PRESETS, ""),
])
def test_did_you_mean(name: str, choices: list[str], expected: str) -> None:
    assert did_you_mean(name, choices) == expected


def test_n_limits_the_matches() -> None:
    assert close_matches("resnet3", ["resnet", "resnet101", "resnet34"], n=1) == ["resnet34"]
