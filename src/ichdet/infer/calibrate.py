"""``ichdet calibrate``: a bundle's operating points (and optionally per-label temperatures) re-set on a site's data.

A bundle's thresholds come from its training data's out-of-fold predictions; a site's scanners and
population differ. Calibration predicts the site's labelled cache with the bundle (every member, flip
TTA as ``predict-study``), and per label:

* with ``--temperature``, fits the temperature that minimises the log loss of the ensemble's probabilities
  on the site's images (:func:`ichdet.evaluate.calibration.fit_temperature`), applied after the ensemble
  mean (:meth:`ichdet.infer.members.Ensemble.combine`); without it, the bundle's temperatures stay;
* sets the threshold reaching the asked sensitivity on those (calibrated) probabilities
  (:func:`ichdet.evaluate.metrics.operating_points`).

A label with fewer positive site images than an operating point needs
(:func:`ichdet.evaluate.calibration.positives_needed`) keeps its threshold and temperature, and the
summary says how many it needs. The new bundle is the old one with a new ``manifest.json``: every other
entry (weights, graphs, configs) is copied byte for byte, so its sha256 in the manifest still holds. The
manifest's ``calibration`` records the site data (images, studies, positives per label), the date, the
sensitivity, the temperatures, the labels kept and the thresholds before.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ichdet import __version__
from ichdet.cache.store import PixelCache
from ichdet.errors import IchdetError
from ichdet.evaluate.calibration import apply_temperature, fit_temperature, positives_needed
from ichdet.evaluate.metrics import operating_points
from ichdet.infer.bundle import load_ensemble
from ichdet.infer.members import Ensemble, sha256_bytes
from ichdet.infer.predict import ensemble_probs
from ichdet.io import atomic_path
from ichdet.models.engine import init_runtime
from ichdet.names import LABELS

__all__ = ["LabelCalibration", "calibrate_bundle", "site_probabilities"]


@dataclass(frozen=True)
class LabelCalibration:
    """One label's outcome: site positives (and how many were needed), thresholds and temperature before
    and after, the sensitivity and specificity reached on the site's images; ``kept`` when refused."""

    label: str
    n_pos: int
    n_needed: int
    threshold_before: float
    threshold: float
    temperature: float
    sensitivity: float
    specificity: float

    @property
    def kept(self) -> bool:
        """Whether the label had too few site positives and kept its old threshold and temperature."""
        return self.n_pos < self.n_needed

    def line(self) -> str:
        """One line of the command's summary."""
        if self.kept:
            return (f"{self.label}: kept threshold {self.threshold:.4g}: {self.n_pos} site positives, an operating "
                    f"point needs at least {self.n_needed}")
        return (f"{self.label}: threshold {self.threshold_before:.4g} -> {self.threshold:.4g} (sensitivity "
                f"{self.sensitivity:.3f}, specificity {self.specificity:.3f} on {self.n_pos} site positives), "
                f"temperature {self.temperature:.3g}")


def site_probabilities(ens: Ensemble, cache: PixelCache, device: str = "auto", tta: bool = True) -> np.ndarray:
    """The ensemble's probabilities of every image of ``cache`` before any temperature: float64 (N, 6)."""
    rt = init_runtime(device)
    probs = ensemble_probs(ens.members, cache, rt.device, tta, num_workers=0)
    return dataclasses.replace(ens, temperature=None).combine([p.mean(0) for p in probs])


