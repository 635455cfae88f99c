"""Kaggle long CSV <-> wide table: parsing, every rejection with its line number, writing, validation."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdet.cache.labels import (
    LABELS,
    read_labels,
    read_submission,
    to_long,
    validate_submission,
    write_labels,
    write_submission,
)
from ichdet.errors import LabelError

HEADER = "ID,Label\n"


def rows(image: str, values: tuple[object, ...] | str) -> str:
    """The six Kaggle rows of one image; ``values`` in LABELS order (a 6-char string for 0/1)."""
    return "".join(f"{image}_{lab},{v}\n" for lab, v in zip(LABELS, values, strict=True))


def write(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def wide(data: dict[str, list[float]], dtype: str = "uint8") -> pd.DataFrame:
    """Expected wide table: image id -> six values."""
    index = pd.Index(list(data), name="image_id")
    return pd.DataFrame(list(data.values()), index=index, columns=pd.Index(LABELS)).astype(np.dtype(dtype))


def test_labels_constant_is_the_kaggle_order() -> None:
    assert LABELS == ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


# --------------------------------------------------------------------------------------- read_labels

GOOD_FILES = [
    pytest.param(
        HEADER + rows("ID_a1", "000000") + rows("ID_b2", "010011"),
        {"ID_a1": [0, 0, 0, 0, 0, 0], "ID_b2": [0, 1, 0, 0, 1, 1]},
        id="two-images",
    ),
    pytest.param(
        HEADER + rows("ID_a1", "100001") + rows("ID_a1", "100001") + "ID_a1_any,1\n",
        {"ID_a1": [1, 0, 0, 0, 0, 1]},
        id="exact-duplicates-dropped",
    ),
    pytest.param(
        HEADER
        + "ID_b_any,1\nID_a_any,0\n"
        + "".join(f"ID_a_{lab},0\nID_b_{lab},1\n" for lab in reversed(LABELS[:5])),
        {"ID_b": [1, 1, 1, 1, 1, 1], "ID_a": [0, 0, 0, 0, 0, 0]},
        id="interleaved-rows-first-seen-order",
    ),
    pytest.param(
        (HEADER + rows("ID_Ab9", "000011")).replace("\n", "\r\n"),
        {"ID_Ab9": [0, 0, 0, 0, 1, 1]},
        id="crlf-line-endings",
    ),
    pytest.param("\ufeff" + HEADER + rows("ID_a", "001001"), {"ID_a": [0, 0, 1, 0, 0, 1]}, id="utf8-bom"),
    pytest.param(HEADER + "\n" + rows("ID_a", "000000") + "\n\n", {"ID_a": [0] * 6}, id="blank-lines"),
    pytest.param(HEADER + rows("ID_a", "000000").rstrip("\n"), {"ID_a": [0] * 6}, id="no-final-newline"),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_FILES)
def test_read_labels_good_files(tmp_path: Path, text: str, expected: dict[str, list[float]]) -> None:
    got = read_labels(write(tmp_path, text))
    pd.testing.assert_frame_equal(got, wide(expected))


@pytest.mark.parametrize("text", [HEADER, "ID,Label", "ID,Label\r\n"])
def test_read_labels_header_only_gives_empty_table(tmp_path: Path, text: str) -> None:
    got = read_labels(write(tmp_path, text))
    assert got.shape == (0, 6)
    assert list(got.columns) == list(LABELS)
    assert got.index.name == "image_id"


def test_read_labels_logs_dropped_duplicates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, HEADER + rows("ID_a", "000000") * 2 + "ID_a_any,0\n")
    with caplog.at_level(logging.INFO, logger="ichdet.cache.labels"):
        read_labels(path)
    assert caplog.messages == [f"{path}: dropped 7 exact duplicate rows"]


def test_read_labels_gzip(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "labels.csv.gz"
    path.write_bytes(gzip.compress((HEADER + rows("ID_a", "010001")).encode()))
    pd.testing.assert_frame_equal(read_labels(path), wide({"ID_a": [0, 1, 0, 0, 0, 1]}))


BAD_FILES = [
    pytest.param("", r"labels\.csv: the file is empty", id="empty"),
    pytest.param(
        "id,label\n" + rows("ID_a", "000000"), r"line 1 is 'id,label', expected the header", id="hdr"
    ),
    pytest.param("ID,Label,x\n", r"line 1 is 'ID,Label,x'", id="header-three-columns"),
    pytest.param(
        HEADER + rows("ID_a", "000000").replace("any,0", "anyy,0"),
        r"1 rows have a malformed ID: line 7: 'ID_a_anyy,0'\. Fix: each row must read ID_<image id>_<label>",
        id="unknown-label",
    ),
    pytest.param(
        HEADER + rows("ID_a", "000000") + rows("ID_x-1", "000000"),
        r"6 rows have a malformed ID: line 8: 'ID_x-1_epidural,0'; line 9",
        id="non-alphanumeric-image-id",
    ),
    pytest.param(HEADER + "a1_any,0\n", r"malformed ID: line 2: 'a1_any,0'", id="no-ID-prefix"),
    pytest.param(HEADER + "ID__any,0\n", r"malformed ID: line 2: 'ID__any,0'", id="empty-image-id"),
    pytest.param(
        HEADER + "\n\n" + rows("ID_a", "000020"),
        r"1 rows have a Label that is not 0 or 1: line 8: 'ID_a_subdural,2'\. Fix: a label file holds 0 or 1",
        id="label-2-after-blank-lines",
    ),
    pytest.param(
        HEADER + rows("ID_a", ("0",) * 5 + ("",)), r"not 0 or 1: line 7: 'ID_a_any,'", id="no-label"
    ),
    pytest.param(
        HEADER + rows("ID_a", (0, 0, 0, 0, 0, 0.5)), r"not 0 or 1: line 7: 'ID_a_any,0.5'", id="soft-label"
    ),
    pytest.param(
        HEADER + rows("ID_a", "000000") + "ID_b_any\n",
        r"1 rows do not have exactly 2 fields \(ID,Label\): line 8: 'ID_b_any'",
        id="one-field",
    ),
    pytest.param(
        HEADER + "ID_b_any,1,0\n", r"exactly 2 fields \(ID,Label\): line 2: 'ID_b_any,1,0'", id="3-fields"
    ),
    pytest.param(
        HEADER + rows("ID_a", "000001") + "ID_a_any,0\n" + rows("ID_b", "000000") + "ID_b_epidural,1\n",
        r"2 ids have duplicate rows with different Labels: ID_a_any, ID_b_epidural\. Fix: keep one row",
        id="contradictory-duplicates",
    ),
    pytest.param(
        HEADER + rows("ID_a", "000000") + "ID_b_epidural,0\nID_b_intraparenchymal,0\n",
        r"1 images lack rows for some labels: "
        r"ID_b \(missing intraventricular, subarachnoid, subdural, any\)\. Fix: give every image one row",
        id="missing-labels",
    ),
    pytest.param(
        HEADER + "".join(f"ID_{i}_any,0\n" for i in range(12)),
        r"12 images lack rows for some labels: ID_0 \(missing epidural, .*\), ID_9 .*, \.\.\. \(12 in all\)",
        id="many-incomplete-images",
    ),
    pytest.param(
        HEADER + "".join(f"ID_{i}_any,7\n" for i in range(12)),
        r"12 rows have a Label that is not 0 or 1 \(first 10 shown\): line 2: 'ID_0_any,7'; .*"
        r"line 11: 'ID_9_any,7'\. Fix",
        id="many-bad-rows",
    ),
    pytest.param(
        HEADER + rows("ID_a", "000000") + rows("ID_b", "001000"),
        r"1 rows say any 0 for an image with a subtype 1: line 13: 'ID_b_any,0'\. Fix: 'any' is 1 whenever",
        id="subtype-without-any",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_read_labels_rejects_with_line_and_fix(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(LabelError, match=message) as info:
        read_labels(path)
    assert str(info.value).startswith(str(path))


def test_read_labels_many_bad_rows_lists_only_ten(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "".join(f"ID_{i}_any,7\n" for i in range(12)))
    with pytest.raises(LabelError) as info:
        read_labels(path)
    assert len(re.findall(r"line \d+:", str(info.value))) == 10


@pytest.mark.parametrize(
    "data",
    [
        b"ID,Label\nID_a_any,\xff\n",
        b"\xff\xfeI\x00D\x00",
        b"ID,Label\n" + b"ID_a_any,0\n" * 2000 + b"ID_b_any,\xff\n",
    ],
    ids=["latin1-byte", "utf16", "bad-byte-far-down"],
)
def test_read_labels_rejects_non_utf8(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(data)
    with pytest.raises(
        LabelError,
        match=r"labels\.csv: (cannot read as UTF-8 text|not a readable CSV).*Fix: save it as UTF-8, ID,Label",
    ):
        read_labels(path)


def test_read_labels_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match=r"nope\.csv: no such file"):
        read_labels(tmp_path / "nope.csv")


def test_read_labels_real_rsna_sample(rsna_sample: Path) -> None:
    got = read_labels(rsna_sample / "stage_2_train.csv")
    assert got.shape == (232, 6)
    assert list(got.columns) == list(LABELS)
    assert set(got.dtypes) == {np.dtype("uint8")}
    assert got.index.name == "image_id"
    assert list(got.index[:2]) == ["ID_e20fc680b", "ID_a67b9a79e"]
    # positives per label, counted independently with awk over the file
    assert got.sum().tolist() == [2, 45, 9, 33, 23, 67]
    assert (got["any"] == got[list(LABELS[:5])].max(axis=1)).all()


# --------------------------------------------------------------------------------- read_submission


def test_read_submission_floats(tmp_path: Path) -> None:
    text = (
        HEADER
        + rows("ID_a", ("0.5", "1e-7", "1", "0", ".25", "1.0"))
        + rows("ID_b", ("0",) * 5 + ("+0.125",))
    )
    got = read_submission(write(tmp_path, text))
    expected = wide({"ID_a": [0.5, 1e-7, 1, 0, 0.25, 1.0], "ID_b": [0, 0, 0, 0, 0, 0.125]}, dtype="float64")
    pd.testing.assert_frame_equal(got, expected)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("nan", r"1 rows have a Label that is not a number: line 7: 'ID_a_any,nan'"),
        ("0.5x", r"not a number: line 7: 'ID_a_any,0.5x'"),
        ("", r"not a number: line 7: 'ID_a_any,'"),
        ("1.5", r"1 rows have a Label outside \[0, 1\]: line 7: 'ID_a_any,1.5'"),
        ("-1e-3", r"outside \[0, 1\]: line 7: 'ID_a_any,-1e-3'"),
    ],
)
def test_read_submission_rejects_bad_probabilities(tmp_path: Path, label: str, message: str) -> None:
    path = write(tmp_path, HEADER + rows("ID_a", ("0",) * 5 + (label,)))
    with pytest.raises(LabelError, match=message):
        read_submission(path)


def test_read_submission_contradictory_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + rows("ID_a", ("0.5",) * 6) + "ID_a_any,0.25\n")
    with pytest.raises(LabelError, match="1 ids have duplicate rows with different Labels: ID_a_any"):
        read_submission(path)


# ----------------------------------------------------------------------------- to_long and writing


def test_to_long_order_and_values() -> None:
    got = to_long(wide({"ID_b": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "ID_a": [0, 0, 0, 0, 0, 1]}, dtype="float64"))
    assert list(got.columns) == ["ID", "Label"]
    assert got["ID"].tolist() == [f"ID_b_{lab}" for lab in LABELS] + [f"ID_a_{lab}" for lab in LABELS]
    assert got["Label"].tolist() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0, 0, 0, 0, 0, 1]
    assert got["Label"].dtype == np.float64


def test_to_long_keeps_integer_labels_and_reorders_columns() -> None:
    frame = wide({"ID_a": [1, 0, 0, 0, 0, 1]})[list(reversed(LABELS))]
    got = to_long(frame)
    assert got["Label"].dtype == np.uint8
    assert got["Label"].tolist() == [1, 0, 0, 0, 0, 1]


def test_write_submission_exact_text_and_round_trip(tmp_path: Path) -> None:
    probs = wide({"ID_a": [0.1, 1e-7, 0.3, 1 / 3, 0.0, 1.0], "ID_b": [0.5] * 6}, dtype="float64")
    path = write_submission(probs, tmp_path / "sub.csv")
    lines = path.read_text().splitlines()
    assert lines[:3] == ["ID,Label", "ID_a_epidural,0.1", "ID_a_intraparenchymal,1e-7"]
    assert len(lines) == 13
    pd.testing.assert_frame_equal(read_submission(path), probs)  # floats survive exactly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]


def test_write_labels_round_trip(tmp_path: Path) -> None:
    labels = wide({"ID_a": [0, 1, 0, 0, 0, 1], "ID_b": [0] * 6})
    path = write_labels(labels, tmp_path / "train.csv")
    assert path.read_text().splitlines()[:3] == ["ID,Label", "ID_a_epidural,0", "ID_a_intraparenchymal,1"]
    pd.testing.assert_frame_equal(read_labels(path), labels)


def test_write_labels_rejects_soft_labels(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match=r"1 values are not 0/1, e\.g\. 0\.5 at image 'ID_a', label 'any'"):
        write_labels(wide({"ID_a": [0, 0, 0, 0, 0, 0.5]}, dtype="float64"), tmp_path / "t.csv")


def _probs(index: list[object], value: object = 0.5) -> pd.DataFrame:
    return pd.DataFrame({lab: [value] * len(index) for lab in LABELS}, index=pd.Index(index))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_probs(["ID_a"]).drop(columns="any"), r"missing \['any'\], unexpected \[\]"),
        (_probs(["ID_a"]).assign(extra=1.0), r"missing \[\], unexpected \['extra'\]"),
        (_probs(["ID_a", "../etc"]), r"image ids must read ID_<alphanumeric>; bad: '\.\./etc'"),
        (_probs(["ID_a", "ID_a/b"]), r"bad: 'ID_a/b'"),
        (_probs(["ID_a", "ID_a"]), r"image ids repeat: ID_a"),
        (_probs(["ID_a"], float("nan")), r"6 values are not in \[0, 1\], e\.g\. nan at image 'ID_a'"),
        (_probs(["ID_a"], 1.5), r"6 values are not in \[0, 1\], e\.g\. 1\.5"),
        (_probs(["ID_a"], -0.1), r"6 values are not in \[0, 1\]"),
        (_probs(["ID_a"], "high"), r"wide table values must be numbers"),
    ],
)
def test_write_submission_rejects(tmp_path: Path, frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        write_submission(frame, tmp_path / "sub.csv")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ validate_submission


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return write(tmp_path, HEADER + rows("ID_a", ("0.5",) * 6) + rows("ID_b", ("0.5",) * 6), "sample.csv")


def test_validate_submission_accepts_written_file_and_frame(tmp_path: Path, sample: Path) -> None:
    probs = _probs(["ID_b", "ID_a"], 0.25)
    path = write_submission(probs, tmp_path / "sub.csv")
    validate_submission(path, sample)  # passes: raises nothing
    validate_submission(to_long(probs), sample)


def test_validate_submission_real_sample(rsna_sample: Path, tmp_path: Path) -> None:
    sample_path = rsna_sample / "stage_2_sample_submission.csv"
    probs = read_submission(sample_path) * 0.2
    assert probs.shape == (64, 6)
    validate_submission(write_submission(probs, tmp_path / "sub.csv"), sample_path)
    with pytest.raises(LabelError, match=r"6 ids missing: ID_2cf9df83d_epidural"):
        validate_submission(to_long(probs.iloc[1:]), sample_path)


LONG_OK = [(f"ID_{img}_{lab}", "0.5") for img in "ab" for lab in LABELS]


@pytest.mark.parametrize(
    ("rows_", "messages"),
    [
        pytest.param(LONG_OK[1:], [r"1 ids missing: ID_a_epidural"], id="missing"),
        pytest.param(
            [*LONG_OK, ("ID_c_any", "0.5")], [r"1 ids not in the sample submission: ID_c_any"], id="extra"
        ),
        pytest.param(
            LONG_OK + LONG_OK[:2], [r"2 ids repeated: ID_a_epidural, ID_a_intraparenchymal"], id="repeat"
        ),
        pytest.param(
            [(i, "nan") for i, _ in LONG_OK[:1]] + LONG_OK[1:],
            [r"1 Labels not a number \(or NaN\): line 2: 'ID_a_epidural,nan'"],
            id="nan",
        ),
        pytest.param(
            [*LONG_OK[:-2], (LONG_OK[-2][0], "2"), (LONG_OK[-1][0], "abc")],
            [
                r"1 Labels not a number \(or NaN\): line 13: 'ID_b_any,abc'",
                r"1 Labels outside \[0, 1\]: line 12",
            ],
            id="range-and-text",
        ),
        pytest.param(
            [*LONG_OK[2:], ("ID_z_any", "-1")],
            [
                r"2 ids missing",
                r"1 ids not in the sample",
                r"1 Labels outside \[0, 1\]: line 12: 'ID_z_any,-1'",
            ],
            id="everything-at-once",
        ),
    ],
)
def test_validate_submission_file_problems(
    tmp_path: Path, sample: Path, rows_: list[tuple[str, str]], messages: list[str]
) -> None:
    path = write(tmp_path, HEADER + "".join(f"{i},{v}\n" for i, v in rows_), "sub.csv")
    with pytest.raises(LabelError) as info:
        validate_submission(path, sample)
    text = str(info.value)
    assert text.startswith(f"{path} does not match {sample}")
    for message in messages:
        assert re.search(message, text), (message, text)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"id": ["ID_a_any"], "Label": [0.5]}), r"submission columns are \['id', 'Label'\]"),
        (
            pd.DataFrame({"ID": [i for i, _ in LONG_OK], "Label": [0.5] * 11 + [None]}),
            r"1 Labels not a number \(or NaN\): row 12 \(ID 'ID_b_any', Label nan\)",
        ),
        (
            pd.DataFrame({"ID": [i for i, _ in LONG_OK], "Label": ["0.5"] * 11 + ["x"]}),
            r"row 12 \(ID 'ID_b_any', Label 'x'\)",
        ),
    ],
)
def test_validate_submission_frame_problems(sample: Path, frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        validate_submission(frame, sample)


def test_validate_submission_bad_header(tmp_path: Path, sample: Path) -> None:
    path = write(tmp_path, "image,prob\n", "sub.csv")
    with pytest.raises(LabelError, match=r"sub\.csv: line 1 is 'image,prob', expected the header 'ID,Label'"):
        validate_submission(path, sample)
