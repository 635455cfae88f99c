"""Typed run configuration: YAML file -> validated model -> ``config.yaml`` written next to the results.

Unknown keys are errors (at any depth), and ``--set section.key=value`` overrides are checked the
same way, so a typo never silently trains the default.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ichdet.dicom.windowing import resolve_windows
from ichdet.errors import ConfigError
from ichdet.names import did_you_mean

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    # No NaN or infinity in any float: a non-finite rate or warm-up would hang or poison training later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: Largest slice offset along z: further context than this is another part of the head, and a huge
#: offset would make the neighbour look-up walk far past every series.
MAX_SLICE_OFFSET = 8


class ModelConfig(_Strict):
    """The network: any timm backbone, ImageNet weights from the hub or a local file."""

    backbone: str = "resnet34"
    pretrained: bool = False
    weights: Path | None = None
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)


class AugmentConfig(_Strict):
    """Training augmentation (albumentations); probabilities per transform, 0 turns one off.

    ``brightness_contrast`` is off by default: a pixel's value is a Hounsfield unit through a fixed window,
    and acute blood differs from the brain around it by 15-40 HU, about what a +-10 % brightness or contrast
    draw shifts the brain window by. On issue 20's harness it cost 7 % of the test loss on a family of
    faint lesions, 3 of 3 seeds (docs/benchmarks.md, configs/README.md).
    """

    hflip: float = Field(0.5, ge=0.0, le=1.0)
    shift_scale_rotate: float = Field(0.5, ge=0.0, le=1.0)
    rotate_limit: float = Field(15.0, ge=0.0, le=180.0)
    brightness_contrast: float = Field(0.0, ge=0.0, le=1.0)
    random_crop: float = Field(0.5, ge=0.0, le=1.0)
    crop_scale: tuple[float, float] = (0.8, 1.0)

    @field_validator("crop_scale")
    @classmethod
    def _ordered_fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale {list(value)} must be [low, high] with 0 < low <= high <= 1, "
                             "e.g. [0.8, 1.0]")
        return value


class DataConfig(_Strict):
    """What a sample is: which slices (offsets along z) through which windows, at what size."""

    image_size: int = Field(256, ge=16, le=2048)
    windows: list[str] = Field(default_factory=lambda: ["brain", "subdural", "soft_tissue"])
    slice_offsets: list[int] = Field(default_factory=lambda: [0], min_length=1)
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig())

    @field_validator("slice_offsets")
    @classmethod
    def _near_slices(cls, value: list[int]) -> list[int]:
        far = [v for v in value if abs(v) > MAX_SLICE_OFFSET]
        if far:
            raise ValueError(f"slice offsets {far} are out of range: each must be within "
                             f"[-{MAX_SLICE_OFFSET}, {MAX_SLICE_OFFSET}], e.g. [-1, 0, 1]")
        return value

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

    epochs: int = Field(5, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    lr: float = Field(3e-4, gt=0.0, le=1e3)  # far above any useful rate; near 1e38 the optimiser overflows
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(0.5, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    num_workers: int = Field(2, ge=0, le=256)
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    compile: bool = False
    patience: int = Field(3, ge=1)
    seed: int = Field(0, ge=0, le=2**31 - 1)
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

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        # The name only; whether this machine has the device is checked by ichdet.models.engine.init_runtime.
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device ichdet runs on; use auto, cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="after")
    def _warmup_within_training(self) -> TrainConfig:
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs < self.epochs):
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be shorter than epochs={self.epochs}")
        return self


class Config(_Strict):
    """A whole run."""

    name: str = "run"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())


def _set_path(tree: dict[str, Any], dotted: str, value: Any, schema: type[BaseModel] | None = None) -> None:
    node: Any = tree
    keys = dotted.split(".")
    schema = schema or Config
    for depth, key in enumerate(keys):
        fields = schema.model_fields
        if key not in fields:
            where = ".".join(keys[:depth]) or "the top level"
            hint = did_you_mean(key, fields)
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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or err}{where}"


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (``3`` -> int, ``[a, b]`` -> list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value, e.g. --set train.epochs=3")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); "
                          "quote strings and close brackets, e.g. --set data.slice_offsets=[-1,0,1]") from None


def _validated(schema: type[M], tree: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str) -> M:
    """``schema`` validated from a config tree after applying ``key=value`` overrides (checked against it)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        _set_path(tree, *parse_override(item), schema)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{source}: {problems}") from None


def build_config(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                 source: str = "config") -> Config:
    """Validate a config tree after applying ``key=value`` overrides."""
    return _validated(Config, tree, overrides, source)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    return build_config(_read_tree(path), overrides, source=str(path or "defaults"))


def _read_tree(path: str | Path | None) -> dict[str, Any]:
    """The YAML mapping of a config file ({} for None: the defaults)."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping; ConfigError naming the file for anything that is not a YAML mapping."""
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; give a YAML file such as configs/demo.yaml")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; see configs/ for examples") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; a config is YAML (see configs/ for examples)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections (model, data, train)")
    return tree


def config_to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, the form written to a run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------- the sequence stage


class SeqModelConfig(_Strict):
    """The sequence model over each series (1st place 2019): projection, 1D conv, BiGRU or transformer
    encoder, six logits per slice."""

    kind: Literal["bigru", "transformer"] = "bigru"
    # What of each base run's per-slice features the model reads: its six out-of-fold logits, its pooled
    # CNN embedding, or both. The embeddings of different fold models live in different spaces (the
    # sequence model trains on fold j's and predicts with fold k's); the logits mean the same in every fold.
    inputs: Literal["logits", "embedding", "both"] = "logits"
    hidden: int = Field(128, ge=4, le=4096)
    conv_kernel: int = Field(3, ge=1, le=15)
    gru_layers: int = Field(1, ge=1, le=4)
    layers: int = Field(2, ge=1, le=12)  # transformer encoder layers (kind: transformer)
    heads: int = Field(4, ge=1, le=64)  # attention heads (kind: transformer); must divide hidden
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    residual: bool = True  # add the base runs' mean logits: the model learns a correction to them

    @field_validator("conv_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd (centred on the slice), got {value}")
        return value

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> SeqModelConfig:
        if self.kind == "transformer" and self.hidden % self.heads:
            raise ValueError(f"heads={self.heads} must divide hidden={self.hidden} (kind: transformer)")
        return self

    @property
    def arch(self) -> str:
        """The architecture name checkpoints record."""
        return f"seq_{self.kind}"


class SeqFeatureConfig(_Strict):
    """How per-slice features are extracted from the base runs (cached on disk, float16)."""

    tta: bool = True  # average embedding and logits over the image and its mirror
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)


class SeqConfig(_Strict):
    """A sequence run: the model, feature extraction and the same training settings as a 2D run.

    ``train.batch_size`` counts series, not slices.
    """

    name: str = "seq"
    model: SeqModelConfig = Field(default_factory=lambda: SeqModelConfig())
    features: SeqFeatureConfig = Field(default_factory=lambda: SeqFeatureConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=40, batch_size=4, lr=2e-3,
                                                                   warmup_epochs=0.0, patience=8))


def load_seq_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SeqConfig:
    """Read a sequence config (``configs/seq_bigru.yaml``; the defaults for None) and apply overrides."""
    return _validated(SeqConfig, _read_tree(path), overrides, str(path or "defaults"))
