"""The sequence stage (issue 10): its gain on the context-matters synthetic set, and its cost at RSNA scale.

``gain``: for each number of labelled training studies, the real pipeline end to end: ``synth --context``
-> preprocess (2 patient-grouped folds) -> a 2D base run (both folds) -> ``seq train`` over its out-of-fold
features -> ``predict`` of the base run and of the sequence run on held-out labelled studies (another
seed) -> weighted log loss of each (fold mean), and the relative gain ``1 - seq / base``.

``cost``: one training epoch of the sequence model through ichdet's own loop (``train_one_epoch``)
over random float16 features of the RSNA shapes (752,803 slices in 21,700 series of 20-60 slices,
2048 + 6 wide), with the default config (configs/seq_bigru.yaml); wall time, slices/s and peak
resident memory, and the features' size on disk (the .npy of that array).

    nice -n 5 .venv/bin/python bench/bench_seq.py gain --studies 24 96 240
    nice -n 5 .venv/bin/python bench/bench_seq.py cost [--device cuda] [--series 21700]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json

RSNA_SLICES, RSNA_SERIES, WIDTH = 752_803, 21_700, 2048 + 6
BASE = ["model.backbone=resnet10t", "data.image_size=48", "train.batch_size=32", "train.num_workers=0",
        "train.lr=0.003", "train.warmup_epochs=0.2", "train.channels_last=false", "train.amp=off",
        "train.patience=10"]
SEQ = ["features.num_workers=0", "features.batch_size=128", "train.amp=off", "train.patience=6"]


def _score(preds: Any, labels_csv: Path) -> float:
    from ichdet.ensemble import ensemble
    from ichdet.labels import LABELS, read_labels
    from ichdet.metrics import weighted_log_loss

    wide = ensemble(preds)
    truth = read_labels(labels_csv).loc[wide.index]
    return float(weighted_log_loss(truth[list(LABELS)].to_numpy(float), wide[list(LABELS)].to_numpy(float)))


def gain(studies: list[int], base_epochs: int, seq_epochs: int, heldout: int, device: str, size: int) -> dict[str, Any]:
    """Weighted log loss of the base run and the sequence run on held-out studies, per training-set size."""
    import pandas as pd

    from ichdet.cache import PreprocessOptions, preprocess
    from ichdet.config import build_config, load_seq_config
    from ichdet.predict import predict_runs
    from ichdet.seq import train_seq
    from ichdet.synth import SynthSpec, make_dataset
    from ichdet.train import train

    root = Path(tempfile.mkdtemp(prefix="bench_seq_"))
    spec = dict(n_test_studies=0, size=size, slices_per_study=(16, 24), context=True)
    make_dataset(root / "heldout", SynthSpec(n_studies=heldout, seed=1000, **spec))  # type: ignore[arg-type]
    heldout_dir = root / "heldout"
    preprocess(heldout_dir / "stage_2_train_images", root / "heldout_cache", heldout_dir / "stage_2_train.csv",
               PreprocessOptions(size=size, workers=2, n_folds=2, progress=False))
    rows = []
    for n in studies:
        d = root / f"n{n}"
        make_dataset(d / "data", SynthSpec(n_studies=n, seed=n, **spec))  # type: ignore[arg-type]
        preprocess(d / "data" / "stage_2_train_images", d / "cache", d / "data" / "stage_2_train.csv",
                   PreprocessOptions(size=size, workers=2, n_folds=2, progress=False))
        start = time.perf_counter()
        train(build_config({}, [*BASE, f"data.image_size={size}", f"train.epochs={base_epochs}",
                                f"train.device={device}"]), d / "cache", d / "base", progress=False)
        base_s = time.perf_counter() - start
        start = time.perf_counter()
        train_seq(load_seq_config(Path("configs/seq_bigru.yaml"), [*SEQ, f"train.epochs={seq_epochs}",
                                                                     f"train.device={device}"]),
                  [d / "base"], d / "cache", d / "seq", progress=False)
        seq_s = time.perf_counter() - start
        preds = predict_runs([d / "base", d / "seq"], root / "heldout_cache", device=device)
        labels = root / "heldout" / "stage_2_train.csv"
        base_loss = _score(preds[preds["model"] == "base"], labels)
        seq_loss = _score(preds[preds["model"] == "seq"], labels)
        n_series = len(set(pd.read_parquet(d / "cache" / "index.parquet")["series_uid"]))
        rows.append({"studies": n, "series": n_series, "base_wll": round(base_loss, 4), "seq_wll": round(seq_loss, 4),
                     "gain": round(1 - seq_loss / base_loss, 3), "base_train_s": round(base_s, 1),
                     "seq_train_s": round(seq_s, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return {"heldout_studies": heldout, "size": size, "base_epochs": base_epochs, "seq_epochs": seq_epochs,
            "base": BASE, "seq": SEQ, "rows": rows}


def cost(series: int, slices: int, device: str, max_batches: int | None) -> dict[str, Any]:
    """One sequence epoch over random RSNA-shaped features through ichdet's training loop."""
    import numpy as np
    import torch
    from torch import nn

    from ichdet.config import load_seq_config
    from ichdet.engine import init_runtime
    from ichdet.models import build_seq_model
    from ichdet.seq import SeriesDataset, _infer, series_batch, series_loader
    from ichdet.train import Trainer, WeightedBCE, optimisation, train_one_epoch

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 61, size=series)
    lengths = np.maximum(1, np.round(lengths * slices / lengths.sum())).astype(np.int64)
    lengths[-1] += slices - lengths.sum()
    ends = np.cumsum(lengths)
    start = time.perf_counter()
    features = np.empty((slices, WIDTH), np.float16)
    for lo in range(0, slices, 65536):  # in chunks: no float64 array of the whole
        hi = min(slices, lo + 65536)
        features[lo:hi] = rng.standard_normal((hi - lo, WIDTH), dtype=np.float32)
    labels = (rng.random((slices, 6)) < 0.1).astype(np.float32)
    series_list = [np.arange(e - n, e) for e, n in zip(ends, lengths, strict=True)]
    make_s = time.perf_counter() - start
    overrides = [f"train.device={device}", "train.epochs=1"]
    if max_batches:
        overrides.append(f"train.limit_train_batches={max_batches}")
    cfg = load_seq_config(Path("configs/seq_bigru.yaml"), overrides)
    rt = init_runtime(device)
    torch.manual_seed(0)
    model = build_seq_model(cfg.model, WIDTH, [WIDTH - 6]).to(rt.device)
    ds = SeriesDataset(features, labels, series_list)
    loader = series_loader(ds, cfg.train.batch_size, torch.utils.data.RandomSampler(ds))
    steps = min(len(loader), max_batches or len(loader))
    optimizer, scheduler, autocast, scaler = optimisation(cfg, model, rt, steps)
    t = Trainer(cfg, rt, model, nn.Identity(), WeightedBCE().to(rt.device), optimizer, scheduler, scaler, autocast,
                loader, loader, None, to_batch=series_batch, infer=_infer)  # type: ignore[arg-type]  # no pixel cache
    start, cpu_start = time.perf_counter(), time.process_time()
    record = train_one_epoch(t, 0, progress=False)
    epoch_s, epoch_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    done_slices = int(lengths[: steps * cfg.train.batch_size].sum()) if max_batches else slices
    return {"series": series, "slices": slices, "width": WIDTH, "device": str(rt.device),
            "batches": steps, "batch_series": cfg.train.batch_size, "epoch_s": round(epoch_s, 1),
            "epoch_s_full": round(epoch_s * slices / done_slices, 1),
            "epoch_cpu_s_full": round(epoch_cpu_s * slices / done_slices, 1),  # all threads: load-independent
            "slices_per_s": round(done_slices / epoch_s),
            "train_loss": round(record["train_loss"], 4), "make_features_s": round(make_s, 1),
            "features_gb_float16": round(features.nbytes / 1e9, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if rt.device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gain")
    g.add_argument("--studies", type=int, nargs="+", default=[24, 96, 240])
    g.add_argument("--heldout", type=int, default=40)
    g.add_argument("--size", type=int, default=48)
    g.add_argument("--base-epochs", type=int, default=6)
    g.add_argument("--seq-epochs", type=int, default=30)
    c = sub.add_parser("cost")
    c.add_argument("--series", type=int, default=RSNA_SERIES)
    c.add_argument("--slices", type=int, default=RSNA_SLICES)
    c.add_argument("--max-batches", type=int, default=None, help="stop the epoch early (extrapolated)")
    for p in (g, c):
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.what == "gain":
        result = gain(args.studies, args.base_epochs, args.seq_epochs, args.heldout, args.device, args.size)
    else:
        result = cost(args.series, args.slices, args.device, args.max_batches)
    result["machine"] = machine_info()
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
