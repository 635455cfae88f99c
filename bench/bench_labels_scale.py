"""Scale benchmark: read the full-size Kaggle label file and assign patient folds.

Generates (untimed) a synthetic ``stage_2_train.csv`` the size of RSNA stage 2 (752,803 images =
4,516,818 rows, ~14 % ``any``, a few exact duplicate rows like the real file) and a meta table of
~19 k patients, then times ``ichdet.cache.labels.read_labels`` and ``ichdet.cache.folds.assign_folds`` in a fresh
subprocess per repeat so the peak RSS (``ru_maxrss`` of that process) is clean. Reports the median
seconds, the peak RSS and PASS/FAIL against the targets (<= 30 s, <= 2 GB). The exit status is 0
whatever the verdict: this is a measurement, not a test.

``--baseline`` also times the naive way the same way, its repeats interleaved with ichdet's: a pandas
reader (``read_csv`` + ``str.rsplit`` + ``pivot``) and scikit-learn's ``StratifiedGroupKFold``
(patient-grouped, stratified on ``any``) for the folds. Both report how even the folds are: the spread
(max - min) of the per-fold prevalence of each label.

Usage::

    .venv/bin/python bench/bench_labels_scale.py [--repeats 3] [--json out.json] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import add_common_args, verdict, write_json

N_IMAGES = 752_803
N_PATIENTS = 19_000
N_DUPLICATE_IMAGES = 4  # the real stage_2_train.csv: 752,803 images in 4,516,842 rows (4 images twice)
TARGET_SECONDS = 30.0
TARGET_RSS_MB = 2048.0
LABELS = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
# P(patient has the subtype | patient has a bleed); tuned so image prevalence is close to RSNA's
# (epidural 0.4 %, parenchymal 4.8 %, ventricular 3.5 %, subarachnoid 4.7 %, subdural 6.3 %, any 14 %).
SUBTYPE_GIVEN_BLEED = np.array([0.04, 0.40, 0.30, 0.40, 0.45])
BLEED_PATIENTS = 0.40


# ------------------------------------------------------------------------------------ synthetic data


def synthetic_labels(n_images: int, n_patients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n_images, 6) uint8, patient (n_images,) int): each bleed is a run of adjacent slices."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(n_images - 10 * n_patients, np.full(n_patients, 1 / n_patients)) + 10
    patient = np.repeat(np.arange(n_patients), sizes)
    position = (np.arange(n_images) - np.repeat(np.cumsum(sizes) - sizes, sizes)) / np.repeat(sizes, sizes)
    bleed = rng.random(n_patients) < BLEED_PATIENTS
    has = (rng.random((n_patients, 5)) < SUBTYPE_GIVEN_BLEED) & bleed[:, None]
    start = rng.uniform(0.1, 0.7, (n_patients, 5))
    length = rng.uniform(0.1, 0.45, (n_patients, 5))
    inside = (position[:, None] >= start[patient]) & (position[:, None] < (start + length)[patient])
    sub = (has[patient] & inside).astype(np.uint8)
    labels = np.concatenate([sub, sub.max(axis=1, keepdims=True)], axis=1)
    shuffle = rng.permutation(n_images)  # the Kaggle file is not grouped by patient
    return labels[shuffle], patient[shuffle]


def hex_ids(n: int, seed: int) -> np.ndarray:
    """(n, 9) uint8 ASCII of n distinct random-looking 9-digit hex ids (an odd multiplier mod 16**9)."""
    rng = np.random.default_rng(seed)
    mul, add = np.uint64(2 * int(rng.integers(2**34, 2**35)) + 1), np.uint64(rng.integers(0, 2**36))
    values = (np.arange(n, dtype=np.uint64) * mul + add) & np.uint64(2**36 - 1)
    shifts = np.arange(8, -1, -1, dtype=np.uint64) * np.uint64(4)
    digits = ((values[:, None] >> shifts) & np.uint64(15)).astype(np.intp)
    return np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[digits]


def label_file_bytes(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, W) uint8: each image's six ``ID_<hex>_<label>,<0|1>\\n`` lines (fixed width per image)."""
    n = len(ids)
    parts: list[np.ndarray] = []
    for j, label in enumerate(LABELS):
        parts += [
            np.broadcast_to(np.frombuffer(b"ID_", np.uint8), (n, 3)),
            ids,
            np.broadcast_to(np.frombuffer(f"_{label},".encode(), np.uint8), (n, len(label) + 2)),
            labels[:, j : j + 1] + np.uint8(ord("0")),
            np.full((n, 1), ord("\n"), np.uint8),
        ]
    return np.concatenate(parts, axis=1)


