"""Typed run configuration: YAML file -> validated model -> ``config.yaml`` written next to the results.

Unknown keys are errors (at any depth), and ``--set section.key=value`` overrides are checked the
same way, so a typo never silently trains the default.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ichdet.errors import ConfigError
from ichdet.windowing import resolve_windows


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The network: any timm backbone, ImageNet weights from the hub or a local file."""

    backbone: str = "resnet34"
    pretrained: bool = False
    weights: Path | None = None
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)


class AugmentConfig(_Strict):
    """Training augmentation (albumentations); probabilities per transform, 0 turns one off."""

    hflip: float = Field(0.5, ge=0.0, le=1.0)
    shift_scale_rotate: float = Field(0.5, ge=0.0, le=1.0)
    rotate_limit: float = Field(15.0, ge=0.0, le=180.0)
    brightness_contrast: float = Field(0.3, ge=0.0, le=1.0)
    random_crop: float = Field(0.5, ge=0.0, le=1.0)
    crop_scale: tuple[float, float] = (0.8, 1.0)


class DataConfig(_Strict):
    """What a sample is: which slices (offsets along z) through which windows, at what size."""

    image_size: int = Field(256, ge=16, le=2048)
    windows: list[str] = Field(default_factory=lambda: ["brain", "subdural", "soft_tissue"])
    slice_offsets: list[int] = Field(default_factory=lambda: [0])
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig())

    @field_validator("windows")
    @classmethod
    def _known_windows(cls, value: list[str]) -> list[str]:
        resolve_windows(value)  # raises ConfigError naming an unknown preset
        return value

    @property
    def in_chans(self) -> int:
        """Input channels of the network: one per (slice offset, window)."""
        return len(self.windows) * len(self.slice_offsets)


class TrainConfig(_Strict):
    """Optimisation, precision, hardware and stopping."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(0.5, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    compile: bool = False
    patience: int = Field(3, ge=1)
    seed: int = 0
    tta: bool = True
    # Weight averaging: an exponential moving average of the weights (and BN statistics), with warm-up,
    # is what gets validated, selected and saved; 0 turns it off (the raw weights are used).
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    # Which epoch's weights a fold keeps: the lowest validation loss (``best``, with early stopping
    # after ``patience``) or the final epoch (``last``: every epoch runs, the fold only reports).
    select: Literal["best", "last"] = "best"
    limit_train_batches: int | None = Field(None, ge=1)

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class Config(_Strict):
    """A whole run."""

    name: str = "run"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    keys = dotted.split(".")
    schema: type[BaseModel] = Config
    for depth, key in enumerate(keys):
        fields = schema.model_fields
        if key not in fields:
            where = ".".join(keys[:depth]) or "the top level"
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}: {where} has no {key!r}.{hint} "
                              f"Valid keys there: {', '.join(fields)}")
        annotation = fields[key].annotation
        if depth == len(keys) - 1:
            node[key] = value
            return
        node = node.setdefault(key, {})
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"config key {'.'.join(keys[:depth + 1])!r} is a value, not a section")
        schema = annotation


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (``3`` -> int, ``[a, b]`` -> list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value, e.g. --set train.epochs=3")
    return key.strip(), yaml.safe_load(raw)


def build_config(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                 source: str = "config") -> Config:
    """Validate a config tree after applying ``key=value`` overrides."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        _set_path(tree, *parse_override(item))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found; see configs/ for examples") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections (model, data, train)")
    return build_config(tree, overrides, source=str(path or "defaults"))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, the form written to a run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
