"""Scoring: the challenge's metric and its relatives, prediction tables and the ensembling rule, ``evaluate``.

No torch here: ``evaluate`` and the ensemble run on a machine without a GPU stack.

    from ichdet.evaluate import weighted_log_loss
    weighted_log_loss(y_true, y_pred)            # (N, 6) arrays in ichdet.LABELS order
"""

from __future__ import annotations

from ichdet.evaluate.ensembling import ensemble, load_prediction_table, read_predictions, write_ensemble
from ichdet.evaluate.evaluation import Evaluation, evaluate
from ichdet.evaluate.metrics import operating_points, per_label_auc, study_level, weighted_log_loss

__all__ = ["Evaluation", "ensemble", "evaluate", "load_prediction_table", "operating_points", "per_label_auc",
           "read_predictions", "study_level", "weighted_log_loss", "write_ensemble"]
