"""The ``ichdet`` command: wiring only; every step lives in its own module."""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ParamSpec, TypeVar

import typer
from typer.core import TyperOption

from ichdet import __version__
from ichdet.errors import IchdetError, RunFailed

if TYPE_CHECKING:
    from ichdet.study.html import ReportFigures
    from ichdet.study.predict import StudyPrediction

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Intracranial hemorrhage detection on head CT (RSNA 2019 labels).")

_option_type = TyperOption.display_type_rich


def _flag_type(self: TyperOption, ctx: typer.Context) -> str | None:
    """No ``<bool>`` after a flag in --help (typer's rich help prints one; its plain help does not)."""
    return None if self.is_flag else _option_type(self, ctx)


TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign,assignment]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ichdet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Intracranial hemorrhage detection on head CT (RSNA 2019 labels)."""


P = ParamSpec("P")
R = TypeVar("R")


def _fail(message: object, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


#: How torch re-raises a data-loader worker's exception: its type, with the worker's traceback as message.
_WORKER_ERROR = re.compile(r"Caught (?P<kind>\w+) in DataLoader worker process (?P<worker>\d+)\.\nOriginal Traceback")


def one_line(message: str) -> str:
    """``message`` as the CLI prints it: a data-loader worker's error reduced to its own message.

    An ichdet error raised in a DataLoader worker reaches the command as an error of the same type
    whose message is "Caught <type> in DataLoader worker process N" and the worker's whole traceback.
    """
    found = _WORKER_ERROR.match(message)
    if found is None:
        return message
    for line in reversed(message.splitlines()):
        head, sep, own = line.partition(f"{found['kind']}: ")
        if sep and (not head or head.endswith(".")):  # "ichdet.errors.IchdetError: ..." or "OSError: ..."
            return f"{own} (in data-loader worker {found['worker']})"
    return message


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` with its expected failures turned into one line on stderr and an exit code.

    Bad input (an :class:`IchdetError`) exits 2; a run that failed (:class:`RunFailed`, or the
    operating system refusing a read or write: missing file, permission, full disk) exits 1.
    Anything else is a bug and keeps its traceback.
    """
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except RunFailed as err:
            message, code = str(err), 1
        except IchdetError as err:
            message, code = str(err), 2
        except OSError as err:
            message, code = str(err), 1
        # Out here the error is gone, and with it the traceback whose frames can hold DataLoader iterators
        # with worker processes, process pools and progress bars. Collect them now, while the interpreter is
        # whole: left for interpreter shutdown (where the exit exception's context kept them), a daemon thread
        # still in native code is ended by a forced unwind, and the process aborts with "terminate called
        # without an active exception" (exit 134) after the error was printed.
        gc.collect()
        raise _fail(one_line(message), code)
    return wrapper


def command(fn: Callable[P, R], on: typer.Typer = app, name: str | None = None) -> Callable[P, R]:
    """Register ``fn`` as an ``ichdet`` command (of sub-app ``on``, as ``name``) whose expected failures
    become one line on stderr."""
    wrapper = handle_errors(fn)
    on.command(name)(wrapper)
    return wrapper


@command
def synth(out: Annotated[Path, typer.Option(help="folder to write the Kaggle-layout data set into")],
          studies: Annotated[int, typer.Option(help="labelled studies")] = 12,
          test_studies: Annotated[int, typer.Option(help="unlabelled test studies")] = 2,
          size: Annotated[int, typer.Option(help="slice size in pixels")] = 128,
          seed: int = 0,
          context: Annotated[bool, typer.Option(help="lesions taper with faint edge slices (sequence stage)")]
          = False,
          family: Annotated[str, typer.Option(help="how the studies look: classic (the demo's) or subtle (small, "
                                                   "faint, noisy lesions near the skull, a tighter field of view)")]
          = "classic",
          force: Annotated[bool, typer.Option(help="overwrite files ichdet synth did not write")] = False) -> None:
    """Write synthetic head-CT studies (skull, brain, ventricles, five bleed types) as DICOM."""
    from ichdet.synth import SynthSpec, make_dataset

    summary = make_dataset(out, SynthSpec(n_studies=studies, n_test_studies=test_studies, size=size,
                                          seed=seed, context=context, family=family), force=force)
    typer.echo(str(summary))


