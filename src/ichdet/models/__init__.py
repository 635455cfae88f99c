"""Networks and what both training and inference need of them: typed configs, backbones and the sequence
model, checkpoints, run-folder rules, the runtime (device, precision, loaders, batched passes) and the
datasets they read.

The names other stages may use::

    from ichdet.models import build_model, load_config
    cfg = load_config("configs/resnet34.yaml", ["train.epochs=3"])
    net = build_model(cfg.model, cfg.data.in_chans)
"""

from __future__ import annotations

from ichdet.models.backbones import SequenceModel, build_model, build_seq_model, input_stats
from ichdet.models.config import Config, DataConfig, ModelConfig, SeqConfig, load_config, load_seq_config
from ichdet.models.engine import Runtime, init_runtime
from ichdet.models.inputs import SliceDataset
from ichdet.models.rundir import fold_weights, load_run_model, run_config

__all__ = ["Config", "DataConfig", "ModelConfig", "Runtime", "SeqConfig", "SequenceModel", "SliceDataset",
           "build_model", "build_seq_model", "fold_weights", "init_runtime", "input_stats", "load_config",
           "load_run_model", "load_seq_config", "run_config"]
