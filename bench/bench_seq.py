"""The sequence stage (issue 10): its gain on the context-matters synthetic set, and its cost at RSNA scale.

``gain``: for each number of labelled training studies, the real pipeline end to end: ``synth --context``
-> preprocess (2 patient-grouped folds) -> a 2D base run (both folds) -> ``seq train`` of each sequence
variant over its out-of-fold features -> ``predict`` of the base run and of the sequence runs on
held-out labelled studies (another seed) -> weighted log loss of each (fold mean), the relative gain
``1 - seq / base``, and the binary cross-entropy split by z context (lesion edge slices, lesion cores,
negatives next to a lesion, other negatives).

``cost``: one training epoch of the sequence model through ichdet's own loop (``train_one_epoch``)
over random float16 features of the RSNA shapes (752,803 slices in 21,700 series of 20-60 slices,
2048 + 6 wide), with the default config (configs/seq_bigru.yaml); wall time, slices/s and peak
resident memory, and the features' size on disk (the .npy of that array).

    nice -n 5 .venv/bin/python bench/bench_seq.py gain --studies 24 96 300 --work /tmp/seqgain \\
        --variant logits:model.inputs=logits --variant both:model.inputs=both
    nice -n 5 .venv/bin/python bench/bench_seq.py cost [--device cuda] [--series 21700]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json

RSNA_SLICES, RSNA_SERIES, WIDTH = 752_803, 21_700, 2048 + 6
BASE = ["model.backbone=resnet10t", "data.image_size=48", "train.batch_size=32", "train.num_workers=0",
        "train.lr=0.003", "train.warmup_epochs=0.2", "train.channels_last=false", "train.amp=off",
        "train.patience=10"]
SEQ = ["features.num_workers=0", "features.batch_size=128", "train.amp=off"]
CATEGORIES = ("edge", "core", "near", "far")


def context_categories(index: Any) -> Any:
    """(N, 6) category codes of every image and label by z context, in ``index``'s row order: 0 ``edge`` a
    positive slice next to a negative one of its series (the thin, faint end of a lesion), 1 ``core`` a
    positive slice between positives (or at a series end), 2 ``near`` a negative slice next to a positive
    one, 3 ``far`` any other negative."""
    import numpy as np

    from ichdet.models.sequence import series_rows
    from ichdet.names import LABELS

    y = np.nan_to_num(index[list(LABELS)].to_numpy(float)) > 0.5
    out = np.zeros(y.shape, np.int8)
    for rows in series_rows(index):
        s = y[rows]
        prev = np.vstack([s[:1], s[:-1]])  # the slice itself past an end: an end is no edge
        nxt = np.vstack([s[1:], s[-1:]])
        edge = s & (~prev | ~nxt)
        near = ~s & (prev | nxt)
        out[rows] = np.select([edge, s, near], [0, 1, 2], 3)
    return out


def _breakdown(wide: Any, index: Any, cats: Any) -> dict[str, float]:
    """Mean binary cross-entropy of ``wide``'s probabilities per context category (all six labels)."""
    import numpy as np

    from ichdet.names import LABELS

    order = index.set_index("image_id").index.get_indexer(wide.index)
    p = np.clip(wide[list(LABELS)].to_numpy(float), 1e-7, 1 - 1e-7)
    y = np.nan_to_num(index[list(LABELS)].to_numpy(float))[order]
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    c = cats[order]
    return {name: round(float(bce[c == i].mean()), 4) if (c == i).any() else float("nan")
            for i, name in enumerate(CATEGORIES)}


def _score(wide: Any, labels_csv: Path) -> float:
    from ichdet.cache.labels import LABELS, read_labels
    from ichdet.evaluate.metrics import weighted_log_loss

    truth = read_labels(labels_csv).loc[wide.index]
    return float(weighted_log_loss(truth[list(LABELS)].to_numpy(float), wide[list(LABELS)].to_numpy(float)))


def _prepare(root: Path, name: str, n: int, seed: int, size: int) -> Path:
    """``synth --context`` of ``n`` labelled studies and its 2-fold cache (kept if already there)."""
    from ichdet.cache.writer import PreprocessOptions, preprocess
    from ichdet.synth import SynthSpec, make_dataset

    d = root / name
    if not (d / "cache" / "index.parquet").is_file():
        make_dataset(d / "data", SynthSpec(n_studies=n, seed=seed, n_test_studies=0, size=size,
                                           slices_per_study=(16, 24), context=True))
        preprocess(d / "data" / "stage_2_train_images", d / "cache", d / "data" / "stage_2_train.csv",
                   PreprocessOptions(size=size, workers=1, n_folds=2, progress=False))
    return d


