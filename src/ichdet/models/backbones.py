"""Backbone registry over timm: the seed's six models by name, any timm name, checked early.

>>> from ichdet.models.config import ModelConfig, SeqModelConfig
>>> model = build_model(ModelConfig(backbone="resnet34"), in_chans=3)  # 6 logits per image
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import adapt_input_conv
from torch import nn

from ichdet.errors import ConfigError
from ichdet.models.config import ModelConfig, SeqModelConfig
from ichdet.names import LABELS, did_you_mean

logger = logging.getLogger(__name__)

#: The seed's backbones under the names its configs used, mapped to timm's names.
SEED_BACKBONES: dict[str, str] = {
    "se_resnext50_32x4d": "seresnext50_32x4d",
    "seresnext50_32x4d": "seresnext50_32x4d",
    "vgg19": "vgg19",
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet_b2": "efficientnet_b2",
    "resnet34": "resnet34",
}


@cache
def _timm_names() -> frozenset[str]:
    return frozenset(timm.list_models())


def resolve_backbone(name: str) -> str:
    """The timm architecture for ``name`` (a seed alias or any timm name); ConfigError if unknown."""
    if name in SEED_BACKBONES:
        return SEED_BACKBONES[name]
    if timm.is_model(name):  # also pretrained tags such as resnet34.a1_in1k
        return name
    hint = did_you_mean(name, sorted(_timm_names() | set(SEED_BACKBONES)), n=5)
    raise ConfigError(f"unknown backbone {name!r} (model.backbone).{hint} "
                      f"Any name from timm.list_models() works; the seed's are {', '.join(SEED_BACKBONES)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def build_model(cfg: ModelConfig, in_chans: int, num_classes: int = len(LABELS)) -> nn.Module:
    """Create the network; ImageNet weights from ``cfg.weights`` (a local file) or the hub.

    With ``pretrained: true`` and no ``weights`` file on a machine without the hub, this fails with
    a ConfigError naming the two settings that fix it, instead of training from noise silently.
    """
    arch = resolve_backbone(cfg.backbone)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": cfg.drop_rate}
    if not cfg.pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs)
    if cfg.weights is not None:
        path = Path(cfg.weights)
        if not path.is_file():
            raise ConfigError(f"model.weights: {path} does not exist; give the path of the ImageNet "
                              f"weights of {arch} (.safetensors, .pth or .bin)")
        model = timm.create_model(arch, pretrained=False, **kwargs)
        load_initial_weights(model, path, arch, in_chans)
        return model
    if _offline():
        raise ConfigError(f"model.pretrained is true for {arch} but the hub is offline (HF_HUB_OFFLINE=1); "
                          "set model.weights to a local weights file, or model.pretrained=false")
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as err:  # no network, no cached file
        raise ConfigError(f"could not download ImageNet weights for {arch} ({err}); set model.weights "
                          "to a local weights file, or model.pretrained=false") from err


def _read_weights(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """The named tensors of a weights file (safetensors, or a torch file read ``weights_only``; a training
    checkpoint's ``model``/``state_dict`` entry); ConfigError naming the file if it holds none."""
    try:
        state = timm.models.load_state_dict(str(path))
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError("not a mapping of names to tensors")
    except (LookupError, ValueError, TypeError, AttributeError, RuntimeError, EOFError, OSError,
            SafetensorError, pickle.UnpicklingError) as err:  # a text, truncated or foreign file fails
        # deep inside torch's or safetensors' reader, each in its own way
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.weights: {path} is not usable weights of {arch} ({reason}); give the "
                          "ImageNet weights file of that backbone (.safetensors, .pth or .bin)") from None
    return dict(state)