@command
def preprocess(images: Annotated[Path, typer.Option(help="folder of DICOM files (searched recursively)")],
               out: Annotated[Path, typer.Option(help="cache folder to write (or resume)")],
               labels: Annotated[Path | None, typer.Option(help="Kaggle label CSV (stage_2_train.csv)")] = None,
               size: Annotated[int, typer.Option(help="stored image side in pixels")] = 512,
               workers: Annotated[int | None, typer.Option(help="processes (default: all cores)")] = None,
               folds: Annotated[int, typer.Option(help="patient-grouped folds for labelled images")] = 5,
               seed: Annotated[int, typer.Option(help="fold assignment seed")] = 0,
               strict: Annotated[bool, typer.Option(help="exit 1 if any file was skipped")] = False,
               max_pixels: Annotated[int, typer.Option(help="largest decoded image accepted, in 16-bit pixels "
                                                            "(rows x columns x frames; default 4096x4096)")]
               = 4096 * 4096) -> None:
    """DICOM folder -> cache (index.parquet, pixel store, errors.csv); resumes an interrupted run."""
    from ichdet.cache.writer import PreprocessOptions
    from ichdet.cache.writer import preprocess as run

    options = PreprocessOptions(size=size, workers=workers, n_folds=folds, seed=seed, max_pixels=max_pixels,
                                progress=sys.stderr.isatty())  # checked before anything is read
    summary = run(images, out, labels, options)
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
    from ichdet.models.config import load_config
    from ichdet.train.loop import train as run

    if config is None and resume and (out / "config.yaml").exists():
        config = out / "config.yaml"
    cfg = load_config(config, set_ or [])
    results = run(cfg, data, out, fold=fold, resume=resume, progress=sys.stderr.isatty())
    for r in results:
        typer.echo(f"fold {r['fold']}: best val weighted log loss {r['val_loss']:.4f} at epoch {r['epoch']} "
                   f"({r['epochs']} epochs)")
    typer.echo(f"run: {out}")


@command
def distill(bundle: Annotated[Path, typer.Option(help="the teacher: a model bundle")],
            data: Annotated[Path, typer.Option(help="labelled cache to train the student on")],
            out: Annotated[Path, typer.Option(help="the student's run folder")],
            run: Annotated[list[Path] | None, typer.Option(
                help="the bundle's run folders (repeat): their out-of-fold predictions are the soft targets; "
                     "without them the bundle's own (in-sample) predictions are")] = None,
            config: Annotated[Path | None, typer.Option(help="the student's YAML config (default: the bundle's "
                                                             "first 2D member's)")] = None,
            alpha: Annotated[float, typer.Option(help="weight of the teacher's soft targets; 1 - alpha goes to "
                                                      "the labels")] = 0.5,
            fold: Annotated[str, typer.Option(help="fold number, or all")] = "all",
            resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
            device: Annotated[str, typer.Option(help="where the teacher predicts (without --run)")] = "auto",
            set_: Annotated[list[str] | None, typer.Option("--set", help="override: key=value")] = None) -> None:
    """Train one network on a bundle's soft targets mixed with the labels: a normal run folder."""
    from ichdet.infer.teacher import IN_SAMPLE_WARNING, student_config, teacher_targets
    from ichdet.models.config import build_config, load_config
    from ichdet.train.distill import check_distill
    from ichdet.train.distill import distill as run_distill

    if config is None and resume and (out / "config.yaml").exists():
        config = out / "config.yaml"
    cfg = (load_config(config, set_ or []) if config is not None
           else build_config(student_config(bundle), set_ or [], source=f"{bundle} (first 2D member)"))
    check_distill(cfg, data, out, alpha, fold, resume)
    targets = teacher_targets(bundle, data, list(run or []), device=device)
    if not targets.out_of_fold:
        typer.secho(f"warning: {IN_SAMPLE_WARNING}", fg=typer.colors.YELLOW, err=True)
    results = run_distill(cfg, data, out, targets.probs, targets.record(), alpha, fold, resume,
                          progress=sys.stderr.isatty())
    for r in results:
        typer.echo(f"fold {r['fold']}: best val weighted log loss {r['val_loss']:.4f} at epoch {r['epoch']} "
                   f"({r['epochs']} epochs)")
    typer.echo(f"run: {out} (student of {bundle}, alpha {alpha})")


