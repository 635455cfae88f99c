"""Tests of the sequence model (ichdet.models.backbones.SequenceModel): inputs it reads, both mixers, config checks."""

from __future__ import annotations

import pytest
import torch

from ichdet.errors import ConfigError
from ichdet.models.backbones import build_seq_model
from ichdet.models.config import SeqModelConfig, load_seq_config

N_FEATURES, LOGITS_AT = 10, 4  # columns 0-3: an embedding; 4-9: the base run's six logits
EMBEDDING = [0, 1, 2, 3]
LOGITS = [4, 5, 6, 7, 8, 9]


def _model(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = SeqModelConfig(**{"hidden": 8, "dropout": 0.0, "residual": False, **kw})  # type: ignore[arg-type]
    return build_seq_model(cfg, N_FEATURES, [LOGITS_AT]).eval()


def _changes(model: torch.nn.Module, columns: list[int]) -> float:
    """Largest change of the model's output when ``columns`` of every slice are replaced by others."""
    x = torch.randn(2, 5, N_FEATURES)
    mask = torch.ones(2, 5, dtype=torch.bool)
    y = x.clone()
    y[..., columns] = torch.randn(2, 5, len(columns)) * 3
    with torch.inference_mode():
        return float((model(x, mask) - model(y, mask)).abs().max())


@pytest.mark.parametrize("kind", ["bigru", "transformer"])
@pytest.mark.parametrize(("inputs", "reads_embedding", "reads_logits"), [
    ("logits", False, True),
    ("embedding", True, False),
    ("both", True, True),
])
def test_model_reads_only_the_inputs_it_is_configured_for(kind: str, inputs: str, reads_embedding: bool,
                                                          reads_logits: bool) -> None:
    model = _model(kind=kind, inputs=inputs)
    assert (_changes(model, EMBEDDING) > 1e-4) == reads_embedding
    assert (_changes(model, LOGITS) > 1e-4) == reads_logits


@pytest.mark.parametrize("inputs", ["logits", "both"])
def test_the_level_of_the_logits_reaches_the_model(inputs: str) -> None:
    # all six logits -6 (the base run is sure: nothing) or +6 (sure: bleed) differ only in level, which a
    # layer norm over the logits would erase
    model = _model(inputs=inputs)
    x = torch.zeros(2, 3, N_FEATURES)
    x[0, :, LOGITS], x[1, :, LOGITS] = -6.0, 6.0
    with torch.inference_mode():
        out = model(x, torch.ones(2, 3, dtype=torch.bool))
    assert float((out[0] - out[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["bigru", "transformer"])
def test_residual_model_starts_at_the_base_runs_mean_logits(kind: str) -> None:
    torch.manual_seed(0)
    model = build_seq_model(SeqModelConfig(hidden=8, kind=kind), 6 + 12, [6, 12]).eval()
    x = torch.randn(1, 4, 18)
    with torch.inference_mode():
        out = model(x, torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(out, (x[..., 6:12] + x[..., 12:18]) / 2)


def test_embedding_inputs_need_embedding_columns() -> None:
    with pytest.raises(ConfigError, match=r"model.inputs=both but the features hold logits only; use model.inputs=lo"):
        build_seq_model(SeqModelConfig(inputs="both"), 6, [0])
    assert build_seq_model(SeqModelConfig(inputs="logits"), 6, [0]) is not None


@pytest.mark.parametrize(("overrides", "error"), [
    (["model.inputs=pixels"], r"model.inputs.*'logits', 'embedding' or 'both'"),
    (["model.kind=transformer", "model.hidden=10", "model.heads=4"], r"heads=4 must divide hidden=10"),
    (["model.kind=lstm"], r"model.kind.*'bigru' or 'transformer'"),
])
def test_seq_model_config_refuses(overrides: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_seq_config(None, overrides)


def test_shipped_configs_load() -> None:
    bigru = load_seq_config("configs/seq_bigru.yaml")
    transformer = load_seq_config("configs/seq_transformer.yaml")
    assert (bigru.model.kind, transformer.model.kind) == ("bigru", "transformer")
    assert bigru.model.inputs == transformer.model.inputs
