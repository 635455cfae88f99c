"""The Kaggle long CSV format (``ID_<image>_<label>,Label``) <-> the wide table, for labels and submissions.

The Kaggle files hold one row per (image, label): ``ID_e20fc680b_epidural,0``. ichdet works on the
*wide* table instead: one row per image id (``ID_e20fc680b``, the index, named ``image_id``) and one
column per label in :data:`LABELS` order.

Parsing is vectorised (pyarrow CSV reader, RE2 regex, dictionary encoding, numpy ``bincount``) so the
full stage-2 train file (4.5 M rows) reads in seconds without a Python object per row. Only the error
paths loop in Python, to find the line numbers of bad rows.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ichdet.errors import LabelError
from ichdet.io import atomic_path
from ichdet.names import LABELS

__all__ = [
    "LABELS",
    "read_labels",
    "read_submission",
    "to_long",
    "validate_submission",
    "write_labels",
    "write_submission",
]

logger = logging.getLogger(__name__)

Kind = Literal["binary", "probability"]
PathLike = str | os.PathLike[str]

HEADER = ("ID", "Label")
IMAGE_ID_PATTERN = r"ID_[0-9A-Za-z]+"
_ROW_ID_RE = rf"^(?P<image>{IMAGE_ID_PATTERN})_(?P<label>{'|'.join(LABELS)})$"
_NUMBER_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_SHOW = 10  # offending items listed in an error message; the count is always given
_ROW_FIX = (
    f"each row must read ID_<image id>_<label>,<value> with an alphanumeric image id and <label> one of "
    f"{', '.join(LABELS)}"
)
_VALUE_FIX = {
    "binary": "a label file holds 0 or 1 in the Label column",
    "probability": "a submission holds a probability, a number in [0, 1], in the Label column",
}


@dataclass(frozen=True)
class _Long:
    """A parsed long table: per row, the image code (into ``images``), the label index and the value."""

    images: pa.Array
    image_code: np.ndarray
    label_code: np.ndarray
    value: np.ndarray


# --------------------------------------------------------------------------------------------- reading


def _open_text(path: Path) -> IO[str]:
    """Open ``path`` as text (``.gz`` decompressed), dropping a UTF-8 byte-order mark."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _check_header(path: Path) -> bool:
    """Raise LabelError unless ``path`` exists and starts with the line ``ID,Label``; True if rows follow."""
    if not path.is_file():
        raise LabelError(f"{path}: no such file (expected a Kaggle CSV with header ID,Label)")
    try:
        with _open_text(path) as f:
            first = f.readline()
            has_rows = bool(f.read(1))
    except (UnicodeDecodeError, OSError) as exc:
        raise LabelError(
            f"{path}: cannot read as UTF-8 text ({exc}). Fix: save it as UTF-8, ID,Label"
        ) from exc
    if not first:
        raise LabelError(f"{path}: the file is empty; expected the header line ID,Label and one row per id")
    header = next(csv.reader([first.rstrip("\r\n")]), [])
    if tuple(header) != HEADER:
        raise LabelError(
            f"{path}: line 1 is {','.join(header)!r}, expected the header 'ID,Label' "
            "(Kaggle long form: ID_<image>_<label>,<value>)"
        )
    return has_rows