_PNG = (b"\x89PNG",)
_HTML = (b"<!DOCTYPE html>",)
_PREDICTION_CSV = (b"ID,Label", b"image_id,")


def _output(path: Path, force: bool, signatures: tuple[bytes, ...], role: str = "") -> Path:
    """``path`` if a command may write it: not a folder, and new or a file of the kind it writes.

    A file that does not start like the command's own output (``signatures``) was not written by
    ichdet and is replaced only with ``--force``, so a mistyped ``--out`` cannot destroy a user's file.
    ``role`` (e.g. "a study page of --out") says in the refusal why the command would write there.
    """
    name = f"{path} ({role})" if role else str(path)
    if path.is_dir():
        raise IchdetError(f"{name} is a folder; give a file name for the output, e.g. {path / 'out'}{path.suffix}")
    if path.exists() and not force:
        with open(path, "rb") as f:
            head = f.read(max(map(len, signatures)))
        if not any(head.startswith(s) for s in signatures):
            raise IchdetError(f"{name} exists and is not an ichdet output of this kind; "
                              "pass --force to replace it, or choose another name")
    return path


_FORCE = typer.Option("--force", help="replace an existing output file that ichdet did not write")


@command
def predict(data: Annotated[Path, typer.Option(help="cache folder to predict")],
            out: Annotated[Path, typer.Option(help="predictions parquet to write")],
            run: Annotated[list[Path] | None, typer.Option(help="run folder (repeat for several models)")] = None,
            bundle: Annotated[Path | None, typer.Option(
                help="model bundle from `ichdet bundle` (instead of --run); the table carries its member "
                     "weights for `ichdet ensemble`")] = None,
            tta: Annotated[bool, typer.Option("--tta/--no-tta", help="average with a horizontal flip")] = True,
            device: str = "auto",
            force: Annotated[bool, _FORCE] = False) -> None:
    """Predict every image of a cache with every fold of each run (or of each bundle member).

    Under torchrun (``torchrun --nproc-per-node N -m ichdet predict --bundle ...``) the processes share the
    cache's series and write one table, the one a single process writes.
    """
    from ichdet.infer.predict import check_out, predict_runs
    from ichdet.io import write_parquet_atomic

    check_out(out, force)
    preds = predict_runs(list(run or []), data, tta=tta, device=device, progress=sys.stderr.isatty(), bundle=bundle)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank holds the table; rank 0 writes it
        return
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
    if not name or not (weight >= 0 and weight != float("inf")):
        raise IchdetError(f"--weight {item!r}: expected model=number >= 0, e.g. --weight resnet34=2")
    return name, weight


@command
def ensemble(preds: Annotated[list[Path], typer.Argument(help="prediction parquets from `ichdet predict`")],
             out: Annotated[Path, typer.Option(help="submission CSV (or wide prediction CSV) to write")],
             sample_submission: Annotated[Path | None, typer.Option(help="Kaggle sample submission")] = None,
             weight: Annotated[list[str] | None, typer.Option(
                 help="model=weight for every model; overrides the weights a bundle's predictions carry "
                      "(default: those, else equal)")] = None,
             force: Annotated[bool, _FORCE] = False) -> None:
    """Mean over folds per model, then over models -> a Kaggle submission (validated if a sample is given).

    Predictions of `ichdet predict --bundle` carry the bundle's member weights (column ``weight``), so
    the ensemble gives the bundle's probabilities, as predict-study and report compute them; --weight
    replaces them. Tables of a bundle mixed with tables of runs need --weight for every model.

    Image ids that are not Kaggle ids (``ID_<hex>``), e.g. hospital UIDs, give a wide prediction CSV
    instead: image_id and the six probabilities.
    """
    from ichdet.evaluate.ensembling import ensemble as combine
    from ichdet.evaluate.ensembling import read_predictions, write_ensemble

    _output(out, force, _PREDICTION_CSV)
    weights = dict(_model_weight(w) for w in weight) if weight else None
    wide = combine(read_predictions(preds), weights)
    kind = write_ensemble(wide, out, sample_submission)
    if kind == "wide":
        typer.echo(f"{out}: {len(wide)} images, wide prediction CSV (image_id + 6 labels): the image ids are "
                   "not Kaggle ids, so no Kaggle submission was written")
    else:
        typer.echo(f"{out}: {len(wide)} images" + (", matches the sample submission" if sample_submission else ""))


