"""The command line: names other tools rely on, exit codes, summaries."""

from __future__ import annotations

import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from ichdet.cache.labels import LABELS, write_labels
from ichdet.cli import app, handle_errors, one_line
from ichdet.errors import IchdetError, RunFailed

runner = CliRunner()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    result = runner.invoke(app, ["synth", "--out", str(out), "--studies", "3", "--test-studies", "1",
                                 "--size", "64", "--seed", "5"])
    assert result.exit_code == 0, result.output
    return out


def test_synth_writes_the_kaggle_layout(synth_dir: Path) -> None:
    assert sorted(p.name for p in synth_dir.iterdir() if not p.name.startswith(".")) == [  # not lock, marker
        "stage_2_sample_submission.csv", "stage_2_test_images", "stage_2_train.csv", "stage_2_train_images"]


@pytest.mark.parametrize(("strict", "exit_code"), [(False, 0), (True, 1)])
def test_preprocess_reports_bad_files(synth_dir: Path, tmp_path: Path, strict: bool, exit_code: int) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in (synth_dir / "stage_2_train_images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.dcm").write_bytes(b"not a dicom file")
    args = ["preprocess", "--images", str(images), "--labels", str(synth_dir / "stage_2_train.csv"),
            "--out", str(tmp_path / "cache"), "--size", "64", "--folds", "2", "--workers", "1"]
    result = runner.invoke(app, args + (["--strict"] if strict else []))
    assert result.exit_code == exit_code, result.output
    n_good = len(list((synth_dir / "stage_2_train_images").iterdir()))
    assert f"images: {n_good}  skipped (see errors.csv): 1" in result.output
    errors = pd.read_csv(tmp_path / "cache" / "errors.csv")
    assert errors["path"].tolist() == ["broken.dcm"]


def test_preprocess_bad_labels_fail_before_pixel_work(synth_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("ID,Label\nID_abc_epidural,7\n")
    result = runner.invoke(app, ["preprocess", "--images", str(synth_dir / "stage_2_train_images"),
                                 "--labels", str(bad), "--out", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert "line 2" in result.output
    assert not (tmp_path / "cache").exists()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ["synth", "preprocess", "train", "predict", "ensemble", "evaluate", "demo"]:
        assert name in result.output


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = runner.invoke(app, ["trian"])
    assert result.exit_code == 2
    assert "No such command 'trian'" in result.output


def test_train_rejects_an_unknown_config_key_before_reading_data(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "no_cache"), "--out", str(tmp_path / "r"),
                                 "--set", "train.epoch=2"])
    assert result.exit_code == 2
    assert "unknown config key 'train.epoch'" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("weight", ["resnet34", "resnet34=", "=2", "resnet34=two", "resnet34=-1"])
def test_ensemble_rejects_bad_weights(tmp_path: Path, weight: str) -> None:
    result = runner.invoke(app, ["ensemble", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "s.csv"),
                                 "--weight", weight])
    assert result.exit_code == 2
    assert f"--weight '{weight}': expected model=number" in result.output
    assert not (tmp_path / "s.csv").exists()


def _prediction_file(tmp_path: Path, ids: list[str], p: float = 0.25, name: str = "p.parquet") -> Path:
    rows = [{"image_id": i, "model": "m", "fold": f, **dict.fromkeys(LABELS, p)} for i in ids for f in (0, 1)]
    pd.DataFrame(rows).to_parquet(tmp_path / name)
    return tmp_path / name


