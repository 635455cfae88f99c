"""``ichdet demo``: the whole pipeline on the built-in synthetic data set, on a laptop CPU.

synth -> preprocess (train and test) -> train two small models on two folds -> predict the test
images -> ensemble -> Kaggle submission (validated) -> evaluation of the out-of-fold ensemble.
Every step resumes, so running the demo again into the same folder reuses what is already there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.errors import ConfigError
from ichdet.evaluate.ensembling import ensemble, read_predictions, write_ensemble
from ichdet.evaluate.evaluation import evaluate, write_plots
from ichdet.infer.predict import predict_runs
from ichdet.io import write_parquet_atomic
from ichdet.models.config import load_config
from ichdet.synth import SynthSpec, make_dataset
from ichdet.train.loop import train

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped configs (package data, so an installed ichdet finds them outside a checkout)."""
#: The demo's two models, like the seed's SE-ResNeXt50 at 224 and at 512: one network at two input sizes
#: (run name, overrides of configs/demo.yaml).
DEMO_MODELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("resnet10t_112", ()),
    ("resnet10t_80", ("data.image_size=80",)),
)


def _oof_predictions(runs: list[Path]) -> pd.DataFrame:
    """The runs' out-of-fold predictions in the ``ichdet predict`` long form (each run one model)."""
    return read_predictions([r / "oof.parquet" for r in runs])


def run_demo(out: str | Path, seed: int = 0, echo: Callable[[str], None] = print, studies: int = 14,
             overrides: Sequence[str] = ()) -> dict[str, Path]:
    """Run every step into ``out``; returns (and echoes) where each artifact is.

    ``studies`` (labelled synthetic studies) and ``overrides`` (``key=value`` on configs/demo.yaml) make
    smaller demos, e.g. for tests.
    """
    out, start = Path(out), time.perf_counter()
    config = CONFIG_DIR / "demo.yaml"
    if not config.exists():
        raise ConfigError(f"{config} not found; the ichdet installation lacks its configs, reinstall it")
    data = out / "data"
    echo(f"[1/6] synthetic studies -> {data}")
    make_dataset(data, SynthSpec(n_studies=studies, n_test_studies=2, size=128, seed=seed))
    echo("[2/6] preprocess")
    opts = PreprocessOptions(size=128, n_folds=2, seed=seed, progress=False)
    preprocess(data / "stage_2_train_images", out / "cache" / "train", data / "stage_2_train.csv", opts)
    preprocess(data / "stage_2_test_images", out / "cache" / "test", None, opts)
    runs = []
    for name, model_overrides in DEMO_MODELS:
        echo(f"[3/6] train {name} on 2 folds")
        cfg = load_config(config, [*model_overrides, *overrides, f"train.seed={seed}", f"name={name}"])
        train(cfg, out / "cache" / "train", out / "runs" / name, fold="all", resume=True, progress=False)
        runs.append(out / "runs" / name)
    echo("[4/6] predict the test images (with flip TTA)")
    test_preds = predict_runs(runs, out / "cache" / "test", tta=True, device="cpu")
    write_parquet_atomic(test_preds, out / "preds" / "test.parquet")
    echo("[5/6] ensemble -> submission")
    submission = out / "submission.csv"
    write_ensemble(ensemble(test_preds), submission, data / "stage_2_sample_submission.csv")
    echo("[6/6] evaluate the out-of-fold ensemble")
    write_parquet_atomic(_oof_predictions(runs), out / "preds" / "oof.parquet")
    result = evaluate(out / "preds" / "oof.parquet", data / "stage_2_train.csv", out / "cache" / "train")
    echo("\n".join(result.lines()))
    for failure in write_plots(result, out / "oof_roc.png", out / "oof_reliability.png"):
        echo(f"warning: {failure}")
    artifacts = {"data": data, "cache": out / "cache", "runs": out / "runs", "predictions": out / "preds",
                 "submission": submission, "roc": out / "oof_roc.png", "reliability": out / "oof_reliability.png"}
    echo(f"done in {time.perf_counter() - start:.0f} s; artifacts:")
    for key, path in artifacts.items():
        echo(f"  {key:<12} {path}")
    return artifacts
