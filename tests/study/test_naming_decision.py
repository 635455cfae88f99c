"""Slices named by the PACS's image numbers (Instance Number) and positions; one study flag rule, with a
probability exactly at its threshold called (issue 17 items 3, 4 and 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from dicom_ready import make_dicom_ready, study_files, study_result

from ichdet.names import LABELS
from ichdet.study.decision import FLAG_RULE, study_calls
from ichdet.study.html import ReportFigures, render_report
from ichdet.study.naming import range_name, slice_name
from ichdet.study.scan import scan_folder

N_SLICES = 5
FIRST_NUMBER = 101  # PACS image numbers that cannot be mistaken for ichdet's 0-based slice order


def renumber(folder: Path, head_to_foot: bool | None) -> list[int | None]:
    """Give the series of ``folder`` Instance Numbers from FIRST_NUMBER, head to foot (``True``), foot to
    head (``False``) or none (``None``); the numbers in ichdet's slice order (foot to head)."""
    (study,) = scan_folder(folder, min_slices=1).studies
    refs = study.selected[0].slices
    numbers: list[int | None] = []
    for i, ref in enumerate(refs):
        ds = pydicom.dcmread(ref.path)
        if head_to_foot is None:
            del ds.InstanceNumber
            numbers.append(None)
        else:
            numbers.append(FIRST_NUMBER + (len(refs) - 1 - i if head_to_foot else i))
            ds.InstanceNumber = numbers[-1]
        ds.save_as(ref.path)
    return numbers


@pytest.fixture(scope="module")
def raw_files(rsna_sample: Path) -> list[Path]:
    return study_files(rsna_sample / "stage_2_train_images", N_SLICES)


#: slices 1-2 (0-based, foot to head) called for every label
PROBS = [0.1, 0.8, 0.9, 0.2, 0.3]


@pytest.mark.parametrize(("head_to_foot", "called_text"), [
    (True, "images 103-104"),    # numbered head to foot: slices 1-2 from the feet are images 104 and 103
    (False, "images 102-103"),
    (None, "images without Instance Number"),
])
def test_slices_are_named_by_instance_number(raw_files: list[Path], tmp_path: Path, head_to_foot: bool | None,
                                             called_text: str) -> None:
    files = make_dicom_ready(raw_files, tmp_path / "in")
    numbers = renumber(tmp_path / "in", head_to_foot)
    result = study_result(files, PROBS)
    study = result["studies"][0]
    slices = study["series"][0]["slices"]
    assert [s["instance_number"] for s in slices] == numbers
    (r,) = study["summary"]["slice_ranges"]["subdural"]
    assert (r["first_index"], r["last_index"]) == (1, 2)
    assert (r["first_instance_number"], r["last_instance_number"]) == (numbers[1], numbers[2])
    assert (r["first_position_mm"], r["last_position_mm"]) == (slices[1]["position_mm"], slices[2]["position_mm"])
    top = study["summary"]["max_slice"]["any"]
    assert (top["index"], top["instance_number"]) == (2, numbers[2])
    page = render_report(result, study, ReportFigures())
    lo, hi = sorted((slices[1]["position_mm"], slices[2]["position_mm"]))
    expected = f"{called_text} ({lo:.1f} to {hi:.1f} mm)"
    assert re.search(rf"<td>subdural</td>.*?<td>{re.escape(expected)}</td>", page)
    assert ">1-2<" not in page  # ichdet's own slice order is never shown


@pytest.mark.parametrize(("number", "position", "expected"), [
    (12, 34.49, "image 12 (at 34.5 mm)"),
    (0, -2.0, "image 0 (at -2.0 mm)"),
    (None, 5.0, "image without Instance Number (at 5.0 mm)"),
])
def test_slice_name(number: int | None, position: float, expected: str) -> None:
    assert slice_name(number, position) == expected


@pytest.mark.parametrize(("first", "last", "expected"), [
    (12, 7, "images 7-12 (-5.0 to 20.0 mm)"),
    (7, 12, "images 7-12 (-5.0 to 20.0 mm)"),
    (None, 12, "images without Instance Number (-5.0 to 20.0 mm)"),
])
def test_range_name(first: int | None, last: int | None, expected: str) -> None:
    assert range_name({"first_instance_number": first, "last_instance_number": last,
                       "first_position_mm": 20.0, "last_position_mm": -5.0}) == expected


THRESHOLD = 0.3


@pytest.mark.parametrize(("label", "p", "called"), [
    ("subdural", THRESHOLD, True),            # exactly at the threshold: called (>=, not >)
    ("subdural", THRESHOLD - 1e-9, False),
    ("any", THRESHOLD, True),
    ("epidural", 1.0, True),
    ("epidural", 0.0, False),
])
def test_a_probability_at_its_threshold_is_called_and_flags_the_study(raw_files: list[Path], tmp_path: Path,
                                                                       label: str, p: float, called: bool) -> None:
    files = make_dicom_ready(raw_files, tmp_path / "in")
    table = [[0.0] * len(LABELS) for _ in files]
    table[3][LABELS.index(label)] = p
    result = study_result(files, table, THRESHOLD)
    summary = result["studies"][0]["summary"]
    assert summary["called"][label] is called
    assert summary["hemorrhage"] is called and summary["called"]["any"] is called  # the flag rule
    assert summary["flagged_by"] == ([label] if called else [])
    assert summary["flag_rule"] == FLAG_RULE
    expected_ranges = [(3, 3)] if called else []
    assert [(r["first_index"], r["last_index"]) for r in summary["slice_ranges"][label]] == expected_ranges
    assert [(r["first_index"], r["last_index"]) for r in summary["slice_ranges"]["any"]] == expected_ranges
    page = render_report(result, result["studies"][0], ReportFigures())
    headline = re.search(r'id="decision">([^<(]*)', page)
    assert headline is not None
    assert headline.group(1).startswith("Intracranial hemorrhage flagged" if called else
                                        "No intracranial hemorrhage flagged")


@pytest.mark.parametrize(("probability", "expected"), [
    ({"subdural": 0.5}, {"subdural": True, "any": True}),          # a subtype alone flags the study
    ({"any": 0.5}, {"any": True}),
    ({"subdural": 0.49, "any": 0.49}, {}),
    ({"epidural": 0.7, "intraventricular": 0.5}, {"epidural": True, "intraventricular": True, "any": True}),
])
def test_study_calls(probability: dict[str, float], expected: dict[str, bool]) -> None:
    calls = study_calls(dict.fromkeys(LABELS, 0.0) | probability, dict.fromkeys(LABELS, 0.5))
    assert calls == dict.fromkeys(LABELS, False) | expected


def test_report_never_says_no_hemorrhage_above_a_called_label(raw_files: list[Path], tmp_path: Path) -> None:
    """An older result (hemorrhage taken from the 'any' threshold alone) with a subtype called."""
    files = make_dicom_ready(raw_files, tmp_path / "in")
    result = study_result(files, PROBS)
    study = result["studies"][0]
    old = {**study, "summary": {**study["summary"], "hemorrhage": False,
                                "called": dict.fromkeys(LABELS, False) | {"subdural": True}}}
    page = render_report(result, old, ReportFigures())
    assert 'id="decision">Intracranial hemorrhage flagged (subdural)' in page
    assert "No intracranial hemorrhage" not in page