def write_inputs(folder: Path, n_images: int, n_patients: int, seed: int) -> tuple[Path, Path]:
    """Write ``stage_2_train.csv`` (with duplicate image blocks) and ``meta.parquet`` into ``folder``."""
    labels, patient = synthetic_labels(n_images, n_patients, seed)
    image_hex, patient_hex = hex_ids(n_images, seed + 1), hex_ids(n_patients, seed + 2)
    rows = label_file_bytes(image_hex, labels)
    rng = np.random.default_rng(seed + 3)
    duplicated = rng.choice(n_images, N_DUPLICATE_IMAGES, replace=False)
    order = np.sort(np.concatenate([np.arange(n_images), duplicated]), kind="stable")
    csv_path, meta_path = folder / "stage_2_train.csv", folder / "meta.parquet"
    with open(csv_path, "wb") as f:
        f.write(b"ID,Label\n")
        f.write(rows[order].tobytes())
    meta = pd.DataFrame({"image_id": _id_text(image_hex), "patient_id": _id_text(patient_hex)[patient]})
    meta.to_parquet(meta_path)
    return csv_path, meta_path


def _id_text(hex_bytes: np.ndarray) -> np.ndarray:
    """``ID_<hex>`` strings from the (n, 9) ASCII array of :func:`hex_ids`."""
    return np.char.add("ID_", hex_bytes.view("S9").ravel().astype(str))


# ------------------------------------------------------------------------------------ measurement


def naive_read_labels(path: Path) -> pd.DataFrame:
    """The obvious pandas reader, for comparison: one Python-level string op per row."""
    df = pd.read_csv(path).drop_duplicates()
    parts = df["ID"].str.rsplit("_", n=1, expand=True)
    df["image_id"], df["label"] = parts[0], parts[1]
    return df.pivot(index="image_id", columns="label", values="Label")[list(LABELS)].astype(np.uint8)


