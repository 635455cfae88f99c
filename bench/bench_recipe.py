"""The training-recipe harness (issues 9, 20): does ichdet's recipe beat a bare timm loop on held-out studies?

On synthetic studies made by ``ichdet synth`` with fixed seeds (a training set and a separate,
labelled test set that nothing trains or selects on), for each training seed it trains

  (a) the bare loop of ``bench/bare_loop.py`` on every training study, final epoch;
  (b) ichdet fold 0 (``configs/demo.yaml`` plus the harness's overrides);
  (c) ichdet every fold, ensembled the ichdet way (mean of the folds' probabilities);

and scores each on the test studies as weighted log loss / the prior's (the training set's label
frequencies as constant predictions; lower is better). It also reports, as diagnostics, the median
fold member, the mean of the members' logits instead of probabilities, the expected calibration error
(ECE) of members and ensemble, and the epochs ichdet selected.

The defaults are issue 20's size: 40 training and 16 test studies of 256 px, trained at 128 px, resnet18
from scratch, batch 32, 5 folds, members 10 epochs and the bare loop 8 (the same optimiser steps: a member
sees 4/5 of the images). Run it on both synthetic families, since a recipe tuned on one can lose on the other:

    nice -n 5 env PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/bench_recipe.py --family classic --out /tmp/r_classic
    nice -n 5 env PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/bench_recipe.py --family subtle --out /tmp/r_subtle

Ablations: ``--variant NAME:key=value,...`` (repeatable) overrides ``--config``; ``@unit_inputs`` and
``@equal_loss`` patch what is not a config key (inputs /255, plain BCE); ``--cache-size 128`` stores HU at
128 px (HU resized, then windowed) instead of windowing at 256 px and resizing; ``--members 1`` trains
fold 0 only (the "ensemble" columns then mean nothing); ``--no-bare`` skips the bare loop.

Results: ``OUT/results.json`` and ``OUT/results.md``. Runs stay under ``OUT/work`` (reused by a rerun
with the same arguments; pass ``--fresh`` to retrain); the data sets and the bare loop's test
predictions under ``--data`` (default ``OUT/work``), which several processes may share, so seeds can
run side by side in two processes (``--seeds 0`` and ``--seeds 1``) and be merged afterwards (the first
source's first variant is the baseline of the ablation table):

    python bench/bench_recipe.py --merge /tmp/r_s0 /tmp/r_s1 /tmp/r_s2 --out /tmp/r_all
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_loop import predict_bare, train_bare
from common import format_machine, machine_info

from ichdet.cache.store import PixelCache
from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.evaluate.metrics import expected_calibration_error, weighted_log_loss
from ichdet.infer.predict import predict_run
from ichdet.models.config import load_config
from ichdet.names import LABELS
from ichdet.synth import FAMILIES, SynthSpec, make_dataset
from ichdet.train.loop import train

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TEST_SEED_OFFSET = 1000  # the test studies: their own synth seed, never seen by training or selection


def build_caches(work: Path, args: argparse.Namespace) -> tuple[PixelCache, PixelCache]:
    """The training cache (``--folds`` patient folds) and the held-out labelled test cache."""
    caches = []
    for name, n, seed in (("train", args.train_studies, args.data_seed),
                          ("test", args.test_studies, args.data_seed + TEST_SEED_OFFSET)):
        source, stored = args.source_size, args.cache_size or args.source_size
        family = "" if args.family == "classic" else f"{args.family}_"
        root = work / f"{family}{name}_{n}x{source}_s{seed}_f{args.folds}"
        if not (root / "data" / "stage_2_train.csv").exists():
            make_dataset(root / "data", SynthSpec(n_studies=n, n_test_studies=0, size=source, seed=seed,
                                                  family=args.family))
        cache = root / ("cache" if stored == source else f"cache{stored}")
        if not (cache / "index.parquet").exists():
            preprocess(root / "data" / "stage_2_train_images", cache, root / "data" / "stage_2_train.csv",
                       PreprocessOptions(size=stored, n_folds=args.folds, seed=seed, progress=False, workers=1))
        caches.append(PixelCache(cache))
    return caches[0], caches[1]


def truth(cache: PixelCache) -> np.ndarray:
    """Labels (N, 6) of every row."""
    return cache.index[list(LABELS)].to_numpy(dtype=np.float64)


def ratio(y: np.ndarray, p: np.ndarray, prior: float) -> float:
    """Weighted log loss as a fraction of the prior's."""
    return weighted_log_loss(y, p) / prior


