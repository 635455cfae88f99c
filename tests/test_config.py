from __future__ import annotations

from pathlib import Path

import pytest

from ichdet.config import Config, build_config, config_to_yaml, load_config, parse_override
from ichdet.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(("item", "key", "value"), [
    ("train.epochs=3", "train.epochs", 3),
    ("train.lr=1e-3", "train.lr", "1e-3"),  # YAML 1.1: no dot -> string; pydantic converts it
    ("train.lr=0.001", "train.lr", 0.001),
    ("model.pretrained=false", "model.pretrained", False),
    ("data.windows=[brain, bone]", "data.windows", ["brain", "bone"]),
    ("model.weights=/w/x.safetensors", "model.weights", "/w/x.safetensors"),
])
def test_parse_override(item: str, key: str, value: object) -> None:
    assert parse_override(item) == (key, value)


@pytest.mark.parametrize(("overrides", "path", "expected"), [
    (["train.epochs=3"], ("train", "epochs"), 3),
    (["train.lr=1e-3"], ("train", "lr"), 1e-3),
    (["data.image_size=512"], ("data", "image_size"), 512),
    (["model.backbone=vgg19"], ("model", "backbone"), "vgg19"),
    (["train.device=cpu"], ("train", "device"), "cpu"),
    (["train.num_workers=0"], ("train", "num_workers"), 0),
    (["train.seed=7"], ("train", "seed"), 7),
    (["train.batch_size=8"], ("train", "batch_size"), 8),
])
def test_overrides_set_values(overrides: list[str], path: tuple[str, str], expected: object) -> None:
    cfg = build_config({}, overrides)
    assert getattr(getattr(cfg, path[0]), path[1]) == expected


@pytest.mark.parametrize(("overrides", "match"), [
    (["train.epoch=3"], r"unknown config key 'train.epoch'.*Did you mean 'epochs'"),
    (["trian.epochs=3"], r"unknown config key 'trian.epochs'.*train"),
    (["train.epochs=0"], r"train.epochs: Input should be greater than or equal to 1"),
    (["data.windows=[brain, brian]"], r"brian"),
    (["train.amp=fp8"], r"train.amp"),
    (["train.epochs.x=1"], r"is a value, not a section"),
    (["train.epochs"], r"not key=value"),
])
def test_bad_overrides_fail(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config({}, overrides)


def test_unknown_key_in_yaml_fails(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train.epochz: Extra inputs are not permitted"):
        load_config(path)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = build_config({}, ["train.epochs=2", "data.slice_offsets=[-1, 0, 1]"])
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert again.data.in_chans == 9


@pytest.mark.parametrize("name", ["seresnext50_224", "seresnext50_512", "vgg19", "efficientnet_b0",
                                  "efficientnet_b2", "resnet34", "demo"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.name == name


@pytest.mark.parametrize(("raw", "expected"), [("off", "off"), ("false", "off"), ("bf16", "bf16")])
def test_amp_off_survives_yaml(raw: str, expected: str) -> None:
    assert build_config({}, [f"train.amp={raw}"]).train.amp == expected