def _data_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-empty line after the header, as the CSV reader counts rows."""
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if number > 1 and text:
                yield number, text


def _mask(arr: pa.Array) -> np.ndarray:
    """A pyarrow boolean array as a numpy bool array, null counted as False."""
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False)


def _located(path: Path, positions: Sequence[int]) -> list[str]:
    """``line N: 'text'`` for the data rows at 0-based ``positions`` (error path: scans the file)."""
    wanted = set(positions)
    found: dict[int, str] = {}
    for row, (number, text) in enumerate(_data_lines(path)):
        if row in wanted:
            found[row] = f"line {number}: {text!r}"
            if len(found) == len(wanted):
                break
    return [found.get(p, f"row {p + 1}") for p in positions]


def _bad_rows_error(path: Path, positions: np.ndarray, problem: str, fix: str) -> LabelError:
    """A LabelError listing the first bad rows with their line numbers (header is line 1)."""
    shown = "; ".join(_located(path, [int(p) for p in positions[:_SHOW]]))
    more = f" (first {_SHOW} shown)" if len(positions) > _SHOW else ""
    return LabelError(f"{path}: {len(positions)} rows {problem}{more}: {shown}. Fix: {fix}")


def _read_raw(path: Path) -> pa.Table:
    """The two columns as strings; rows with a wrong number of fields raise LabelError."""
    if not _check_header(path):
        return pa.table({name: pa.array([], pa.string()) for name in HEADER})
    wrong_width: list[str] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        wrong_width.append(row.text)
        return "skip"

    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(skip_rows=1, column_names=list(HEADER)),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(HEADER, pa.string())),
        )
    except pa.ArrowInvalid as exc:  # e.g. bytes that are not UTF-8
        raise LabelError(f"{path}: not a readable CSV: {exc}. Fix: save it as UTF-8, ID,Label") from exc
    if wrong_width:
        texts = set(wrong_width)
        lines = [f"line {n}: {t!r}" for n, t in _data_lines(path) if t in texts][:_SHOW]
        raise LabelError(
            f"{path}: {len(wrong_width)} rows do not have exactly 2 fields (ID,Label): {'; '.join(lines)}. "
            f"Fix: {_ROW_FIX}"
        )
    return table


def _parse_ids(path: Path, ids: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Split ``ID_<image>_<label>``: (unique images in first-seen order, image code, label index)."""
    parts = pc.extract_regex(ids, _ROW_ID_RE)
    bad = np.flatnonzero(_mask(pc.is_null(parts)))
    if len(bad):
        raise _bad_rows_error(path, bad, "have a malformed ID", _ROW_FIX)
    encoded = pc.dictionary_encode(pc.struct_field(parts, "image"))
    label_code = pc.index_in(pc.struct_field(parts, "label"), value_set=pa.array(LABELS))
    return (
        encoded.dictionary,
        encoded.indices.to_numpy().astype(np.int64),
        label_code.to_numpy().astype(np.int64),
    )


def _parse_values(path: Path, labels: pa.Array, kind: Kind) -> np.ndarray:
    """The Label column as uint8 0/1 (``binary``) or float64 in [0, 1] (``probability``)."""
    if kind == "binary":
        ok = pc.is_in(labels, value_set=pa.array(["0", "1"]))
    else:
        ok = pc.match_substring_regex(labels, _NUMBER_RE)
    bad = np.flatnonzero(~_mask(ok))
    if len(bad):
        expected = "0 or 1" if kind == "binary" else "a number"
        raise _bad_rows_error(path, bad, f"have a Label that is not {expected}", _VALUE_FIX[kind])
    if kind == "binary":
        return _mask(pc.equal(labels, "1")).astype(np.uint8)
    values = pc.cast(labels, pa.float64()).to_numpy()
    out_of_range = np.flatnonzero((values < 0) | (values > 1))
    if len(out_of_range):
        raise _bad_rows_error(path, out_of_range, "have a Label outside [0, 1]", _VALUE_FIX[kind])
    return values


def _read_long(path: Path, kind: Kind) -> _Long:
    """Read and validate every row of a Kaggle long CSV."""
    table = _read_raw(path)
    images, image_code, label_code = _parse_ids(path, table.column("ID").combine_chunks())
    value = _parse_values(path, table.column("Label").combine_chunks(), kind)
    return _Long(images, image_code, label_code, value)