def _unit_stats(model: torch.nn.Module, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(in_chans), torch.ones(in_chans)


#: Ablations that are not config keys, named ``@name`` in a ``--variant``: what they replace, in training and
#: in prediction alike, while the variant runs.
PATCHES: dict[str, list[tuple[str, Any]]] = {
    "unit_inputs": [("ichdet.train.loop.input_stats", _unit_stats),  # inputs /255, as the bare loop
                    ("ichdet.infer.passes.input_stats", _unit_stats)],
    "equal_loss": [("ichdet.train.loop.LABEL_WEIGHTS", (1.0,) * 6)],  # plain BCE, as the bare loop
}


def patched(names: list[str]) -> ExitStack:
    """Every patch of :data:`PATCHES` named in ``names``, entered (close the stack to undo them)."""
    stack = ExitStack()
    for name in names:
        if name not in PATCHES:
            raise SystemExit(f"unknown patch @{name}; known: {', '.join('@' + k for k in PATCHES)}")
        for target, value in PATCHES[name]:
            stack.enter_context(mock.patch(target, value))
    return stack


def run_ichdet(train_cache: PixelCache, test_cache: PixelCache, run: Path, seed: int,
               args: argparse.Namespace, variant: list[str]) -> dict[str, Any]:
    """Train every fold, predict the test cache; members, fold 0 and ensemble probabilities."""
    overrides = [f"data.image_size={args.size}", f"train.epochs={args.epochs}", f"model.backbone={args.backbone}",
                 f"train.batch_size={args.batch_size}", f"train.seed={seed}", "train.num_workers=0",
                 *(v for v in variant if not v.startswith("@"))]
    cfg = load_config(args.config, overrides)
    folds = ["all"] if args.members >= args.folds else [str(k) for k in range(args.members)]
    with patched([v[1:] for v in variant if v.startswith("@")]):
        results = [r for fold in folds for r in train(cfg, train_cache.root, run, fold=fold, resume=True,
                                                      progress=False)]
        preds = predict_run(run, test_cache, tta=cfg.train.tta, device="cpu", num_workers=0)
    order = {image: i for i, image in enumerate(test_cache.index["image_id"])}
    members = []
    for _, part in sorted(preds.groupby("fold"), key=lambda kv: kv[0]):
        idx = part["image_id"].map(order).to_numpy()
        p = np.empty((len(test_cache), 6))
        p[idx] = part[list(LABELS)].to_numpy(dtype=np.float64)
        members.append(p)
    selected = [{k: r.get(k) for k in ("fold", "epoch", "epochs", "val_loss", "selected", "ema")} for r in results]
    return {"members": np.stack(members), "selected": selected}


def logit_mean(members: np.ndarray) -> np.ndarray:
    """The sigmoid of the members' mean logit (the alternative to averaging probabilities)."""
    p = np.clip(members, 1e-7, 1 - 1e-7)
    return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)).mean(0)))


def one_seed(train_cache: PixelCache, test_cache: PixelCache, work: Path, seed: int,
             args: argparse.Namespace, prior: float) -> dict[str, dict[str, Any]]:
    """Every figure of one training seed: the bare loop, then each ichdet variant (name -> figures)."""
    y = truth(test_cache)
    bare: dict[str, Any] = {}
    start = time.perf_counter()
    if not args.no_bare:
        p = bare_predictions(train_cache, test_cache, seed, args)
        bare.update(bare=ratio(y, p, prior), bare_ece=expected_calibration_error(y, p))
    bare["bare_s"] = time.perf_counter() - start
    return {name: variant_row(train_cache, test_cache, work / f"run_{name}_s{seed}", seed, args, overrides,
                              prior) | bare | {"seed": seed} for name, overrides in parse_variants(args)}


def bare_predictions(train_cache: PixelCache, test_cache: PixelCache, seed: int,
                     args: argparse.Namespace) -> np.ndarray:
    """The bare loop's test probabilities for ``seed``: trained once, then read from ``--data`` (the
    file name holds every argument the bare loop depends on)."""
    bare_epochs = args.bare_epochs
    path = args.data / (f"bare_{train_cache.root.parent.name}_{train_cache.root.name}_{args.size}px_{args.backbone}"
                        f"_e{bare_epochs}_b{args.batch_size}_lr{args.bare_lr:g}_s{seed}.npy")
    if path.exists():
        return np.load(path)
    torch.manual_seed(seed)
    model = train_bare(train_cache, args.backbone, args.size, bare_epochs, args.batch_size, args.bare_lr, seed)
    p = predict_bare(model, test_cache, args.size)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, p)
    tmp.replace(path)  # atomic: another process may read it
    return p


