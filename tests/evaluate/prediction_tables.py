"""Hand-made prediction tables shared by the ensemble and evaluation tests."""

from __future__ import annotations

import pandas as pd

from ichdet.names import LABELS


def preds(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    """(image, model, fold, p) -> the predict table with p for every label."""
    df = pd.DataFrame(rows, columns=["image_id", "model", "fold", "p"])
    for name in LABELS:
        df[name] = df["p"]
    return df.drop(columns="p")


# model a: folds 0.2 and 0.4 -> 0.3; model b: one fold 0.9. Folds first, then models: 0.6
# (a flat mean over the three rows would give 0.5).
ROWS = [("ID_1", "a", 0, 0.2), ("ID_1", "a", 1, 0.4), ("ID_1", "b", 0, 0.9),
        ("ID_2", "a", 0, 0.0), ("ID_2", "a", 1, 0.0), ("ID_2", "b", 0, 1.0)]
