"""The ``ichdet`` command: wiring only; every step lives in its own module."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from ichdet.errors import IchdetError, RunFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Intracranial hemorrhage detection on head CT (RSNA 2019 labels).")


P = ParamSpec("P")
R = TypeVar("R")


def _fail(message: object, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def command(fn: Callable[P, R]) -> Callable[P, R]:
    """Register ``fn`` as an ``ichdet`` command whose expected failures become one line on stderr.

    Bad input (an :class:`IchdetError`) exits 2; a run that failed (:class:`RunFailed`, or the
    operating system refusing a read or write: missing file, permission, full disk) exits 1.
    Anything else is a bug and keeps its traceback.
    """
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except RunFailed as err:
            raise _fail(err, 1) from None
        except IchdetError as err:
            raise _fail(err, 2) from None
        except OSError as err:
            raise _fail(err, 1) from None
    app.command()(wrapper)
    return wrapper


@command
def synth(out: Annotated[Path, typer.Option(help="folder to write the Kaggle-layout data set into")],
          studies: Annotated[int, typer.Option(help="labelled studies")] = 12,
          test_studies: Annotated[int, typer.Option(help="unlabelled test studies")] = 2,
          size: Annotated[int, typer.Option(help="slice size in pixels")] = 128,
          seed: int = 0) -> None:
    """Write synthetic head-CT studies (skull, brain, ventricles, five bleed types) as DICOM."""
    from ichdet.synth import SynthSpec, make_dataset

    summary = make_dataset(out, SynthSpec(n_studies=studies, n_test_studies=test_studies, size=size,
                                          seed=seed))
    typer.echo(str(summary))


@command
def preprocess(images: Annotated[Path, typer.Option(help="folder of DICOM files (searched recursively)")],
               out: Annotated[Path, typer.Option(help="cache folder to write (or resume)")],
               labels: Annotated[Path | None, typer.Option(help="Kaggle label CSV (stage_2_train.csv)")] = None,
               size: Annotated[int, typer.Option(help="stored image side in pixels")] = 512,
               workers: Annotated[int | None, typer.Option(help="processes (default: all cores)")] = None,
               folds: Annotated[int, typer.Option(help="patient-grouped folds for labelled images")] = 5,
               seed: Annotated[int, typer.Option(help="fold assignment seed")] = 0,
               strict: Annotated[bool, typer.Option(help="exit 1 if any file was skipped")] = False) -> None:
    """DICOM folder -> cache (index.parquet, pixel store, errors.csv); resumes an interrupted run."""
    from ichdet.cache import PreprocessOptions
    from ichdet.cache import preprocess as run

    summary = run(images, out, labels, PreprocessOptions(size=size, workers=workers, n_folds=folds,
                                                         seed=seed, progress=sys.stderr.isatty()))
    typer.echo("\n".join(summary.lines()))
    if strict and summary.n_errors:
        typer.secho(f"--strict: {summary.n_errors} file(s) skipped, see {out / 'errors.csv'}", err=True)
        raise typer.Exit(1)


@command
def train(config: Annotated[Path | None, typer.Option(help="YAML config (configs/*.yaml)")] = None,
          data: Annotated[Path, typer.Option(help="cache folder from `ichdet preprocess`")] = Path("cache"),
          out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/run"),
          fold: Annotated[str, typer.Option(help="fold number, or all")] = "all",
          resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
          set_: Annotated[list[str] | None, typer.Option("--set", help="override: key=value")] = None) -> None:
    """Train one fold or all folds (launch with torchrun for several GPUs or nodes)."""
    from ichdet.config import load_config
    from ichdet.train import train as run

    if config is None and resume and (out / "config.yaml").exists():
        config = out / "config.yaml"
    cfg = load_config(config, set_ or [])
    results = run(cfg, data, out, fold=fold, resume=resume, progress=sys.stderr.isatty())
    for r in results:
        typer.echo(f"fold {r['fold']}: best val weighted log loss {r['val_loss']:.4f} at epoch {r['epoch']} "
                   f"({r['epochs']} epochs)")
    typer.echo(f"run: {out}")


@command
def predict(data: Annotated[Path, typer.Option(help="cache folder to predict")],
            out: Annotated[Path, typer.Option(help="predictions parquet to write")],
            run: Annotated[list[Path] | None, typer.Option(help="run folder (repeat for several models)")] = None,
            bundle: Annotated[Path | None, typer.Option(help="model bundle from `ichdet bundle` (instead of --run)")]
            = None,
            tta: Annotated[bool, typer.Option("--tta/--no-tta", help="average with a horizontal flip")] = True,
            device: str = "auto") -> None:
    """Predict every image of a cache with every fold of each run (or of each bundle member)."""
    from ichdet.io import write_parquet_atomic
    from ichdet.predict import predict_runs

    preds = predict_runs(list(run or []), data, tta=tta, device=device, progress=sys.stderr.isatty(), bundle=bundle)
    write_parquet_atomic(preds, out)
    typer.echo(f"{out}: {preds['image_id'].nunique()} images x {len(preds.groupby(['model', 'fold']))} "
               "model folds")


def _model_weight(item: str) -> tuple[str, float]:
    """``model=number`` from ``--weight``; IchdetError naming the bad item otherwise."""
    name, _, value = item.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = float("nan")
    if not name or not weight >= 0:
        raise IchdetError(f"--weight {item!r}: expected model=number >= 0, e.g. --weight resnet34=2")
    return name, weight


@command
def ensemble(preds: Annotated[list[Path], typer.Argument(help="prediction parquets from `ichdet predict`")],
             out: Annotated[Path, typer.Option(help="submission CSV to write")],
             sample_submission: Annotated[Path | None, typer.Option(help="Kaggle sample submission")] = None,
             weight: Annotated[list[str] | None, typer.Option(help="model=weight (default: equal)")] = None,
             ) -> None:
    """Mean over folds per model, then over models -> a Kaggle submission (validated if a sample is given)."""
    from ichdet.ensemble import ensemble as combine
    from ichdet.ensemble import read_predictions
    from ichdet.labels import validate_submission, write_submission

    weights = dict(_model_weight(w) for w in weight) if weight else None
    wide = combine(read_predictions(preds), weights)
    write_submission(wide, out)
    if sample_submission is not None:
        validate_submission(out, sample_submission)
    typer.echo(f"{out}: {len(wide)} images" + (", matches the sample submission" if sample_submission else ""))


@command
def evaluate(pred: Annotated[Path, typer.Option(help="submission CSV or predictions parquet")],
             labels: Annotated[Path, typer.Option(help="Kaggle label CSV")],
             plot: Annotated[Path | None, typer.Option(help="ROC curves PNG (default: next to --pred)")] = None,
             ) -> None:
    """Weighted log loss (any x2), per-label log loss and ROC AUC, and ROC curves."""
    from ichdet.ensemble import evaluate as score

    plot = plot or pred.with_name(pred.stem + "_roc.png")
    table = score(pred, labels, plot)
    typer.echo(table.to_string(float_format=lambda v: f"{v:.4f}"))
    typer.echo(f"ROC curves: {plot}")


@command
def demo(out: Annotated[Path, typer.Option(help="folder for every artifact")] = Path("demo"),
         seed: int = 0) -> None:
    """The whole pipeline on synthetic data: synth, preprocess, train 2 models x 2 folds, ensemble, score."""
    from ichdet.demo import run_demo

    run_demo(out, seed=seed, echo=typer.echo)


@command
def bundle(run: Annotated[list[Path], typer.Option(help="run folder (repeat for several models)")],
           out: Annotated[Path, typer.Option(help="bundle file to write, e.g. model.ichdet")],
           weight: Annotated[list[str] | None, typer.Option(help="member=weight (default: equal)")] = None,
           labels: Annotated[Path | None, typer.Option(help="label CSV of the runs' training cache: thresholds "
                                                              "from the out-of-fold predictions")] = None,
           sensitivity: Annotated[float, typer.Option(help="target sensitivity of the thresholds")] = 0.95,
           ) -> None:
    """Pack runs into one model file: weights (safetensors), configs, weights, thresholds, sha256 manifest."""
    from ichdet.bundle import load_ensemble, write_bundle

    weights = dict(_model_weight(w) for w in weight) if weight else None
    path = write_bundle(list(run), out, weights, sensitivity, labels)
    ens = load_ensemble(path)
    typer.echo(f"{path}: {len(ens.members)} members, {sum(len(m.folds) for m in ens.members)} folds, "
               f"sha256 {ens.manifest['bundle_sha256']}")
    typer.echo("thresholds: " + ", ".join(f"{k} {v:.4g}" for k, v in ens.thresholds.items())
               + f" ({ens.manifest['thresholds_source']})")


@command
def predict_study(path: Annotated[Path, typer.Argument(help="folder of DICOM files (any layout, any names)")],
                  bundle: Annotated[Path | None, typer.Option(help="model bundle from `ichdet bundle`")] = None,
                  run: Annotated[list[Path] | None, typer.Option(help="run folder (instead of --bundle)")] = None,
                  out: Annotated[Path, typer.Option(help="result JSON to write")] = Path("result.json"),
                  device: str = "auto",
                  tta: Annotated[bool, typer.Option("--tta/--no-tta", help="average with a horizontal flip")] = True,
                  include_phi: Annotated[bool, typer.Option(
                      "--include-phi", help="put patient name, ID, birth date, accession and institution in the "
                                            "result")] = False,
                  ) -> None:
    """Analyse every axial CT series of every study under PATH; write one result JSON."""
    from ichdet.bundle import load_ensemble
    from ichdet.study import predict_study as run_study
    from ichdet.study_result import write_result

    if not path.is_dir():
        raise IchdetError(f"{path}: not a folder; pass the folder that holds the study's DICOM files")
    ensemble = load_ensemble(bundle, list(run or []))
    prediction = run_study(path, ensemble, tta=tta, device=device, include_phi=include_phi)
    write_result(prediction.result, out)
    for study in prediction.result["studies"]:
        summary = study["summary"]
        if not summary["analysed"]:
            typer.echo(f"{study['study_instance_uid']}: no usable series")
            continue
        called = [k for k, v in summary["called"].items() if v and k != "any"]
        typer.echo(f"{study['study_instance_uid']}: any {summary['probability']['any']:.3f} -> "
                   + ("hemorrhage suspected" + (f" ({', '.join(called)})" if called else "")
                      if summary["hemorrhage"] else "no hemorrhage called"))
    t = prediction.result["timings_s"]
    typer.echo(f"{out}: read {t['read_headers_and_order'] + t['read_pixels']:.2f} s, inference "
               f"{t['inference']:.2f} s, write {t['write']:.3f} s")


def main() -> None:
    """Entry point for ``python -m ichdet``."""
    app()