def parse_variants(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``--variant name:key=value,key=value`` (repeatable) -> [(name, overrides)]; default: demo.yaml as is."""
    out = []
    for item in args.variant or ["demo:"]:
        name, _, sets = item.partition(":")
        out.append((name, [s for s in sets.split(",") if s]))
    return out


def variant_row(train_cache: PixelCache, test_cache: PixelCache, run: Path, seed: int, args: argparse.Namespace,
                overrides: list[str], prior: float) -> dict[str, Any]:
    """Figures of one ichdet variant and seed: fold 0, members, the ensemble (two ways), ECE, selection."""
    y = truth(test_cache)
    start = time.perf_counter()
    out = run_ichdet(train_cache, test_cache, run, seed, args, overrides)
    row: dict[str, Any] = {}
    members = out["members"]
    member_ratios = [ratio(y, m, prior) for m in members]
    mean = members.mean(0)
    row.update(fold0=member_ratios[0], members=member_ratios,
               member_ece=[expected_calibration_error(y, m) for m in members], selected=out["selected"],
               ichdet_s=time.perf_counter() - start)
    if len(members) > 1:  # with --members 1 there is no ensemble: its columns stay empty ("-")
        row.update(ensemble=ratio(y, mean, prior), median_member=statistics.median(member_ratios),
                   logit_ensemble=ratio(y, logit_mean(members), prior),
                   ensemble_ece=expected_calibration_error(y, mean))
    return row


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """Per-seed rows and the median row."""
    cols = ["bare", "fold0", "ensemble", "median_member", "logit_ensemble", "bare_ece", "ensemble_ece"]
    lines = [f"#### {title}", "", "| seed | " + " | ".join(cols) + " | selected epochs |",
             "| --- |" + " --- |" * (len(cols) + 1)]
    for r in rows:
        epochs = ", ".join(str(s["epoch"]) for s in r["selected"])
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols)
                     + f" | {epochs} |")
    med = {c: statistics.median(r[c] for r in rows) for c in cols if all(c in r for r in rows)}
    lines.append("| **median** | " + " | ".join(f"**{med[c]:.3f}**" if c in med else "-" for c in cols) + " | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, build the data once, run every seed, write JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_recipe"))
    ap.add_argument("--title", default="ichdet recipe vs bare loop", help="the heading of the report's tables")
    ap.add_argument("--train-studies", type=int, default=40)
    ap.add_argument("--test-studies", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="pixels the network sees")
    ap.add_argument("--family", default="classic", choices=sorted(FAMILIES),
                    help="the synthetic family of the training and test studies (ichdet synth --family)")
    ap.add_argument("--source-size", type=int, default=256, help="pixels of the synthetic images")
    ap.add_argument("--cache-size", type=int, default=0,
                    help="pixels the cache stores HU at (default --source-size): the windows are applied at this "
                         "size, then resized to --size")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--members", type=int, default=99, help="train only folds 0..N-1 (default: every fold)")
    ap.add_argument("--data", type=Path, default=None, help="data sets and bare predictions (default OUT/work)")
    ap.add_argument("--bare-epochs", type=int, default=8, help="the bare loop's epochs")
    ap.add_argument("--merge", type=Path, nargs="+", default=[], help="merge these runs' results.json into OUT")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of each ichdet member")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--bare-lr", type=float, default=1e-3)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", type=Path, default=DEMO, help="the recipe the variants override (demo.yaml)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,@patch,... -- an ichdet variant: overrides of --config and patches "
                         f"({', '.join('@' + k for k in PATCHES)}); repeatable")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare loop (an ichdet-only ablation)")
    ap.add_argument("--fresh", action="store_true", help="retrain: delete this tag's runs first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared, loaded machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.merge:
        merge(args.merge, args.out, args.title)
        return
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.data = args.data or work
    args.data.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for run in work.glob("run_*"):
            shutil.rmtree(run)
    start = time.perf_counter()
    train_cache, test_cache = build_caches(args.data, args)
    prior_p = np.nanmean(truth(train_cache), axis=0)
    y = truth(test_cache)
    prior = weighted_log_loss(y, np.broadcast_to(prior_p, y.shape))
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:  # the report is rewritten after every seed: a stopped run keeps what it measured
        for name, row in one_seed(train_cache, test_cache, work, seed, args, prior).items():
            rows.setdefault(name, []).append(row)
            print(name, json.dumps(row, default=float), flush=True)
        report = {"title": args.title, "args": {k: str(v) for k, v in vars(args).items()}, "prior_log_loss": prior,
                  "variants": parse_variants(args),
                  "train_images": len(train_cache), "test_images": len(test_cache), "rows": rows,
                  "seconds": time.perf_counter() - start, "machine": machine_info()}
        (args.out / "results.json").write_text(json.dumps(report, indent=1, default=float))
        write_markdown(report, args.out)


def ablation_table(report: dict[str, Any]) -> str:
    """One line per variant: fold 0 per seed, its median and spread (max - min), the change of the median
    against the first variant (the baseline), and the bare loop's median over the seeds it ran."""
    rows, variants = report["rows"], dict(report["variants"])
    bare_by_seed = {r["seed"]: r["bare"] for v in rows.values() for r in v if "bare" in r}
    first = next(iter(rows.values()))
    base, base_by_seed = statistics.median(r["fold0"] for r in first), {r["seed"]: r["fold0"] for r in first}
    lines = [f"#### {report['title']}: ablations (fold 0, test loss / prior's)", "",
             "| variant | change | fold 0 per seed | median | spread | vs first | better on seeds |",
             "| --- |" + " --- |" * 6]
    for name, v in rows.items():
        f0 = [r["fold0"] for r in v]
        med = statistics.median(f0)
        seeds = ", ".join(f"{r['fold0']:.3f}" for r in v)
        paired = [r for r in v if r["seed"] in base_by_seed]  # same seed: same initialisation and data order
        better = sum(r["fold0"] < base_by_seed[r["seed"]] for r in paired)
        lines.append(f"| {name} | {', '.join(variants.get(name, [])) or '-'} | {seeds} | {med:.3f} | "
                     f"{max(f0) - min(f0):.3f} | {med - base:+.3f} | {better} of {len(paired)} |")
    if bare_by_seed:
        seeds = ", ".join(f"{bare_by_seed[k]:.3f}" for k in sorted(bare_by_seed))
        lines.append(f"| bare loop | flip only, /255, BCE, one-cycle, all studies | {seeds} | "
                     f"{statistics.median(bare_by_seed.values()):.3f} | "
                     f"{max(bare_by_seed.values()) - min(bare_by_seed.values()):.3f} | | |")
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], out: Path) -> None:
    """``out/results.md``: the ablation summary (several variants), then one table per variant (per-seed rows
    and medians), sizes and the machine."""
    variants = dict(report["variants"])
    md = ablation_table(report) + "\n" if len(report["rows"]) > 1 else ""
    md += "".join(markdown(r, f"{report['title']}: {name} ({', '.join(variants.get(name, [])) or 'demo.yaml'})")
                  + "\n" for name, r in report["rows"].items())
    md += (f"\n{report['train_images']} training / {report['test_images']} test images, prior log loss "
           f"{report['prior_log_loss']:.4f}, {report['seconds']:.0f} s; {format_machine(report['machine'])}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    print(md)


def merge(sources: list[Path], out: Path, title: str) -> None:
    """One report from several runs of the harness (e.g. one process per seed): rows joined per variant."""
    reports = [json.loads((s / "results.json").read_text()) for s in sources]
    merged = dict(reports[0], rows={}, seconds=sum(r["seconds"] for r in reports), title=title,
                  variants=[v for r in reports for v in r["variants"]])
    for r in reports:
        if (r["train_images"], r["test_images"]) != (merged["train_images"], merged["test_images"]):
            raise SystemExit(f"{sources}: results of different data sets cannot be merged")
        for name, rows in r["rows"].items():
            merged["rows"].setdefault(name, []).extend(rows)
    for rows in merged["rows"].values():
        rows.sort(key=lambda row: row["seed"])
    (out / "results.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1, default=float))
    write_markdown(merged, out)


if __name__ == "__main__":
    main()