@command
def evaluate(pred: Annotated[Path, typer.Option(help="predictions: parquet, RUN/oof.parquet, submission or wide CSV")],
             labels: Annotated[Path, typer.Option(help="Kaggle label CSV")],
             data: Annotated[Path | None, typer.Option(help="cache of the images: groups them into studies")] = None,
             sensitivity: Annotated[float, typer.Option(help="target sensitivity of the operating points")] = 0.95,
             bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the 95% intervals")] = 1000,
             seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
             plot: Annotated[Path | None, typer.Option(help="ROC curves PNG (default: next to --pred)")] = None,
             reliability: Annotated[Path | None, typer.Option(help="reliability PNG (default: next to --pred)")] = None,
             force: Annotated[bool, _FORCE] = False) -> None:
    """Weighted log loss, per-label log loss and AUC, calibration, operating points, study level, CIs, plots."""
    from ichdet.evaluate.evaluation import evaluate as score
    from ichdet.evaluate.evaluation import write_plots

    roc = _output(plot or pred.with_name(pred.stem + "_roc.png"), force, _PNG)
    rel = _output(reliability or pred.with_name(pred.stem + "_reliability.png"), force, _PNG)
    result = score(pred, labels, data, sensitivity=sensitivity, n_boot=bootstrap, seed=seed)
    typer.echo("\n".join(result.lines()))
    failures = write_plots(result, roc, rel)
    if failures:
        raise RunFailed("the scores above are complete; could not write the plot(s): " + "; ".join(failures))
    typer.echo(f"plots: {roc}, {rel}")


@command
def demo(out: Annotated[Path, typer.Option(help="folder for every artifact")] = Path("demo"),
         seed: int = 0) -> None:
    """The whole pipeline on synthetic data: synth, preprocess, train 2 models x 2 folds, ensemble, score."""
    from ichdet.demo import run_demo

    run_demo(out, seed=seed, echo=typer.echo)


@command
def serve(bundle: Annotated[Path | None, typer.Option(help="model bundle (model.ichdet)")] = None,
          spool: Annotated[Path | None, typer.Option(help="spool folder: received studies, results, state")] = None,
          ae_title: Annotated[str | None, typer.Option(help="this node's AE title [ICHDET]")] = None,
          port: Annotated[int | None, typer.Option(help="DICOM port to listen on [11112]")] = None,
          allow: Annotated[list[str] | None, typer.Option(help="calling AE title allowed to send (repeat)")] = None,
          send_to: Annotated[str | None, typer.Option(
              help="results destination: AE@HOST:PORT (C-STORE) or a DICOMweb base URL http(s)://HOST/dicom-web "
                   "(STOW-RS; credentials from ICHDET_DICOMWEB_TOKEN or ICHDET_DICOMWEB_USER/PASSWORD, or the "
                   "config)")] = None,
          notify_hl7: Annotated[str | None, typer.Option(
              metavar="HOST:PORT", help="send an HL7 v2.5 ORU^R01 over MLLP per analysed study (RIS worklist)")]
          = None,
          notify_url: Annotated[str | None, typer.Option(
              metavar="URL", help="POST a FHIR R4 DiagnosticReport per analysed study to this URL")] = None,
          ca_bundle: Annotated[Path | None, typer.Option(help="PEM file of a private CA for https destinations")]
          = None,
          quiet_seconds: Annotated[float | None, typer.Option(help="a study is complete after this quiet time [10]")]
          = None,
          max_age_days: Annotated[float | None, typer.Option(help="remove sent studies older than this")] = None,
          status_port: Annotated[int | None, typer.Option(help="HTTP port for /status and /health (loopback)")]
          = None,
          config: Annotated[Path | None, typer.Option(help="serve.yaml with the same settings (flags win)")] = None,
          tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve DICOM over TLS only (TLS 1.2+, "
                                                        "BCP 195)")] = None,
          tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert (no passphrase)")] = None,
          tls_ca: Annotated[Path | None, typer.Option(help="PEM CA: callers must present a certificate it signed")]
          = None,
          send_tls: Annotated[bool | None, typer.Option("--send-tls", help="send results over TLS (destination "
                                                        "checked against --tls-ca)")] = None,
          status: Annotated[bool, typer.Option("--status", help="print the spool's status as JSON and exit")]
          = False) -> None:
    """A DICOM node: receive CT studies (C-STORE), analyse each completed study, send SR + SC results back."""
    import json
    import logging

    from ichdet.serve import Spool, bundle_analyser, load_serve_config, run_node, spool_status

    if status:
        if spool is None:
            spool = load_serve_config(config, {}).spool
        typer.echo(json.dumps(spool_status(Spool(spool, create=False)), indent=2))  # creates nothing
        return
    cfg = load_serve_config(config, dict(bundle=bundle, spool=spool, ae_title=ae_title, port=port, allow=allow,
                                         send_to=send_to, quiet_seconds=quiet_seconds, max_age_days=max_age_days,
                                         status_port=status_port, tls_cert=tls_cert, tls_key=tls_key,
                                         tls_ca=tls_ca, send_tls=send_tls, notify_hl7=notify_hl7,
                                         notify_url=notify_url, ca_bundle=ca_bundle))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    run_node(cfg, bundle_analyser(cfg.bundle, tta=cfg.tta, device=cfg.device))
