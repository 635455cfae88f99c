"""The HTML study report: content from real RSNA slices, rendered in headless Chromium (every image decoded
and non-blank, the chart laid out, no horizontal scroll on a laptop screen), and no patient data leaks."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from dicom_ready import PHI, make_dicom_ready, study_files, study_result

from ichdet.dicom.read import read_hu
from ichdet.models.backbones import build_model
from ichdet.models.config import DataConfig, ModelConfig
from ichdet.names import LABELS
from ichdet.study.gradcam import study_figures
from ichdet.study.html import (
    NOT_FOR_DIAGNOSIS,
    REPORT_WINDOWS,
    ReportFigures,
    probability_chart,
    render_report,
    study_pages,
    top_slices,
    write_report,
)
from ichdet.study.naming import range_name

N_SLICES, TOP_K = 6, 2
PROBS = [0.05, 0.2, 0.85, 0.6, 0.1, 0.02]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium (Debian package chromium) not installed")


@pytest.fixture(scope="module")
def case(rsna_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, ReportFigures]:
    """A study result (with a scout series skipped) and its figures from real slices carrying planted
    identifying values."""
    folder = tmp_path_factory.mktemp("src")
    files = make_dicom_ready(study_files(rsna_sample / "stage_2_train_images", N_SLICES), folder)
    scout = pydicom.dcmread(files[0])
    scout.SeriesInstanceUID = "1.2.3.999"
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999.1"
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.save_as(folder / "scout")
    result = study_result(files, PROBS)
    hu_by_sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): read_hu(f) for f in files}
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=False), in_chans=3)
    with torch.no_grad():
        model.fc.weight[LABELS.index("any")] = 1.0  # a CAM with something in it (see test_gradcam)
    figures = study_figures(result["studies"][0], hu_by_sop, [model], DataConfig(image_size=64), top_k=TOP_K)
    return result, figures


def data_uri_images(page: str) -> list[np.ndarray]:
    """Every inline PNG of the page, decoded."""
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [cv2.imdecode(np.frombuffer(base64.b64decode(u), np.uint8), cv2.IMREAD_COLOR) for u in uris]


def test_page_content(case: tuple[dict, ReportFigures]) -> None:
    result, figures = case
    study = result["studies"][0]
    page = render_report(result, study, figures)
    assert page.startswith("<!DOCTYPE html>") and NOT_FOR_DIAGNOSIS in page
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page)  # no external asset
    images = data_uri_images(page)
    assert len(images) == TOP_K * len(REPORT_WINDOWS)
    for img in images:
        assert img.shape == (512, 512, 3) and img.std() > 10  # a CT slice under a heat map, not a blank
    assert [f.position for f in figures.slices] == top_slices(study, TOP_K) == [2, 3]
    polylines = re.findall(r'<polyline class="series" data-label="(\w+)"[^>]*points="([^"]+)"', page)
    assert [label for label, _ in polylines] == list(LABELS)
    assert all(len(points.split()) == N_SLICES for _, points in polylines)
    assert 'id="decision">Intracranial hemorrhage flagged' in page
    assert study["skipped_series"][0]["reason"] in page and "1.2.3.999" in page  # skipped series
    assert "localizer" in study["skipped_series"][0]["reason"]
    (called,) = study["summary"]["slice_ranges"]["any"]
    assert (called["first_index"], called["last_index"]) == (2, 3)
    # the study's model carries no measured operating point (run folders): the decision says so beside it
    assert re.search(r"<td>any</td><td>0\.850</td><td>0\.500</td><td class=\"pos\">positive<div class=\"warn\">"
                     r"no out-of-fold operating point: the threshold is the default, not measured</div></td>"
                     r'<td class="op">-</td><td class="op">-</td><td>' + re.escape(range_name(called)) + "</td>", page)
    assert "ab" * 32 in page  # the manifest


@pytest.mark.parametrize(("probs", "expected"), [
    ([0.0, 1.0], ["60.0,236.0", "710.0,12.0"]),  # plot 60..710 x 12..236 px: 0 at the bottom left, 1 top right
    ([0.5], ["60.0,124.0"]),  # one slice: at the left edge, half way up
])
def test_chart_coordinates(probs: list[float], expected: list[str]) -> None:
    slices = [{"probabilities": {label: p for label in LABELS}} for p in probs]
    svg = probability_chart(slices)
    points = re.findall(r'data-label="any"[^>]*points="([^"]+)"', svg)
    assert points == [" ".join(expected)]


def test_chart_axis_names_the_pacs_images_thresholds_and_direction() -> None:
    """x ticks: Instance Number and position of the slices (numbered head to foot here), feet left and head
    right; each label's threshold drawn at its height; epidural and subdural in different colours and styles."""
    slices = [{"probabilities": dict.fromkeys(LABELS, 0.1), "instance_number": 30 - i, "position_mm": 5.0 * i}
              for i in range(20)]
    svg = probability_chart(slices, thresholds=dict.fromkeys(LABELS, 0.5) | {"subdural": 0.25})
    ticks = re.findall(r'class="xtick-label" x="([\d.]+)"[^>]*>([^<]+)<', svg)
    assert ticks[0] == ("60.0", "30") and ticks[-1] == ("710.0", "11")  # first slice (feet) left, last right
    assert [t for _, t in ticks] == [str(30 - i) for i in (0, 2, 5, 7, 10, 12, 14, 17, 19)]
    assert re.findall(r'class="xtick-mm"[^>]*>([^<]+)<', svg)[:2] == ["0", "10"]
    assert "&#8592; feet" in svg and "head &#8594;" in svg
    lines = dict(re.findall(r'class="threshold" data-label="(\w+)"[^>]*y1="([\d.]+)"', svg))
    assert lines == dict.fromkeys(LABELS, "124.0") | {"subdural": "180.0"}
    style = dict((m[0], m[1:]) for m in re.findall(
        r'<polyline class="series" data-label="(\w+)" fill="none" stroke="(#\w+)" stroke-width="[\d.]+"'
        r'(?: stroke-dasharray="([^"]+)")?', svg))
    assert style["epidural"][0] != style["subdural"][0] and style["epidural"][1] != style["subdural"][1]


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=180, check=False)