def _site_labels(cache: PixelCache, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the labelled images of ``cache`` and their 0/1 labels (N, 6); IchdetError if none."""
    labels = cache.index[list(LABELS)].to_numpy(np.float64)
    rows = np.flatnonzero(np.isfinite(labels).all(axis=1))
    if len(rows) == 0:
        raise IchdetError(f"--data {data}: the cache has no labelled image; preprocess the site's studies with "
                          "--labels (a Kaggle-layout label CSV) to calibrate on them")
    return rows, labels[rows]


def _calibrate_labels(ens: Ensemble, truth: np.ndarray, raw: np.ndarray, sensitivity: float,
                      temperature: bool) -> list[LabelCalibration]:
    """Per label: temperature (fitted, or the bundle's) and threshold, or the old ones when too few positives."""
    needed = positives_needed(sensitivity)
    old_t = ens.temperature or dict.fromkeys(LABELS, 1.0)
    temps = np.array([old_t[label] for label in LABELS], np.float64)
    n_pos = truth.sum(axis=0).astype(int)
    for j in range(len(LABELS)):
        if temperature and n_pos[j] >= needed:
            temps[j] = fit_temperature(truth[:, j], raw[:, j])
    probs = apply_temperature(raw, temps)
    points = operating_points(truth, probs, sensitivity)
    out = []
    for j, label in enumerate(LABELS):
        ok = n_pos[j] >= needed
        threshold = float(points["threshold"].iloc[j]) if ok else ens.thresholds[label]
        kept_probs = probs[:, j]
        pos, neg = kept_probs[truth[:, j] == 1], kept_probs[truth[:, j] == 0]
        out.append(LabelCalibration(
            label, int(n_pos[j]), needed, ens.thresholds[label], threshold, float(temps[j]),
            float(np.mean(pos >= threshold)) if len(pos) else math.nan,
            float(np.mean(neg < threshold)) if len(neg) else math.nan))
    return out


def _json_number(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def _manifest(old: dict[str, Any], results: list[LabelCalibration], cache: PixelCache, rows: np.ndarray,
              sensitivity: float, temperature: bool) -> dict[str, Any]:
    """``old`` with the new thresholds, their source and the ``calibration`` record."""
    index = cache.index.iloc[rows]
    manifest = dict(old)
    manifest["thresholds"] = {r.label: r.threshold for r in results}
    manifest["operating_points"] = {r.label: {"threshold": r.threshold, "sensitivity": _json_number(r.sensitivity),
                                              "specificity": _json_number(r.specificity), "n_pos": r.n_pos,
                                              "n_neg": int(len(rows) - r.n_pos)} for r in results}
    kept = [r.label for r in results if r.kept]
    manifest["thresholds_source"] = (f"site operating points at sensitivity {sensitivity}"
                                     + (f" (kept from before for {kept}: too few site positives)" if kept else ""))
    temps = {r.label: r.temperature for r in results}
    has_t = temperature or (old.get("calibration") or {}).get("temperature") is not None
    manifest["calibration"] = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "ichdet_version": __version__,
        "sensitivity": sensitivity, "temperature_fitted": temperature,
        "temperature": temps if has_t else None,
        "site_data": {"images": len(rows), "studies": int(index["study_uid"].nunique()),
                      "series": int(index["series_uid"].nunique()),
                      "positives": {r.label: r.n_pos for r in results}},
        "kept_labels": {r.label: f"{r.n_pos} site positives, {r.n_needed} needed" for r in results if r.kept},
        "thresholds_before": {r.label: r.threshold_before for r in results},
        "previous": old.get("calibration"),
    }
    if has_t:  # an older ichdet would ignore the temperatures and predict other probabilities: refuse it there
        manifest["format_version"] = max(3, int(old.get("format_version", 1)))
    return manifest


def _check_paths(bundle: Path, out: Path) -> None:
    if not bundle.is_file():
        raise IchdetError(f"--bundle {bundle}: no such bundle file; write one with `ichdet bundle`")
    if out.resolve() == bundle.resolve() or (out.exists() and out.samefile(bundle)):
        raise IchdetError(f"--out {out} is the --bundle itself; write the site's bundle to a new file "
                          "(the original stays as it is)")


def calibrate_bundle(bundle: Path, data: Path, out: Path, sensitivity: float = 0.9, temperature: bool = False,
                     device: str = "auto", tta: bool = True) -> list[LabelCalibration]:
    """Write ``out``: ``bundle`` calibrated on the labelled cache ``data`` (see module doc); per-label outcomes."""
    bundle, out = Path(bundle), Path(out)
    _check_paths(bundle, out)
    if not 0.0 < sensitivity <= 1.0:
        raise IchdetError(f"--sensitivity {sensitivity} must be in (0, 1], e.g. 0.9")
    ens = load_ensemble(bundle)  # verified: every file against its sha256
    cache = PixelCache(data)
    rows, truth = _site_labels(cache, data)
    raw = site_probabilities(ens, cache, device, tta)[rows]
    results = _calibrate_labels(ens, truth, raw, sensitivity, temperature)
    data_bytes = bundle.read_bytes()
    if ens.manifest["bundle_sha256"] != sha256_bytes(data_bytes):
        raise IchdetError(f"--bundle {bundle} changed while it was being calibrated; run calibrate again")
    with zipfile.ZipFile(io.BytesIO(data_bytes)) as zin:
        old = json.loads(zin.read("manifest.json"))
        entries = [(info, zin.read(info)) for info in zin.infolist() if info.filename != "manifest.json"]
    manifest = _manifest(old, results, cache, rows, sensitivity, temperature)
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
            zout.writestr("manifest.json", json.dumps(manifest, indent=2, allow_nan=False))
            for info, payload in entries:
                zout.writestr(info.filename, payload)  # the same bytes: the manifest's sha256 still holds
        load_ensemble(tmp)  # it loads (every file verified) before it replaces anything at --out
    return results