def test_ensemble_writes_a_submission_and_refuses_a_bad_sample_without_writing(tmp_path: Path) -> None:
    preds = _prediction_file(tmp_path, ["ID_1", "ID_2"])
    out = tmp_path / "s.csv"
    result = runner.invoke(app, ["ensemble", str(preds), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{out}: 2 images" in result.output
    before = out.read_bytes()
    sample = tmp_path / "sample.csv"
    sample.write_text("ID,Label\n" + "".join(f"ID_9_{lab},0.5\n" for lab in LABELS))
    result = runner.invoke(app, ["ensemble", str(preds), "--out", str(out), "--sample-submission", str(sample)])
    assert result.exit_code == 2
    assert "6 ids missing: ID_9_epidural" in result.output
    assert out.read_bytes() == before  # the refused submission never reached --out


def test_ensemble_writes_a_wide_csv_for_hospital_ids(tmp_path: Path) -> None:
    preds = _prediction_file(tmp_path, ["1.2.840.1", "1.2.840.2"])
    result = runner.invoke(app, ["ensemble", str(preds), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert "wide prediction CSV (image_id + 6 labels): the image ids are not Kaggle ids" in result.output
    assert (tmp_path / "p.csv").read_text().startswith("image_id,epidural,")


@pytest.mark.parametrize(("existing", "force", "exit_code"), [
    (b"my notes\n", False, 2),   # a file ichdet did not write: refused
    (b"my notes\n", True, 0),    # unless --force
    (b"ID,Label\nID_1_any,0.5\n", False, 0),  # an earlier submission: replaced
    (None, False, 2),            # --out is a folder
])
def test_ensemble_out_is_checked(tmp_path: Path, existing: bytes | None, force: bool, exit_code: int) -> None:
    preds = _prediction_file(tmp_path, ["ID_1"])
    out = tmp_path / "out.csv"
    if existing is None:
        out.mkdir()
    else:
        out.write_bytes(existing)
    result = runner.invoke(app, ["ensemble", str(preds), "--out", str(out)] + (["--force"] if force else []))
    assert result.exit_code == exit_code, result.output
    if exit_code:
        assert ("is a folder" if existing is None else "pass --force to replace it") in result.output
        assert existing is None or out.read_bytes() == existing


@pytest.mark.parametrize(("args", "match"), [
    (["--weight", "m=0"], "weights are all zero"),
    (["--weight", "m=inf"], "--weight 'm=inf': expected model=number"),
])
def test_ensemble_refuses_zero_or_infinite_weights(tmp_path: Path, args: list[str], match: str) -> None:
    preds = _prediction_file(tmp_path, ["ID_1"])
    result = runner.invoke(app, ["ensemble", str(preds), "--out", str(tmp_path / "s.csv"), *args])
    assert result.exit_code == 2
    assert match in result.output
    assert not (tmp_path / "s.csv").exists()


def test_ensemble_refuses_a_nan_by_name(tmp_path: Path) -> None:
    preds = _prediction_file(tmp_path, ["ID_1", "ID_2"])
    table = pd.read_parquet(preds)
    table.loc[3, "epidural"] = float("nan")
    table.to_parquet(preds)
    result = runner.invoke(app, ["ensemble", str(preds), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2
    assert "first at row 4 (image 'ID_2'), label 'epidural': nan" in result.output


def _labels(tmp_path: Path) -> Path:
    truth = pd.DataFrame(0, index=pd.Index(["ID_1", "ID_2"], name="image_id"), columns=list(LABELS))
    truth.loc["ID_2"] = 1
    return write_labels(truth, tmp_path / "labels.csv")


def test_evaluate_prints_scores_and_writes_plots(tmp_path: Path) -> None:
    preds = _prediction_file(tmp_path, ["ID_1", "ID_2"])
    result = runner.invoke(app, ["evaluate", "--pred", str(preds), "--labels", str(_labels(tmp_path)),
                                 "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    for text in ["slice level (2 images)", "expected calibration error", "operating points at sensitivity >= 0.95",
                 "study level: not computed", "bootstrap 95% confidence intervals", "weighted "]:
        assert text in result.output
    assert (tmp_path / "p_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "p_reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_prints_the_score_when_the_plot_cannot_be_written(tmp_path: Path) -> None:
    preds = _prediction_file(tmp_path, ["ID_1", "ID_2"])
    (tmp_path / "blocker").write_text("")  # a file where the plot's folder should be
    result = runner.invoke(app, ["evaluate", "--pred", str(preds), "--labels", str(_labels(tmp_path)),
                                 "--bootstrap", "5", "--plot", str(tmp_path / "blocker" / "roc.png")])
    assert result.exit_code == 1
    assert "weighted " in result.output  # the score came first
    assert "the scores above are complete; could not write the plot(s): " in result.output


def test_evaluate_refuses_to_overwrite_a_foreign_plot_path(tmp_path: Path) -> None:
    preds = _prediction_file(tmp_path, ["ID_1", "ID_2"])
    (tmp_path / "p_roc.png").write_text("not a png")
    result = runner.invoke(app, ["evaluate", "--pred", str(preds), "--labels", str(_labels(tmp_path))])
    assert result.exit_code == 2
    assert "p_roc.png exists and is not an ichdet output" in result.output
    assert (tmp_path / "p_roc.png").read_text() == "not a png"


@pytest.mark.parametrize(("command", "code"), [
    (["evaluate", "--pred", "{tmp}/absent.parquet", "--labels", "{tmp}/absent.csv"], 2),
    (["ensemble", "{tmp}/absent.parquet", "--out", "{tmp}/s.csv"], 2),
    (["predict", "--run", "{tmp}/run", "--data", "{tmp}/cache", "--out", "{tmp}"], 2),
    (["ensemble", "{tmp}", "--out", "{tmp}/s.csv"], 2),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, command: list[str], code: int) -> None:
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in command])
    assert result.exit_code == code, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output


class _Held:
    """Stands for what a failing command's frame holds (a DataLoader iterator with workers, a pool)."""


@pytest.mark.parametrize(("error", "code"), [(IchdetError, 2), (RunFailed, 1), (FileNotFoundError, 1)])
def test_a_failed_command_releases_what_its_frames_held(error: type[Exception], code: int) -> None:
    # The exit must not keep the error's traceback alive (it did through __context__): its frames'
    # objects would then be finalised during interpreter shutdown, the cause of the exit-134 aborts.
    held: list[weakref.ref[_Held]] = []

    def failing() -> None:
        thing = _Held()
        held.append(weakref.ref(thing))
        raise error("bad input")

    with pytest.raises(typer.Exit) as info:
        handle_errors(failing)()
    assert info.value.exit_code == code
    assert info.value.__context__ is None
    assert held[0]() is None


class _Failing(torch.utils.data.Dataset[int]):
    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        raise self.error("/cache: shard shard_00001.npy changed")


@pytest.mark.parametrize(("error", "code"), [(IchdetError, 2), (RunFailed, 1), (FileNotFoundError, 1)])
def test_an_error_in_a_data_loader_worker_is_one_line(error: type[Exception], code: int,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def failing() -> None:
        for _ in torch.utils.data.DataLoader(_Failing(error), num_workers=1):  # torch adds the worker's traceback
            pass

    with pytest.raises(typer.Exit) as info:
        handle_errors(failing)()
    assert info.value.exit_code == code
    assert capsys.readouterr().err == "error: /cache: shard shard_00001.npy changed (in data-loader worker 0)\n"


@pytest.mark.parametrize("message", ["plain", "Caught IchdetError in DataLoader worker process 0.\nno traceback"])
def test_one_line_keeps_other_messages(message: str) -> None:
    assert one_line(message) == message