seq_app = typer.Typer(no_args_is_help=True, help="The sequence stage: a model over each series of slices.")
app.add_typer(seq_app, name="seq")


@functools.partial(command, on=seq_app, name="train")
def seq_train(run: Annotated[list[Path], typer.Option(
                  "--run", "--base", help="trained 2D run folder (repeat for several); under torchrun write "
                  "--base (torchrun's own parser reads --run as its ambiguous --run-path)")],
              data: Annotated[Path, typer.Option(help="the cache the 2D runs were trained on")],
              out: Annotated[Path, typer.Option(help="sequence run folder")],
              config: Annotated[Path | None, typer.Option(help="YAML (configs/seq_bigru.yaml)")] = None,
              fold: Annotated[str, typer.Option(help="fold number, or all")] = "all",
              resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
              set_: Annotated[list[str] | None, typer.Option("--set", help="override: key=value")] = None) -> None:
    """Train a sequence model over out-of-fold features of trained 2D runs (predict it like any run)."""
    from ichdet.models.config import load_seq_config
    from ichdet.train.seq import check_seq_out, train_seq

    check_seq_out(out)  # a 2D run or a file as --out is named before its config.yaml is read as a sequence config
    if config is None and resume and (out / "config.yaml").exists():
        config = out / "config.yaml"
    results = train_seq(load_seq_config(config, set_ or []), run, data, out, fold=fold, resume=resume,
                        progress=sys.stderr.isatty())
    for r in results:
        typer.echo(f"fold {r['fold']}: best val weighted log loss {r['val_loss']:.4f} at epoch {r['epoch']} "
                   f"({r['epochs']} epochs)")
    typer.echo(f"run: {out}")


@command
def bundle(run: Annotated[list[Path], typer.Option(help="run folder, 2D or sequence (repeat for several models)")],
           out: Annotated[Path, typer.Option(help="bundle file to write, e.g. model.ichdet")],
           weight: Annotated[list[str] | None, typer.Option(help="member=weight (default: equal)")] = None,
           labels: Annotated[Path | None, typer.Option(help="label CSV of the runs' training cache: thresholds "
                                                              "from the out-of-fold predictions")] = None,
           sensitivity: Annotated[float, typer.Option(help="target sensitivity of the thresholds")] = 0.95,
           runtime: Annotated[str, typer.Option(help="where the networks run: torch, or onnx (each network also "
                                                      "exported to ONNX, checked against torch to 1e-4, run "
                                                      "with onnxruntime)")] = "torch",
           force: Annotated[bool, _FORCE] = False,
           ) -> None:
    """Pack runs into one model file: weights (safetensors), configs, weights, thresholds, sha256 manifest.

    With --labels, each label's threshold is the out-of-fold operating point at --sensitivity; a warning
    line per label (stderr) says when it means little: out-of-fold AUC below 0.5, specificity below
    0.05 at the threshold, or fewer than 10 positive images. The manifest records each label's AUC,
    sensitivity, specificity, positives and warnings, and what the runs were trained on.
    """
    from ichdet.infer.bundle import load_ensemble, write_bundle

    _output(out, force, (b"PK\x03\x04",))  # a bundle is a zip: another kind of file only with --force
    weights = dict(_model_weight(w) for w in weight) if weight else None
    path = write_bundle(list(run), out, weights, sensitivity, labels, runtime=runtime)
    ens = load_ensemble(path)
    typer.echo(f"{path}: {len(ens.members)} members, {len(ens.manifest['bases'])} other base runs, "
               f"{sum(len(m.folds) for m in ens.members)} folds, "
               f"sha256 {ens.manifest['bundle_sha256']}, runtime {ens.manifest['runtime']}")
    typer.echo("thresholds: " + ", ".join(f"{k} {v:.4g}" for k, v in ens.thresholds.items())
               + f" ({ens.manifest['thresholds_source']})")
    for label, point in (ens.manifest["operating_points"] or {}).items():
        if point.get("warnings"):
            typer.secho(f"warning: {label}: " + "; ".join(point["warnings"]), fg=typer.colors.YELLOW, err=True)
    if ens.manifest["training"]["synthetic"] is True:
        typer.secho("warning: trained on ichdet's synthetic data: every result of this bundle says so",
                    fg=typer.colors.YELLOW, err=True)