# Run in the page by the test only (the report itself has no script): each image drawn on a canvas and
# its pixel range measured, the chart's laid-out size, the page width; written into the DOM for --dump-dom.
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img")].map(img => {
    const c = document.createElement("canvas"); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext("2d"); g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data; let lo = 255, hi = 0;
    for (let i = 0; i < d.length; i += 4) {
      lo = Math.min(lo, d[i], d[i+1], d[i+2]); hi = Math.max(hi, d[i], d[i+1], d[i+2]); }
    const r = img.getBoundingClientRect();
    return {w: img.naturalWidth, shown: r.width, lo, hi}; });
  const chart = document.querySelector("svg.chart").getBoundingClientRect();
  const out = {imgs, chart: [chart.width, chart.height], scroll: document.documentElement.scrollWidth,
               notice: document.querySelector(".notice").getBoundingClientRect().top};
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre); });</script>"""


def rendered(page: Path, tmp_path: Path) -> dict:
    """What headless Chromium measured of ``page`` on a 1366 x 900 laptop screen (the PROBE's JSON)."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(["--window-size=1366,900", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"'))


def check_rendered(result: dict, images: int) -> None:
    """Every overlay decoded, visible and not blank; the chart drawn; no horizontal scrolling."""
    assert len(result["imgs"]) == images
    for img in result["imgs"]:
        assert img["w"] == 512 and img["shown"] > 200 and img["hi"] - img["lo"] > 100  # decoded, visible, not blank
    assert result["chart"][0] > 800 and result["chart"][1] > 200
    assert result["scroll"] <= 1366  # no horizontal scrolling on a laptop screen


