"""End to end with the real analysis: a tiny trained bundle, ``analyse_study`` and ``ichdet serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from serve_support import ORTHANC, REPO, Orthanc, free_port, make_studies, wait_for, wait_port

TINY = ["model.backbone=resnet18", "data.image_size=64", "train.batch_size=16", "train.num_workers=0",
        "train.device=cpu", "train.epochs=1", "train.warmup_epochs=0.2", "train.channels_last=false"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-member, one-fold bundle of a resnet18 trained for one epoch on tiny synthetic studies."""
    from ichdet.cache.writer import PreprocessOptions, preprocess
    from ichdet.infer import bundle
    from ichdet.models.config import build_config
    from ichdet.synth import SynthSpec, make_dataset
    from ichdet.train.loop import train

    root = tmp_path_factory.mktemp("serve_bundle")
    make_dataset(root / "data", SynthSpec(n_studies=4, n_test_studies=1, size=64, slices_per_study=(8, 10), seed=5))
    preprocess(root / "data" / "stage_2_train_images", root / "cache", root / "data" / "stage_2_train.csv",
               PreprocessOptions(size=64, workers=1, n_folds=2, progress=False))
    train(build_config({}, TINY), root / "cache", root / "run", fold="0", progress=False)
    return bundle.write_bundle([root / "run"], root / "model.ichdet")


def test_analyse_study_real(tiny_bundle: Path, rsna_sample: Path, tmp_path: Path) -> None:
    from ichdet.infer import bundle
    from ichdet.serve import analyse_study

    (uid, files), = make_studies(rsna_sample, tmp_path / "study", n=1, slices=40, size=None).items()
    study_dir = files[0].parent
    out = tmp_path / "out"
    out.mkdir()
    result = analyse_study(study_dir, bundle.load_ensemble(tiny_bundle), out, tta=False, device="cpu")
    studies = json.loads(result.json_path.read_text())["studies"]
    assert [s["study_instance_uid"] for s in studies] == [uid]
    objects = [pydicom.dcmread(p) for p in result.dicom_files]
    assert all(p.is_relative_to(out) for p in result.dicom_files)
    assert sorted(str(ds.Modality) for ds in objects) == ["KO", "OT", "OT", "OT", "SR"]
    assert {str(ds.StudyInstanceUID) for ds in objects} == {uid}
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    for ds in objects:
        if ds.Modality == "OT":
            assert str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) in sources


@pytest.mark.parametrize("changes", [
    {"PatientBirthDate": "DOEJOHN1945"},  # a malformed optional value: the analysis goes on
    {"PatientName": None, "StudyDate": "2019131"},  # a type 2 element absent, a malformed date
])
def test_malformed_optional_header_values_do_not_stop_the_analysis(
        tiny_bundle: Path, rsna_sample: Path, tmp_path: Path, changes: dict[str, str | None]) -> None:
    from ichdet.infer import bundle
    from ichdet.serve import analyse_study

    (uid, files), = make_studies(rsna_sample, tmp_path / "study", n=1, slices=12, size=None).items()
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    out = tmp_path / "out"
    out.mkdir()
    result = analyse_study(files[0].parent, bundle.load_ensemble(tiny_bundle), out, tta=False, device="cpu")
    assert [s["study_instance_uid"] for s in json.loads(result.json_path.read_text())["studies"]] == [uid]
    modalities = [str(pydicom.dcmread(p).Modality) for p in result.dicom_files]
    assert (modalities.count("SR"), modalities.count("KO"), modalities.count("OT")) == (1, 1, 3)


@pytest.mark.skipif(ORTHANC is None, reason="Orthanc not installed (apt-get install orthanc)")
def test_serve_command_with_orthanc(tiny_bundle: Path, rsna_sample: Path, tmp_path: Path) -> None:
    """`ichdet serve` with the real bundle: Orthanc sends a real study, gets the SR and the overlays back."""
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port)
    cmd = [sys.executable, "-m", "ichdet", "serve", "--bundle", str(tiny_bundle), "--spool", str(tmp_path / "spool"),
           "--port", str(node_port), "--allow", "ORTHANC", "--send-to", f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
           "--quiet-seconds", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with (tmp_path / "node.log").open("wb") as log:
        node = subprocess.Popen(cmd, env=env, stderr=log)
    try:
        wait_port(node_port, 60)
        pacs.start()
        studies = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=40, size=None)
        (study_id,) = pacs.upload([f for files in studies.values() for f in files])
        pacs.send_to_node({study_id})
        wait_for(lambda: sorted(pacs.modalities(study_id)).count("OT") == 3 and "SR" in pacs.modalities(study_id),
                 300, "ichdet's SR and secondary captures in Orthanc")
        assert sorted(pacs.modalities(study_id)).count("SR") == 1
        (uid,) = studies
        assert uid not in (tmp_path / "node.log").read_text()  # the log names studies by hash only
    finally:
        node.terminate()
        node.wait(timeout=60)
        pacs.stop()
