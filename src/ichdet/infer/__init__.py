"""Inference: ensemble members (run folders or a bundle), bundles, one call's CNN passes, ``predict``.

    from ichdet.infer import load_ensemble, predict_runs
    ens = load_ensemble("model.ichdet")         # members, weights, thresholds
    table = predict_runs([], "cache/", bundle="model.ichdet")
"""

from __future__ import annotations

from ichdet.infer.bundle import Ensemble, Member, load_ensemble, write_bundle
from ichdet.infer.predict import check_out, ensemble_probs, member_tables, predict_run, predict_runs

__all__ = ["Ensemble", "Member", "check_out", "ensemble_probs", "load_ensemble", "member_tables", "predict_run",
           "predict_runs", "write_bundle"]
