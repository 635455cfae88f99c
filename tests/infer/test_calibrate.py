"""``ichdet calibrate``: site operating points (and temperatures) on a labelled cache, weights byte for byte."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from study_support import tiny_runs
from typer.testing import CliRunner

from ichdet.cache.labels import LABELS
from ichdet.cache.store import PixelCache
from ichdet.cli import app
from ichdet.evaluate.calibration import apply_temperature, fit_temperature, positives_needed
from ichdet.evaluate.metrics import per_label_log_loss
from ichdet.infer.bundle import load_ensemble, write_bundle
from ichdet.infer.calibrate import calibrate_bundle
from ichdet.infer.predict import ensemble_probs


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle of tiny run ``a`` and the labelled cache standing in for the site's (positives: any 31,
    subdural 14, the other subtypes fewer than 10)."""
    a, _, _ = tiny_runs(tmp_path_factory)
    bundle = write_bundle([a], tmp_path_factory.mktemp("calib") / "model.ichdet")
    return bundle, a.parents[1] / "cache"


def _probs(bundle: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's ensemble probabilities of every labelled image (temperature applied) and the labels."""
    ens = load_ensemble(bundle)
    pc = PixelCache(cache)
    probs = ens.combine([p.mean(0) for p in ensemble_probs(ens.members, pc, torch.device("cpu"), num_workers=0)])
    return probs, pc.index[list(LABELS)].to_numpy(np.float64)


def _entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


@pytest.mark.parametrize(("sensitivity", "temperature"), [(0.9, False), (0.9, True), (0.8, True)])
def test_calibrate_reaches_the_sensitivity_with_unchanged_weights(site: tuple[Path, Path], tmp_path: Path,
                                                                 sensitivity: float, temperature: bool) -> None:
    bundle, cache = site
    out = tmp_path / "site.ichdet"
    results = {r.label: r for r in calibrate_bundle(bundle, cache, out, sensitivity, temperature, device="cpu")}
    probs, truth = _probs(out, cache)
    ens, before = load_ensemble(out), load_ensemble(bundle)
    needed = positives_needed(sensitivity)
    calibrated = [label for label in LABELS if truth[:, LABELS.index(label)].sum() >= needed]
    assert "any" in calibrated and "epidural" not in calibrated  # both cases are exercised
    for j, label in enumerate(LABELS):
        if label in calibrated:
            pos = probs[truth[:, j] == 1, j]
            assert np.mean(pos >= ens.thresholds[label]) >= sensitivity
            assert not results[label].kept
        else:
            assert ens.thresholds[label] == before.thresholds[label]
            assert results[label].kept and f"an operating point needs at least {needed}" in results[label].line()
    old, new = _entries(bundle), _entries(out)
    assert sorted(old) == sorted(new)
    assert all(old[name] == new[name] for name in old if name != "manifest.json")
    calibration = json.loads(new["manifest.json"])["calibration"]
    assert calibration["site_data"]["images"] == len(truth) and calibration["site_data"]["studies"] == 6
    assert calibration["site_data"]["positives"] == {label: int(truth[:, j].sum()) for j, label in enumerate(LABELS)}
    assert (calibration["temperature"] is not None) == temperature
    assert ens.manifest["calibration"]["sensitivity"] == sensitivity


def test_a_fitted_temperature_lowers_the_site_log_loss(site: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, cache = site
    out = tmp_path / "t.ichdet"
    calibrate_bundle(bundle, cache, out, 0.9, temperature=True, device="cpu")
    raw, truth = _probs(bundle, cache)
    scaled, _ = _probs(out, cache)
    before, after = per_label_log_loss(truth, raw), per_label_log_loss(truth, scaled)
    temps = load_ensemble(out).temperature
    assert temps is not None
    for label in ("any", "subdural"):
        assert temps[label] != 1.0 and after[label] <= before[label]
    assert temps["epidural"] == 1.0  # too few positives: not fitted


@pytest.mark.parametrize("same", ["identical", "another name for it"])
def test_calibrate_refuses_to_overwrite_its_bundle(site: tuple[Path, Path], tmp_path: Path, same: str) -> None:
    bundle, cache = site
    before = bundle.read_bytes()
    target = bundle if same == "identical" else tmp_path / "link.ichdet"
    if target != bundle:
        target.symlink_to(bundle)
    result = CliRunner().invoke(app, ["calibrate", "--bundle", str(bundle), "--data", str(cache), "--out", str(target)])
    assert result.exit_code == 2 and "is the --bundle itself" in result.output
    assert bundle.read_bytes() == before


def test_cli_calibrate(site: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, cache = site
    out = tmp_path / "s.ichdet"
    result = CliRunner().invoke(app, ["calibrate", "--bundle", str(bundle), "--data", str(cache), "--out", str(out),
                                      "--sensitivity", "0.9", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "epidural: kept threshold 0.5: 6 site positives, an operating point needs at least 10" in result.output
    assert f"{out}: calibrated copy of {bundle} (every weight file unchanged)" in result.output


@pytest.mark.parametrize(("sensitivity", "needed"), [(0.5, 10), (0.9, 10), (0.95, 20), (0.99, 100), (1.0, 10)])
def test_positives_needed(sensitivity: float, needed: int) -> None:
    assert positives_needed(sensitivity) == needed


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.0])
def test_fit_temperature_recovers_the_scaling(true_t: float) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 40000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z / true_t))).astype(float)
    p = 1 / (1 + np.exp(-z))
    assert fit_temperature(y, p) == pytest.approx(true_t, rel=0.05)
    assert apply_temperature(np.array([0.5, 0.9]), 2.0)[0] == pytest.approx(0.5)


@pytest.mark.parametrize("p", [0.0, 1e-12, 0.48329675197601324, 0.5, 0.9999999, 1.0])
def test_temperature_one_gives_the_probability_back_exactly(p: float) -> None:
    """No logit round trip at T = 1: a threshold set on ``p`` is met by ``p`` (an ulp off would miss it)."""
    assert apply_temperature(np.array([p, p]), np.array([1.0, 2.0]))[0] == p
