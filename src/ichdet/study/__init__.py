"""One study for a reader: series selection and order, ensemble predictions, the result JSON, Grad-CAM,
the HTML report and the DICOM outputs.

    from ichdet.study import predict_study, write_result
    prediction = predict_study(Path("export/"), load_ensemble("model.ichdet"))
    write_result(prediction.result, "result.json")
"""

from __future__ import annotations

from ichdet.study.predict import StudyPrediction, predict_study
from ichdet.study.result import build_result, write_result
from ichdet.study.scan import StudyScan, StudySlice, scan_folder

__all__ = ["StudyPrediction", "StudyScan", "StudySlice", "build_result", "predict_study", "scan_folder",
           "write_result"]