@command
def calibrate(bundle: Annotated[Path, typer.Option(help="model bundle to calibrate (left as it is)")],
              data: Annotated[Path, typer.Option(help="labelled cache of the site's own studies "
                                                      "(`ichdet preprocess --labels`)")],
              out: Annotated[Path, typer.Option(help="the site's bundle to write (not --bundle)")],
              sensitivity: Annotated[float, typer.Option(help="sensitivity each label's threshold reaches on the "
                                                              "site's images")] = 0.9,
              temperature: Annotated[bool, typer.Option("--temperature", help="also fit a per-label temperature "
                                                        "(minimum log loss on the site's images)")] = False,
              device: str = "auto",
              tta: Annotated[bool, typer.Option("--tta/--no-tta", help="average with a horizontal flip")] = True,
              force: Annotated[bool, _FORCE] = False) -> None:
    """Re-set a bundle's operating points (and temperatures) on a site's labelled studies; weights unchanged."""
    from ichdet.infer.calibrate import calibrate_bundle

    _output(out, force, (b"PK\x03\x04",))
    results = calibrate_bundle(bundle, data, out, sensitivity, temperature, device=device, tta=tta)
    for r in results:
        typer.echo(r.line())
    typer.echo(f"{out}: calibrated copy of {bundle} (every weight file unchanged)")


def _check_study_folder(path: Path, dicom_out: Path | None, dicom_ready: bool = False) -> None:
    """Refuse, before any work, a PATH that is not a folder or (with --dicom-out, or ``dicom_ready``) slices
    DICOM results cannot refer to, and a --dicom-out that is a file."""
    from ichdet.study.outputs import check_dicom_out

    if not path.is_dir():
        raise IchdetError(f"{path}: not a folder; pass the folder that holds the study's DICOM files")
    _check_dicom_out_folder(dicom_out)
    if dicom_out is not None or dicom_ready:
        check_dicom_out(path)


def _check_dicom_out_folder(dicom_out: Path | None) -> None:
    if dicom_out is not None and dicom_out.exists() and not dicom_out.is_dir():
        raise IchdetError(f"--dicom-out {dicom_out} is a file; give a folder for the DICOM results")


def _check_source(path: str, dicom_out: Path | None, stow: str | None) -> None:
    """The checks that need no download: PATH a folder or a well-formed study URL, --stow a base URL."""
    from ichdet.dicom.web import is_web_url, parse_base_url, parse_study_url

    if stow is not None:
        parse_base_url(stow, "--stow")
    if is_web_url(path):
        parse_study_url(path)
        _check_dicom_out_folder(dicom_out)
    else:
        _check_study_folder(Path(path), dicom_out, dicom_ready=stow is not None)


@contextlib.contextmanager
def _study_source(path: str, ca_bundle: Path | None, dicom_ready: bool) -> Iterator[Path]:
    """The folder to analyse: PATH itself, or a study URL fetched by WADO-RS into a private temporary folder
    that is removed when the command ends (also on an error, Ctrl-C or SIGTERM)."""
    from ichdet.dicom.web import WebAuth, fetched_study, is_web_url, parse_study_url
    from ichdet.study.outputs import check_dicom_out

    if not is_web_url(path):
        yield Path(path)
        return
    with fetched_study(path, WebAuth.from_env(ca_bundle)) as (folder, count):
        typer.echo(f"fetched {count} instances by WADO-RS from {parse_study_url(path)[0]}")
        if dicom_ready:
            check_dicom_out(folder)
        yield folder