def naive_assign_folds(meta: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """The library way: scikit-learn's StratifiedGroupKFold, grouped by patient, stratified on ``any``."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = np.full(len(meta), -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(meta, meta["any"], groups=meta["patient_id"])):
        folds[held_out] = k
    return folds


def prevalence_spread(meta: pd.DataFrame, folds: np.ndarray) -> dict[str, float]:
    """Per label, max - min over folds of the fraction of positive images (0 = perfectly even folds)."""
    by_fold = meta[list(LABELS)].astype(np.float64).groupby(folds).mean()
    return {label: float(by_fold[label].max() - by_fold[label].min()) for label in LABELS}


def child(csv_path: Path, meta_path: Path, naive: bool) -> dict[str, Any]:
    """One measurement in this (fresh) process: seconds per step and this process's peak RSS."""
    from ichdet.cache.folds import assign_folds
    from ichdet.cache.labels import read_labels

    t0 = time.perf_counter()
    wide = naive_read_labels(csv_path) if naive else read_labels(csv_path)
    t1 = time.perf_counter()
    meta = wide.join(pd.read_parquet(meta_path).set_index("image_id"), how="left")
    t2 = time.perf_counter()
    folds = naive_assign_folds(meta, n_folds=5, seed=0) if naive else assign_folds(meta, n_folds=5, seed=0)
    t3 = time.perf_counter()
    if meta["patient_id"].isna().any() or len(wide) != len(meta):
        raise SystemExit("benchmark bug: label file and meta disagree")
    return {
        "read_labels_s": t1 - t0,
        "join_meta_s": t2 - t1,
        "assign_folds_s": t3 - t2,
        "total_s": t3 - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "images": len(wide),
        "fold_sizes": np.bincount(folds).tolist(),
        "prevalence_spread": prevalence_spread(meta, folds),
    }


def run_child(csv_path: Path, meta_path: Path, naive: bool) -> dict[str, Any]:
    """One measurement in a fresh child process."""
    cmd = [sys.executable, __file__, "--child", str(csv_path), str(meta_path)] + (["--naive"] * naive)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def measure(csv_path: Path, meta_path: Path, repeats: int, variants: tuple[bool, ...]) -> dict[bool, dict[str, Any]]:
    """``repeats`` rounds, each running every variant (naive or not) once: interleaved, so load cancels."""
    runs: dict[bool, list[dict[str, Any]]] = {naive: [] for naive in variants}
    for _ in range(repeats):
        for naive in variants:
            runs[naive].append(run_child(csv_path, meta_path, naive))
    return {naive: summarise(r) for naive, r in runs.items()}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the timings, max of the peak RSS, the first run's fold sizes and spread."""
    keys = ("read_labels_s", "join_meta_s", "assign_folds_s", "total_s")
    summary: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    summary["images"], summary["fold_sizes"] = runs[0]["images"], runs[0]["fold_sizes"]
    summary["prevalence_spread"] = runs[0]["prevalence_spread"]
    summary["pass_time"] = summary["read_labels_s"] + summary["assign_folds_s"] <= TARGET_SECONDS
    summary["pass_rss"] = summary["peak_rss_mb"] <= TARGET_RSS_MB
    summary["runs"] = runs
    return summary


def report(name: str, s: dict[str, Any]) -> str:
    """Human-readable lines for one measured reader."""
    return (
        f"{name}: read_labels {s['read_labels_s']:.2f} s | join meta {s['join_meta_s']:.2f} s | "
        f"assign_folds {s['assign_folds_s']:.2f} s (medians)\n"
        f"  read_labels + assign_folds {s['read_labels_s'] + s['assign_folds_s']:.2f} s "
        f"<= {TARGET_SECONDS:.0f} s: {verdict(s['pass_time'])}\n"
        f"  peak RSS {s['peak_rss_mb']:.0f} MB <= {TARGET_RSS_MB:.0f} MB: {verdict(s['pass_rss'])}\n"
        f"  images {s['images']}, fold sizes {s['fold_sizes']}\n"
        f"  per-fold prevalence spread (max - min): "
        + ", ".join(f"{k} {v:.4f}" for k, v in s["prevalence_spread"].items())
    )


def main(argv: list[str] | None = None) -> int:
    """Generate the inputs, measure, print, optionally write JSON; 0 whatever the verdict."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(parser, repeats=3)  # --repeats: fresh processes per reader (median), --json
    parser.add_argument("--baseline", action="store_true", help="also time the naive pandas reader")
    parser.add_argument("--images", type=int, default=N_IMAGES)
    parser.add_argument("--patients", type=int, default=N_PATIENTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], naive=args.naive)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_labels_") as tmp:
        t0 = time.perf_counter()
        csv_path, meta_path = write_inputs(Path(tmp), args.images, args.patients, args.seed)
        rows = (args.images + N_DUPLICATE_IMAGES) * len(LABELS)
        print(
            f"generated {rows:,} rows ({args.images:,} images, {args.patients:,} patients, "
            f"{csv_path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s (not timed)"
        )
        measured = measure(csv_path, meta_path, args.repeats, (False, True) if args.baseline else (False,))
        names = {False: "ichdet", True: "naive (pandas reader + sklearn StratifiedGroupKFold)"}
        results = {names[naive]: summary for naive, summary in measured.items()}
    for name, summary in results.items():
        print(report(name, summary))
    if args.json:
        meta = {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "rows": rows,
            "repeats": args.repeats,
            "targets": {"seconds": TARGET_SECONDS, "rss_mb": TARGET_RSS_MB},
        }
        write_json(args.json, {"setup": meta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