def gain(studies: list[int], base_epochs: int, variants: dict[str, list[str]], heldout: int, device: str,
         size: int, root: Path, out: Path | None) -> dict[str, Any]:
    """Weighted log loss of the base run and of each sequence variant on held-out studies, per training-set
    size, with the loss split by z context (see :func:`context_categories`). Everything under ``root``
    is kept and reused (a rerun adds variants without retraining the base runs)."""
    import pandas as pd

    from ichdet.cache.store import PixelCache
    from ichdet.evaluate.ensembling import ensemble
    from ichdet.infer.predict import predict_runs
    from ichdet.models.config import build_config, load_seq_config
    from ichdet.train.loop import train
    from ichdet.train.seq import train_seq

    held = _prepare(root, "heldout", heldout, 1000, size)
    held_index = PixelCache(held / "cache").index
    cats = context_categories(held_index)
    labels = held / "data" / "stage_2_train.csv"
    result: dict[str, Any] = {"heldout_studies": heldout, "heldout_images": len(held_index), "size": size,
                              "base_epochs": base_epochs, "base": BASE, "seq": SEQ, "variants": variants,
                              "heldout_pairs": {c: int((cats == i).sum()) for i, c in enumerate(CATEGORIES)},
                              "rows": []}
    for n in studies:
        d = _prepare(root, f"n{n}", n, n, size)
        start, base_s = time.perf_counter(), None
        if not (d / "base" / "oof.parquet").is_file():
            train(build_config({}, [*BASE, f"data.image_size={size}", f"train.epochs={base_epochs}",
                                    f"train.device={device}"]), d / "cache", d / "base", progress=False)
            base_s = round(time.perf_counter() - start, 1)
        base_wide = ensemble(predict_runs([d / "base"], held / "cache", device=device))
        base_loss = _score(base_wide, labels)
        n_series = len(set(pd.read_parquet(d / "cache" / "index.parquet")["series_uid"]))
        for name, overrides in variants.items():
            run, start, seq_s = d / f"seq_{name}", time.perf_counter(), None
            if not (run / "oof.parquet").is_file():
                cfg = load_seq_config(Path("configs/seq_bigru.yaml"), [*SEQ, *overrides, f"train.device={device}"])
                train_seq(cfg, [d / "base"], d / "cache", run, progress=False)
                seq_s = round(time.perf_counter() - start, 1)
            wide = ensemble(predict_runs([run], held / "cache", device=device))
            seq_loss = _score(wide, labels)
            epochs = [json.loads(f.read_text().splitlines()[-1]).get("epochs_run") for f in
                      sorted(run.glob("fold*/metrics.jsonl"))]
            row = {"studies": n, "series": n_series, "variant": name, "base_wll": round(base_loss, 4),
                   "seq_wll": round(seq_loss, 4), "gain": round(1 - seq_loss / base_loss, 3),
                   "base_train_s": base_s, "seq_train_s": seq_s, "seq_epochs_run": epochs,
                   "base_by_context": _breakdown(base_wide, held_index, cats),
                   "seq_by_context": _breakdown(wide, held_index, cats)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if out:
                write_json(out, result)
    return result


def cost(series: int, slices: int, device: str, max_batches: int | None, sets: Sequence[str] = ()) -> dict[str, Any]:
    """One sequence epoch over random RSNA-shaped features through ichdet's training loop."""
    import numpy as np
    import torch
    from torch import nn

    from ichdet.models.backbones import build_seq_model
    from ichdet.models.config import load_seq_config
    from ichdet.models.engine import init_runtime
    from ichdet.models.sequence import SeriesDataset, series_loader
    from ichdet.train.loop import Trainer, WeightedBCE, optimisation, train_one_epoch
    from ichdet.train.seq import _infer, series_batch

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
    overrides = [f"train.device={device}", "train.epochs=1", *sets]
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
            "overrides": list(sets), "inputs": cfg.model.inputs, "kind": cfg.model.kind,
            "batches": steps, "batch_series": cfg.train.batch_size, "epoch_s": round(epoch_s, 1),
            "epoch_s_full": round(epoch_s * slices / done_slices, 1),
            "epoch_cpu_s_full": round(epoch_cpu_s * slices / done_slices, 1),  # all threads: load-independent
            "slices_per_s": round(done_slices / epoch_s),
            "train_loss": round(record["train_loss"], 4), "make_features_s": round(make_s, 1),
            "features_gb_float16": round(features.nbytes / 1e9, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if rt.device.type == "cuda" else None}


def _variant(text: str) -> tuple[str, list[str]]:
    """``NAME`` or ``NAME:key=value,key=value`` (overrides of configs/seq_bigru.yaml)."""
    name, _, rest = text.partition(":")
    return name, [item for item in rest.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gain")
    g.add_argument("--studies", type=int, nargs="+", default=[24, 96, 300])
    g.add_argument("--heldout", type=int, default=40)
    g.add_argument("--size", type=int, default=48)
    g.add_argument("--base-epochs", type=int, default=6)
    g.add_argument("--variant", action="append", type=_variant, default=None,
                   help="NAME[:key=value,...] a sequence config to train (repeat); default: the shipped one")
    g.add_argument("--work", type=Path, default=None, help="folder for data and runs, reused when given again")
    c = sub.add_parser("cost")
    c.add_argument("--series", type=int, default=RSNA_SERIES)
    c.add_argument("--slices", type=int, default=RSNA_SLICES)
    c.add_argument("--max-batches", type=int, default=None, help="stop the epoch early (extrapolated)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of configs/seq_bigru.yaml (repeat), e.g. model.inputs=both")
    for p in (g, c):
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.what == "gain":
        work = args.work or Path(tempfile.mkdtemp(prefix="bench_seq_"))
        result = gain(args.studies, args.base_epochs, dict(args.variant or [("shipped", [])]), args.heldout,
                      args.device, args.size, work, args.out)
    else:
        result = cost(args.series, args.slices, args.device, args.max_batches, args.set)
    result["machine"] = machine_info()
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