def _dicom_results(prediction: StudyPrediction, dicom_out: Path | None, include_phi: bool,
                   figures: dict[str, ReportFigures] | None = None, stow: str | None = None,
                   ca_bundle: Path | None = None) -> list[Path]:
    """With --dicom-out: the SR and secondary captures of every analysed study (figures made if not given).
    With --stow: the same objects (in a temporary folder when --dicom-out is not given) stored by STOW-RS."""
    from ichdet.study.outputs import prediction_figures, write_prediction_dicom

    if dicom_out is None and stow is None:
        return []
    with contextlib.ExitStack() as stack:
        folder = dicom_out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ichdet-stow-")))
        written = write_prediction_dicom(prediction, prediction_figures(prediction) if figures is None else figures,
                                         folder, include_phi)
        if dicom_out is not None:
            typer.echo(f"{dicom_out}: {len(written)} DICOM objects ({_kinds(written)}), not for diagnostic use")
        if stow is not None:
            _stow(stow, written, ca_bundle)
    return written


def _kinds(files: list[Path]) -> str:
    """"SR 1, KO 1, OT 3": the DICOM objects in ``files`` counted by Modality."""
    import pydicom

    counts = collections.Counter(str(pydicom.dcmread(f, stop_before_pixels=True).Modality) for f in files)
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "none"


def _stow(base_url: str, files: list[Path], ca_bundle: Path | None) -> None:
    """Store ``files`` by STOW-RS; RunFailed naming what was not stored (the result files are written)."""
    from ichdet.dicom.web import WebAuth, server_name, store_files

    result = store_files(base_url, files, WebAuth.from_env(ca_bundle))
    if result.failed:
        raise RunFailed(f"--stow {server_name(base_url)}: {len(result.failed)} of {len(files)} DICOM objects not "
                        f"stored ({result.failed[0][1]}); the result JSON is written, run the command again to retry")
    typer.echo(f"stored {len(result.stored)} DICOM objects ({_kinds(result.stored)}) by STOW-RS at "
               f"{server_name(base_url)}")


_STUDY_PATH_HELP = ("folder of DICOM files (any layout, any names), or a DICOMweb study URL "
                    "http(s)://HOST/.../studies/<StudyInstanceUID> (fetched by WADO-RS; credentials from "
                    "ICHDET_DICOMWEB_TOKEN or ICHDET_DICOMWEB_USER/ICHDET_DICOMWEB_PASSWORD)")
_STOW = typer.Option("--stow", metavar="BASE_URL", help="store the DICOM results (SR, key images, secondary "
                     "captures) by STOW-RS at this DICOMweb base URL, e.g. http://pacs:8042/dicom-web "
                     "(credentials from the same environment variables)")
_CA_BUNDLE = typer.Option("--ca-bundle", help="PEM file of the CA(s) to trust for https (default: the system's)")