def _names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def _listed(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_initial_weights(model: nn.Module, path: Path, arch: str, in_chans: int) -> None:
    """Load ``model.weights`` (``path``) into a fresh timm ``model`` of ``arch``: every tensor must fit.

    Two differences are expected and handled as timm's own loader does: a classifier head of another
    class count (ImageNet's 1000) is dropped and stays newly initialised (logged), and a first
    convolution for another number of input channels is adapted (``timm.models.adapt_input_conv``).
    Anything else (a tensor the backbone has and the file lacks, one the file has and the backbone
    lacks, another shape) is weights of another architecture: ConfigError naming the file and the
    mismatch, where a non-strict load would have kept the random initialisation without a word.
    """
    state, expected = _read_weights(path, arch), model.state_dict()
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    head = [f"{c}.{p}" for c in _names(pcfg.get("classifier")) for p in ("weight", "bias") if f"{c}.{p}" in expected]
    new_head = ""
    if any(k not in state or state[k].shape != expected[k].shape for k in head):
        found = [tuple(state[k].shape) for k in head if k in state]
        new_head = f"its classifier head has {found[0][0]} outputs, not {expected[head[0]].shape[0]}" \
            if found and found[0] else "it has no classifier head"
        state = {k: v for k, v in state.items() if k not in head}
        expected = {k: v for k, v in expected.items() if k not in head}
    for conv in (f"{c}.weight" for c in _names(pcfg.get("first_conv"))):
        if conv in state and conv in expected and state[conv].ndim == 4 \
                and state[conv].shape[1] != expected[conv].shape[1]:
            state[conv] = adapt_input_conv(in_chans, state[conv], base_chans=state[conv].shape[1])
    # BatchNorm's step counters are not weights (and some weight files leave them out)
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        problems = ([f"{len(missing)} tensors of {arch} missing ({_listed(missing)})"] if missing else []) \
            + ([f"{len(unexpected)} tensors {arch} does not have ({_listed(unexpected)})"] if unexpected else []) \
            + ([f"{len(shapes)} of other shapes ({_listed(shapes)})"] if shapes else [])
        raise ConfigError(f"model.weights: {path} does not fit model.backbone {arch}: " + "; ".join(problems)
                          + f". Give weights of {arch} (or set model.backbone to the architecture they are for)")
    model.load_state_dict(state, strict=False)  # only the head dropped above and BN step counters may be absent
    if new_head:
        logger.warning("model.weights %s: %s; the head is newly initialised, the rest of %s is loaded",
                       path, new_head, arch)


def input_stats(model: nn.Module, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (0-1 scale) the backbone was trained with, cycled to ``in_chans``."""
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean = list(pcfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = list(pcfg.get("std", IMAGENET_DEFAULT_STD))
    idx = [i % len(mean) for i in range(in_chans)]
    return torch.tensor([mean[i] for i in idx]), torch.tensor([std[i] for i in idx])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP and ``torch.compile`` wrappers (what checkpoints hold)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ---------------------------------------------------------------------------- the sequence model


class SequenceModel(nn.Module):
    """Six logits per slice from a series of per-slice features (the 1st-place 2019 second stage).

    Each slice sees its features projected to ``hidden`` (``cfg.inputs``: the base runs' logits through
    a linear layer, their pooled embeddings layer-normed then linear, or the sum of both), the
    differences of that projection to the previous and next slice of its series (itself at an end) and
    its relative position; a mixing layer and a 1D convolution over neighbouring slices feed the series
    mixer (``cfg.kind``: a bidirectional GRU, or a transformer encoder), and a linear head gives six
    logits per slice. The differences are taken after the projection (the projection of the
    differences, as it is linear): the wide features go through one matrix product, not three. The
    logits are not layer-normed: their level (how sure the base run is) is the information. With
    ``residual`` the head's output is added to the base runs' mean logits (zero-initialised head:
    training starts from the 2D predictions). Padding never leaks into a series: hidden states are
    zeroed past its end before the convolution, the GRU runs on packed sequences and the encoder's
    attention masks the padding.
    """

    def __init__(self, cfg: SeqModelConfig, n_features: int, logit_columns: Sequence[int]) -> None:
        super().__init__()
        self.residual, self.kind = cfg.residual, cfg.kind
        logit_index = torch.tensor([[c + i for i in range(len(LABELS))] for c in logit_columns], dtype=torch.long)
        is_logit = torch.zeros(n_features, dtype=torch.bool)
        is_logit[logit_index.flatten()] = True
        self.logit_index: torch.Tensor
        self.embedding_index: torch.Tensor
        self.register_buffer("logit_index", logit_index)
        self.register_buffer("embedding_index", torch.nonzero(~is_logit).flatten(), persistent=False)
        self.norm: nn.Module | None = None
        self.proj: nn.Linear | None = None
        self.proj_logits: nn.Linear | None = None
        if cfg.inputs in ("embedding", "both"):
            if not len(self.embedding_index):
                raise ConfigError(f"model.inputs={cfg.inputs} but the features hold logits only; "
                                  "use model.inputs=logits")
            self.norm = nn.LayerNorm(len(self.embedding_index), elementwise_affine=False)  # proj scales
            self.proj = nn.Linear(len(self.embedding_index), cfg.hidden)
        if cfg.inputs in ("logits", "both"):
            self.proj_logits = nn.Linear(logit_index.numel(), cfg.hidden)
        self.mix = nn.Linear(3 * cfg.hidden + 1, cfg.hidden)
        self.conv = nn.Conv1d(cfg.hidden, cfg.hidden, cfg.conv_kernel, padding=cfg.conv_kernel // 2)
        self.gru: nn.GRU | None = None
        self.encoder: nn.TransformerEncoder | None = None
        if cfg.kind == "bigru":
            self.gru = nn.GRU(cfg.hidden, cfg.hidden, num_layers=cfg.gru_layers, batch_first=True,
                              bidirectional=True, dropout=cfg.dropout if cfg.gru_layers > 1 else 0.0)
        else:
            layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, 2 * cfg.hidden, cfg.dropout,
                                               batch_first=True, norm_first=True)
            # no nested-tensor fast path: it drops padded positions, and the masked output is kept whole
            self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * cfg.hidden if cfg.kind == "bigru" else cfg.hidden, len(LABELS))
        if cfg.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, F) features -> (B, L, hidden): the selected inputs' projections, summed."""
        x = x.float()
        z: torch.Tensor | None = None
        if self.proj is not None and self.norm is not None:
            z = self.proj(self.norm(x.index_select(-1, self.embedding_index)))
        if self.proj_logits is not None:
            part = self.proj_logits(x[..., self.logit_index.flatten()])
            z = part if z is None else z + part
        assert z is not None  # the config allows no empty choice
        return z

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, F) features, ``mask`` (B, L) true on real slices -> logits (B, L, 6)."""
        lengths = mask.sum(1)
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        last = (lengths - 1).clamp(min=0)[:, None]
        z = self.project(x)
        prev = z.gather(1, (pos - 1).clamp(min=0)[..., None].expand_as(z))
        nxt = z.gather(1, torch.minimum(pos + 1, last)[..., None].expand_as(z))
        rel = (pos / last.clamp(min=1)).to(z.dtype)[..., None]
        keep = mask[..., None].to(z.dtype)
        h = torch.relu(self.mix(torch.cat([z, z - prev, z - nxt, rel], dim=-1))) * keep
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2) * keep
        if self.gru is not None:
            packed = nn.utils.rnn.pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        else:
            assert self.encoder is not None
            out = self.encoder(h, src_key_padding_mask=~mask) * keep
        logits = self.head(self.drop(out))
        if self.residual:
            logits = logits + x[..., self.logit_index].float().mean(dim=-2)
        return logits


def build_seq_model(cfg: SeqModelConfig, n_features: int, logit_columns: Sequence[int]) -> SequenceModel:
    """The sequence model of ``cfg`` over ``n_features`` per slice; ``logit_columns``: where each base
    run's six logits start in a feature row (their mean is the residual's base, and ``model.inputs``
    chooses between them and the other columns, the embeddings)."""
    return SequenceModel(cfg, n_features, logit_columns)