@needs_chromium
def test_chromium_renders_every_image_and_the_chart(case: tuple[dict, ReportFigures], tmp_path: Path) -> None:
    result, figures = case
    page = write_report(result, {result["studies"][0]["study_instance_uid"]: figures}, tmp_path / "report.html")
    result = rendered(page, tmp_path)
    check_rendered(result, TOP_K * len(REPORT_WINDOWS))
    assert result["notice"] < 100  # the notice is at the top

    shot = tmp_path / "shot.png"
    run = chromium([f"--screenshot={shot}", "--window-size=1366,900", "--virtual-time-budget=10000", page.as_uri()],
                   tmp_path)
    assert shot.is_file(), run.stderr[-2000:]
    pixels = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert pixels.shape[:2] == (900, 1366) and pixels.std() > 20
    banner = pixels[:80].reshape(-1, 3).astype(int)  # BGR: the red "not for diagnostic use" notice
    assert ((banner[:, 2] > 150) & (banner[:, 1] < 60) & (banner[:, 0] < 80)).sum() > 5000


def test_no_patient_data_in_any_output(case: tuple[dict, ReportFigures], tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    result, figures = case
    study = result["studies"][0]
    two = {**result, "studies": [study, {**study, "study_instance_uid": "1.2.3.4"}]}
    with caplog.at_level(logging.DEBUG):
        write_report(two, {"1.2.3.4": figures}, tmp_path / "report.html")
    texts = [p.read_text() for p in tmp_path.iterdir()] + [p.name for p in tmp_path.iterdir()]
    texts += [caplog.text, *capsys.readouterr()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-1.html", "report-2.html", "report.html"]
    for value in PHI.values():
        for variant in {value, value.replace("^", " "), value.split("^")[0]}:
            assert not any(variant.lower() in text.lower() for text in texts), variant
    shown = render_report(result, {**study, "patient": {"PatientName": PHI["PatientName"]}}, figures)
    assert PHI["PatientName"] in shown  # with include_phi the result carries it and the page shows it


def test_write_report_refuses_nothing_and_replaces_atomically(case: tuple[dict, ReportFigures], tmp_path: Path) -> None:
    result = case[0]
    out = tmp_path / "report.html"
    with pytest.raises(ValueError, match="no study"):
        write_report({**result, "studies": []}, {}, out)
    assert not out.exists()
    out.write_text("old")
    assert write_report(result, {}, out) == out
    assert "No overlay images" in out.read_text() and [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.parametrize(("number", "expected"), [
    (7, "series 2: {0}; series 7: image 5 (at 1.0 mm)"),
    (None, "series 2: {0}; series without number: image 5 (at 1.0 mm)"),
])
def test_ranges_of_several_series_name_the_series(case: tuple[dict, ReportFigures], number: int | None,
                                                  expected: str) -> None:
    result, figures = case
    study = result["studies"][0]
    first = study["series"][0]
    other = {**first, "series_instance_uid": "1.2.3.77", "series_number": number}
    (called,) = study["summary"]["slice_ranges"]["any"]
    ranges = [called, {"series_instance_uid": "1.2.3.77", "first_index": 0, "last_index": 0,
                       "first_instance_number": 5, "last_instance_number": 5,
                       "first_position_mm": 1.0, "last_position_mm": 1.0}]
    two = {**study, "series": [first, other],
           "summary": {**study["summary"], "slice_ranges": {**study["summary"]["slice_ranges"], "any": ranges}}}
    assert first["series_number"] == 2  # tests/dicom_ready.py gives the series number 2
    assert f"<td>{expected.format(range_name(called))}</td></tr>" in render_report(result, two, figures)


def test_study_pages_are_the_names_write_report_gives(tmp_path: Path) -> None:
    for name in ["report.html", "report-1.html", "report-2.html", "report-10.html", "report-01.html", "report-x.html",
                 "report-3.htm", "other-1.html", "report-1-2.html"]:
        (tmp_path / name).write_text("x")
    assert [p.name for p in study_pages(tmp_path / "report.html")] == ["report-1.html", "report-2.html",
                                                                       "report-10.html"]
    assert study_pages(tmp_path / "missing" / "report.html") == []


PROVENANCE = {"training": {"synthetic": True, "data": "ichdet synth"},
              "operating_points": {label: {"threshold": 0.5, "auc": 0.8, "sensitivity": 0.9 + 0.01 * i,
                                           "specificity": 0.5 + 0.01 * i, "positives": 30,
                                           "warnings": ["AUC below 0.5"] if label == "epidural" else []}
                                   for i, label in enumerate(LABELS)}}


@pytest.mark.parametrize(("extra", "synthetic", "operating"), [
    (PROVENANCE, True, True),
    ({"training": {"synthetic": False}}, False, False),
    ({}, False, False),  # a result written before bundles recorded their provenance
])
def test_operating_points_and_training_data_are_shown(case: tuple[dict, ReportFigures], extra: dict,
                                                      synthetic: bool, operating: bool) -> None:
    result, figures = case
    result = {**result, "model": {**result["model"], **extra}, "warnings": ["a warning of the result"]}
    page = render_report(result, result["studies"][0], figures)
    assert ('id="synthetic">DEMONSTRATION MODEL' in page) == synthetic
    assert '<li>a warning of the result</li>' in page
    cells = re.findall(r'<td class="op">([^<]+)</td><td class="op">([^<]+)</td>', page)
    expected = [(f"{0.9 + 0.01 * i:.2f}", f"{0.5 + 0.01 * i:.2f}") if operating else ("-", "-")
                for i in range(len(LABELS))]
    assert cells == expected
    assert ('<div class="warn">AUC below 0.5</div>' in page) == operating
    model = re.search(r"<h2>Model</h2>(.*?)(?:<p class=\"muted\">Timings|</main>)", page, re.S)
    assert model and "<pre>" not in model.group(1) and '"bundle_sha256"' not in model.group(1)  # no JSON dump
    assert re.search(r"<th>bundle sha256</th><td>" + "ab" * 32 + "</td>", model.group(1))


def test_index_is_a_worklist_flagged_first(case: tuple[dict, ReportFigures], tmp_path: Path) -> None:
    result, _ = case
    study = result["studies"][0]
    summary = study["summary"]

    def variant(uid: str, p_any: float, called: dict[str, bool]) -> dict:
        return {**study, "study_instance_uid": uid,
                "summary": {**summary, "probability": {**summary["probability"], "any": p_any},
                            "called": dict.fromkeys(LABELS, False) | called, "hemorrhage": any(called.values())}}

    studies = [variant("1.1", 0.2, {}), variant("1.2", 0.6, {"subdural": True, "any": True}),
               variant("1.3", 0.4, {}), variant("1.4", 0.95, {"any": True}),
               {**study, "study_instance_uid": "1.5", "summary": {"analysed": False}, "series": []}]
    write_report({**result, "studies": studies}, {}, tmp_path / "index.html")
    page = (tmp_path / "index.html").read_text()
    rows = re.findall(r'<td class="flag[^"]*">([^<]+)</td><td>([^<]+)</td><td>(\d+)</td>.*?<a href="([^"]+)">', page)
    assert rows == [("FLAGGED", "0.950", str(N_SLICES), "index-4.html"),
                    ("FLAGGED: subdural", "0.600", str(N_SLICES), "index-2.html"),
                    ("not flagged", "0.400", str(N_SLICES), "index-3.html"),
                    ("not flagged", "0.200", str(N_SLICES), "index-1.html"),
                    ("not analysed", "-", "0", "index-5.html")]