@command
def predict_study(path: Annotated[str, typer.Argument(metavar="PATH", help=_STUDY_PATH_HELP)],
                  bundle: Annotated[Path | None, typer.Option(help="model bundle from `ichdet bundle`")] = None,
                  run: Annotated[list[Path] | None, typer.Option(help="run folder (instead of --bundle)")] = None,
                  out: Annotated[Path, typer.Option(help="result JSON to write")] = Path("result.json"),
                  device: str = "auto",
                  tta: Annotated[bool, typer.Option("--tta/--no-tta", help="average with a horizontal flip")] = True,
                  include_phi: Annotated[bool, typer.Option(
                      "--include-phi", help="put patient name, ID, birth date, accession and institution, file paths "
                                            "and series descriptions in the result (without it paths are opaque "
                                            "ids and descriptions null)")] = False,
                  dicom_out: Annotated[Path | None, typer.Option(
                      help="also write a DICOM SR (TID 1500), a key object selection and Grad-CAM "
                           "secondary captures into this folder")] = None,
                  stow: Annotated[str | None, _STOW] = None,
                  ca_bundle: Annotated[Path | None, _CA_BUNDLE] = None,
                  force: Annotated[bool, _FORCE] = False) -> None:
    """Analyse every axial CT series of every study under PATH (a folder or a DICOMweb study URL); write one
    result JSON."""
    from ichdet.infer.bundle import load_ensemble
    from ichdet.study.predict import predict_study as run_study
    from ichdet.study.result import write_result

    _check_source(path, dicom_out, stow)
    _output(out, force, (b"{",))  # a result JSON of ours starts with "{"; anything else needs --force
    ensemble = load_ensemble(bundle, list(run or []))
    with _study_source(path, ca_bundle, dicom_out is not None or stow is not None) as folder:
        prediction = run_study(folder, ensemble, tta=tta, device=device, include_phi=include_phi)
        write_result(prediction.result, out)
        _dicom_results(prediction, dicom_out, include_phi, stow=stow, ca_bundle=ca_bundle)
    studies = prediction.result["studies"]
    for k, study in enumerate(studies, start=1):
        summary = study["summary"]
        name = f"study {k} of {len(studies)}"  # no UID on the terminal: it may end up in a log
        if not summary["analysed"]:
            typer.echo(f"{name}: no usable series")
            continue
        called = [k for k, v in summary["called"].items() if v and k != "any"]
        typer.echo(f"{name}: any {summary['probability']['any']:.3f} -> "
                   + ("hemorrhage suspected" + (f" ({', '.join(called)})" if called else "")
                      if summary["hemorrhage"] else "no hemorrhage called"))
    t = prediction.result["timings_s"]
    typer.echo(f"{out}: read {t['read_headers_and_order'] + t['read_pixels']:.2f} s, inference "
               f"{t['inference']:.2f} s, write {t['write']:.3f} s")


@command
def report(path: Annotated[str, typer.Argument(metavar="PATH", help=_STUDY_PATH_HELP)],
           out: Annotated[Path, typer.Option(help="HTML report to write (an index page when several studies)")],
           bundle: Annotated[Path | None, typer.Option(help="model bundle from `ichdet bundle`")] = None,
           run: Annotated[list[Path] | None, typer.Option(help="run folder (instead of --bundle)")] = None,
           dicom_out: Annotated[Path | None, typer.Option(
               help="also write a DICOM SR (TID 1500), a key object selection and Grad-CAM "
                    "secondary captures into this folder")] = None,
           stow: Annotated[str | None, _STOW] = None,
           ca_bundle: Annotated[Path | None, _CA_BUNDLE] = None,
           device: str = "auto",
           tta: Annotated[bool, typer.Option("--tta/--no-tta", help="average with a horizontal flip")] = True,
           top_k: Annotated[int, typer.Option(min=1, help="top slices shown with Grad-CAM per study")] = 3,
           include_phi: Annotated[bool, typer.Option(
               "--include-phi", help="show patient name, ID, birth date, accession and institution, file "
                                     "paths and series descriptions")] = False,
           force: Annotated[bool, _FORCE] = False) -> None:
    """Analyse PATH (a folder or a DICOMweb study URL) as predict-study does and write a self-contained HTML
    report per study (Grad-CAM)."""
    from ichdet.infer.bundle import load_ensemble
    from ichdet.study.html import study_pages, write_report
    from ichdet.study.outputs import prediction_figures
    from ichdet.study.predict import predict_study as run_study

    _output(out, force, _HTML)
    for page in study_pages(out):  # several studies: a page per study next to --out, checked like it
        _output(page, force, _HTML, role=f"where a study page of --out {out.name} goes when PATH holds "
                                         "several studies")
    _check_source(path, dicom_out, stow)
    ensemble = load_ensemble(bundle, list(run or []))
    with _study_source(path, ca_bundle, dicom_out is not None or stow is not None) as folder:
        prediction = run_study(folder, ensemble, tta=tta, device=device, include_phi=include_phi)
        figures = prediction_figures(prediction, top_k=top_k)
        page = write_report(prediction.result, figures, out)
        typer.echo(f"{page}: {len(prediction.result['studies'])} studies, "
                   f"{sum(len(f.slices) for f in figures.values())} slices with Grad-CAM; not for diagnostic use")
        _dicom_results(prediction, dicom_out, include_phi, figures, stow=stow, ca_bundle=ca_bundle)


def main() -> None:
    """Entry point for ``python -m ichdet``."""
    app()