def _row_ids(images: pa.Array, keys: np.ndarray) -> list[str]:
    """The Kaggle row ids ``ID_<image>_<label>`` of flat (image * 6 + label) keys."""
    names = images.take(pa.array(keys // len(LABELS))).to_pylist()
    return [f"{name}_{LABELS[k % len(LABELS)]}" for name, k in zip(names, keys, strict=True)]


def _listing(items: Sequence[str], total: int) -> str:
    """The first few items, and how many there are in all."""
    more = f", ... ({total} in all)" if total > len(items) else ""
    return ", ".join(items) + more


def _pivot(path: Path, long: _Long) -> np.ndarray:
    """(n_images, 6) values; drops exact duplicate rows, raises on contradictory ones and on gaps."""
    n_images, width = len(long.images), len(LABELS)
    key = long.image_code * width + long.label_code
    flat = np.zeros(n_images * width, dtype=long.value.dtype)
    flat[key] = long.value  # last row wins; rows that disagree with it are the contradictions
    conflicts = np.unique(key[flat[key] != long.value])
    if len(conflicts):
        raise LabelError(
            f"{path}: {len(conflicts)} ids have duplicate rows with different Labels: "
            f"{_listing(_row_ids(long.images, conflicts[:_SHOW]), len(conflicts))}. "
            "Fix: keep one row per id, with its correct Label"
        )
    present = np.bincount(key, minlength=n_images * width).reshape(n_images, width) > 0
    _check_complete(path, long.images, present)
    duplicates = len(key) - n_images * width
    if duplicates:
        logger.info("%s: dropped %d exact duplicate rows", path, duplicates)
    return flat.reshape(n_images, width)


def _check_complete(path: Path, images: pa.Array, present: np.ndarray) -> None:
    """Raise LabelError naming the images that lack a row for some label."""
    incomplete = np.flatnonzero(~present.all(axis=1))
    if not len(incomplete):
        return
    shown = incomplete[:_SHOW]
    names = images.take(pa.array(shown)).to_pylist()
    described = [
        f"{name} (missing {', '.join(lab for lab, ok in zip(LABELS, present[i], strict=True) if not ok)})"
        for name, i in zip(names, shown, strict=True)
    ]
    raise LabelError(
        f"{path}: {len(incomplete)} images lack rows for some labels: "
        f"{_listing(described, len(incomplete))}. "
        f"Fix: give every image one row for each of {', '.join(LABELS)}"
    )


def _wide_frame(images: pa.Array, values: np.ndarray) -> pd.DataFrame:
    """The wide table: index ``image_id`` (first-seen order), columns LABELS."""
    index = pd.Index(images.to_pandas(), name="image_id")
    return pd.DataFrame(values, index=index, columns=pd.Index(LABELS))


def _check_any(path: Path, long: _Long, values: np.ndarray) -> None:
    """Labels: ``any`` is 1 wherever a subtype is 1; otherwise name the ``any`` rows that say 0."""
    any_col = LABELS.index("any")
    bad = np.flatnonzero((np.delete(values, any_col, axis=1) == 1).any(axis=1) & (values[:, any_col] == 0))
    if len(bad):
        rows = np.flatnonzero(np.isin(long.image_code, bad) & (long.label_code == any_col))
        raise _bad_rows_error(path, rows, "say any 0 for an image with a subtype 1",
                              "'any' is 1 whenever one of the five subtypes is 1; correct the any row or the subtype")


def _read_wide(path: PathLike, kind: Kind) -> pd.DataFrame:
    """Long CSV at ``path`` -> wide table of uint8 (``binary``) or float64 (``probability``) values."""
    long = _read_long(Path(path), kind)
    values = _pivot(Path(path), long)
    if kind == "binary":
        _check_any(Path(path), long, values)
    return _wide_frame(long.images, values)


def read_labels(path: PathLike) -> pd.DataFrame:
    """Read a Kaggle label file (``stage_2_train.csv``) into the wide table.

    Returns:
        DataFrame indexed by image id (``ID_<hex>``, index name ``image_id``, in order of first
        appearance), columns :data:`LABELS` in that order, dtype uint8 (0/1).

    Exact duplicate rows (same ID and Label, as in the real stage-2 file) are dropped.

    Raises:
        LabelError: missing file; header not ``ID,Label``; a row without exactly two fields, with an ID
            not of the form ``ID_<alphanumeric>_<label>``, or a Label other than 0/1 (file, line number,
            text); ids with contradictory duplicate rows; images lacking some of the six labels; an ``any``
            row saying 0 for an image with a subtype 1 (its line number).
    """
    return _read_wide(path, "binary")


def read_submission(path: PathLike) -> pd.DataFrame:
    """Read a Kaggle submission (long form) into the wide table of float64 probabilities.

    The inverse of :func:`write_submission`; the same checks as :func:`read_labels`, except that a
    Label may be any number in [0, 1].
    """
    return _read_wide(path, "probability")


# --------------------------------------------------------------------------------------------- writing


def _check_wide(wide: pd.DataFrame, kind: Kind) -> np.ndarray:
    """Validate a wide table; return its values as an (n, 6) array in LABELS order."""
    missing = [lab for lab in LABELS if lab not in wide.columns]
    extra = [str(c) for c in wide.columns if c not in LABELS]
    if missing or extra:
        raise LabelError(f"wide table columns must be {list(LABELS)}; missing {missing}, unexpected {extra}")
    ids = pa.array(wide.index.astype(str), type=pa.string())
    malformed = np.flatnonzero(~_mask(pc.match_substring_regex(ids, f"^{IMAGE_ID_PATTERN}$")))
    if len(malformed):
        shown = [repr(x) for x in ids.take(pa.array(malformed[:_SHOW])).to_pylist()]
        raise LabelError(f"image ids must read ID_<alphanumeric>; bad: {_listing(shown, len(malformed))}")
    if not wide.index.is_unique:
        dup = wide.index[wide.index.duplicated()].unique()
        raise LabelError(f"image ids repeat: {_listing([str(x) for x in dup[:_SHOW]], len(dup))}")
    return _check_values(wide[list(LABELS)], kind)


def _check_values(frame: pd.DataFrame, kind: Kind) -> np.ndarray:
    """The numeric values of ``frame``; LabelError on non-numbers, NaN, or values outside [0, 1]."""
    try:
        values = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LabelError(f"wide table values must be numbers: {exc}") from exc
    bad = ~((values >= 0) & (values <= 1))  # NaN fails both comparisons
    if kind == "binary":
        bad |= (values != 0) & (values != 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise LabelError(
            f"{int(bad.sum())} values are not {'0/1' if kind == 'binary' else 'in [0, 1]'}, e.g. "
            f"{float(values[row, col])!r} at image {frame.index[row]!r}, label {LABELS[col]!r}"
        )
    return values


def _long_table(wide: pd.DataFrame, kind: Kind) -> pa.Table:
    """The Kaggle long table (ID, Label) of a wide table: images in index order, labels in LABELS order."""
    values = _check_wide(wide, kind)
    n, width = values.shape
    images = pa.array(wide.index.astype(str), type=pa.string()).take(pa.array(np.repeat(np.arange(n), width)))
    suffixes = pa.array([f"_{lab}" for lab in LABELS]).take(pa.array(np.tile(np.arange(width), n)))
    label = values.ravel().astype(np.uint8) if kind == "binary" else values.ravel()
    return pa.table({"ID": pc.binary_join_element_wise(images, suffixes, ""), "Label": label})


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """Wide table -> Kaggle long form: columns ``ID`` (``<image_id>_<label>``) and ``Label``.

    Rows: images in index order, each with its six labels in :data:`LABELS` order. Label is uint8 when
    every label column is integer or boolean (0/1 labels), float64 otherwise (probabilities).
    """
    integer = all(pd.api.types.is_integer_dtype(t) or pd.api.types.is_bool_dtype(t) for t in wide.dtypes)
    return _long_table(wide, "binary" if integer and len(wide.columns) else "probability").to_pandas()


def _write_long(table: pa.Table, path: PathLike) -> Path:
    """Write a long table as ``ID,Label`` CSV atomically (plain header, no quoting)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(",".join(HEADER).encode() + b"\n")
        pcsv.write_csv(table, f, pcsv.WriteOptions(include_header=False, quoting_style="none"))
    return Path(path)


def write_submission(wide_probs: pd.DataFrame, path: PathLike) -> Path:
    """Write probabilities (wide table, columns LABELS) as a Kaggle submission CSV, atomically.

    Raises:
        LabelError: columns not exactly LABELS, image ids not ``ID_<alphanumeric>`` or repeated, values
            not numbers in [0, 1].
    """
    return _write_long(_long_table(wide_probs, "probability"), path)


def write_labels(wide: pd.DataFrame, path: PathLike) -> Path:
    """Write 0/1 labels (wide table, columns LABELS) as a Kaggle label CSV (``stage_2_train.csv`` form)."""
    return _write_long(_long_table(wide, "binary"), path)


# ------------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class _Submission:
    """A submission's ids and numeric labels, and how to name its rows in messages."""

    source: str
    ids: pa.Array
    labels: np.ndarray  # float64, NaN where the text is not a number
    describe: Callable[[Sequence[int]], list[str]]  # positions -> "line N: 'text'" / "row N (ID ...)"


def _submission_from_frame(df: pd.DataFrame) -> _Submission:
    """A submission given as a DataFrame with columns ID, Label."""
    if list(df.columns) != list(HEADER):
        raise LabelError(f"submission columns are {list(df.columns)}, expected ['ID', 'Label']")
    ids = pa.array(df["ID"].astype(str), type=pa.string())
    labels = pd.to_numeric(df["Label"], errors="coerce").to_numpy(dtype=np.float64)

    def describe(positions: Sequence[int]) -> list[str]:
        label = df["Label"].to_numpy(dtype=object)  # Python scalars: repr 0.5, not np.float64(0.5)
        return [f"row {p + 1} (ID {ids[p].as_py()!r}, Label {label[p]!r})" for p in positions]

    return _Submission("submission", ids, labels, describe)


def _submission_from_file(path: Path) -> _Submission:
    """A submission CSV: header checked, labels parsed as numbers (NaN where the text is not one)."""
    table = _read_raw(path)
    text = table.column("Label").combine_chunks()
    numeric = pc.fill_null(pc.match_substring_regex(text, _NUMBER_RE), False)
    labels = pc.if_else(numeric, text, pa.scalar("nan")).cast(pa.float64()).to_numpy()
    return _Submission(str(path), table.column("ID").combine_chunks(), labels, partial(_located, path))


def _id_problems(sub: _Submission, sample_ids: pa.Array) -> list[str]:
    """Missing, unexpected and repeated ids of ``sub`` relative to the sample submission."""
    problems = []
    missing = sample_ids.filter(pc.invert(pc.is_in(sample_ids, value_set=sub.ids)))
    extra = sub.ids.filter(pc.invert(pc.is_in(sub.ids, value_set=sample_ids)))
    counts = pc.value_counts(sub.ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    for what, ids in (("missing", missing), ("not in the sample submission", extra), ("repeated", repeated)):
        if len(ids):
            shown = ids[:_SHOW].to_pylist()
            problems.append(f"{len(ids)} ids {what}: {_listing(shown, len(ids))}")
    return problems


def _value_problems(sub: _Submission) -> list[str]:
    """Rows whose Label is not a number, or lies outside [0, 1]."""
    problems = []
    not_number = np.flatnonzero(np.isnan(sub.labels))
    out_of_range = np.flatnonzero((sub.labels < 0) | (sub.labels > 1))
    for what, rows in (("not a number (or NaN)", not_number), ("outside [0, 1]", out_of_range)):
        if len(rows):
            shown = sub.describe([int(p) for p in rows[:_SHOW]])
            problems.append(f"{len(rows)} Labels {what}: {_listing(shown, len(rows))}")
    return problems


def validate_submission(path_or_df: PathLike | pd.DataFrame, sample_submission_path: PathLike) -> None:
    """Check a submission against Kaggle's sample submission; raise LabelError listing every problem.

    Passes when: the header (or DataFrame columns) is ``ID,Label``; every sample id appears exactly
    once and no other id appears; every Label is a number in [0, 1] (no NaN).
    """
    sample_ids = _read_raw(Path(sample_submission_path)).column("ID").combine_chunks()
    if isinstance(path_or_df, pd.DataFrame):
        sub = _submission_from_frame(path_or_df)
    else:
        sub = _submission_from_file(Path(path_or_df))
    problems = _id_problems(sub, sample_ids) + _value_problems(sub)
    if problems:
        raise LabelError(
            f"{sub.source} does not match {sample_submission_path}:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: write one row per sample-submission ID with a probability in [0, 1] "
            "(ichdet.cache.labels.write_submission does)"
        )
