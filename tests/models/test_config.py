from __future__ import annotations

from pathlib import Path

import pytest

from ichdet.errors import ConfigError
from ichdet.models.config import Config, build_config, config_to_yaml, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


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


@pytest.mark.parametrize(("overrides", "match"), [
    (["data.slice_offsets=[]"], r"data.slice_offsets: List should have at least 1 item"),
    (["data.slice_offsets=[-1000000000]"], r"slice offsets \[-1000000000\] are out of range.*\[-8, 8\]"),
    (["data.slice_offsets=[-1, 0, 9]"], r"slice offsets \[9\] are out of range"),
    (["data.augment.crop_scale=[1.0, 0.5]"], r"crop_scale \[1.0, 0.5\] must be \[low, high\] with 0 < low"),
    (["data.augment.crop_scale=[0, 0.5]"], r"crop_scale \[0.0, 0.5\]"),
    (["data.augment.crop_scale=[0.5, 1.5]"], r"crop_scale \[0.5, 1.5\]"),
    (["train.warmup_epochs=.inf"], r"train.warmup_epochs: Input should be a finite number"),
    (["train.warmup_epochs=.nan"], r"train.warmup_epochs: Input should be a finite number"),
    (["train.epochs=2", "train.warmup_epochs=2"], r"warmup_epochs=2.0 must be shorter than epochs=2"),
    (["train.lr=.inf"], r"train.lr: Input should be a finite number"),
    (["train.lr=-0.1"], r"train.lr: Input should be greater than 0"),
    (["train.lr=1e38"], r"train.lr: Input should be less than or equal to 1000"),
    (["train.epochs=100000000"], r"train.epochs: Input should be less than or equal to 10000"),
    (["train.batch_size=0"], r"train.batch_size: Input should be greater than or equal to 1"),
    (["train.batch_size=10000000"], r"train.batch_size: Input should be less than or equal to 65536"),
    (["train.seed=-1"], r"train.seed: Input should be greater than or equal to 0"),
    (["train.device=tpu"], r"'tpu' is not a device ichdet runs on"),
    (["train.device=cuda:x"], r"'cuda:x' is not a device"),
    (["train.epochs=[1"], r"override 'train.epochs=\[1': the value is not valid YAML .*line 1"),
    (["data.windows={a: [}"], r"override 'data.windows=\{a: \[\}': the value is not valid YAML"),
])
def test_values_that_would_hang_or_crash_later_fail(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config({}, overrides)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.slice_offsets=[-8, 0, 8]"], [-8, 0, 8]),
    (["train.device=cuda:1"], "cuda:1"),
    (["train.device=cpu"], "cpu"),
    (["data.augment.crop_scale=[1.0, 1.0]"], (1.0, 1.0)),
    (["train.epochs=1", "train.warmup_epochs=0.9"], 0.9),
])
def test_values_at_the_bounds_pass(overrides: list[str], expected: object) -> None:
    cfg = build_config({}, overrides)
    key = overrides[-1].split("=")[0].split(".")
    node: object = cfg
    for part in key:
        node = getattr(node, part)
    assert node == expected


@pytest.mark.parametrize(("content", "match"), [
    (b"train:\n  epochs: [3\n", r"c.yaml: not valid YAML \(.*line 3"),
    (b"train: {epochs: 3\n", r"c.yaml: not valid YAML"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"c.yaml is not a text file"),
    (b"- 1\n- 2\n", r"c.yaml: a config is a mapping of sections"),
])
def test_bad_config_files_fail_in_one_line(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("make", "match"), [
    (lambda p: p.mkdir(), r"is a folder; give a YAML file"),
    (lambda p: None, r"not found; see configs/"),
])
def test_config_path_that_is_no_file(tmp_path: Path, make: object, match: str) -> None:
    path = tmp_path / "conf"
    make(path)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=match):
        load_config(path)


@pytest.mark.parametrize(("kind", "message"), [
    ("folder", "is a folder; give a YAML file"),
    ("binary", "is not a text file"),
    ("malformed", "not valid YAML"),
    ("bad_set", "the value is not valid YAML"),
])
def test_cli_train_bad_config_is_one_line_and_writes_nothing(tmp_path: Path, kind: str, message: str) -> None:
    from typer.testing import CliRunner

    from ichdet.cli import app

    config = tmp_path / "c.yaml"
    if kind == "folder":
        config.mkdir()
    else:
        config.write_bytes({"binary": b"\x00\xff\xfe\x00", "malformed": b"train: [\n"}.get(kind, b"train: {}\n"))
    sets = ["--set", "data.slice_offsets=[0"] if kind == "bad_set" else []
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--data", str(tmp_path / "no_cache"),
                                      "--out", str(tmp_path / "run"), *sets])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
