"""The HTML study report: one self-contained page per study (CSS and images inline, no external asset).

The page shows a "not for diagnostic use" banner (and a demonstration-model banner when the bundle was
trained on synthetic data, with the result's warnings), the study summary with the decision per label
(:mod:`ichdet.study.decision`) next to its threshold's sensitivity and specificity, an inline SVG chart of
the six probabilities along the slices (feet to head, ticked with Instance Numbers and positions, the
thresholds drawn), the top slices in three windows with their Grad-CAM overlays (PNG ``data:`` URIs), the
skipped series with their reasons and the model as tables. Several studies: an index page listing them as a
worklist, flagged first. Slices are named as a PACS numbers them (:mod:`ichdet.study.naming`). Pure string
building: the figures come in as arrays (:class:`ReportFigures`, made by
:func:`ichdet.study.gradcam.study_figures`), nothing here touches torch or DICOM.

It reads the study result of ``ichdet predict-study`` (``predict_study(...).result``; the schema is
docs/study-result.md, version 1): a ``studies[]`` entry for the page's content (``summary``, ``series``,
``skipped_series``, ``patient``) and the result's ``model`` and ``timings_s``.

Patient data: the page shows only what the result holds; a result made without ``include_phi`` holds
no name, ID, birth date, accession number or institution, and neither does this page. A ``patient``
mapping in the result (``include_phi``) is shown as is.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ichdet.io import write_text_atomic
from ichdet.names import LABELS
from ichdet.study.decision import FLAG_RULE
from ichdet.study.naming import ranges_text, slice_name

__all__ = ["COLOURS", "NOT_FOR_DIAGNOSIS", "REPORT_WINDOWS", "ReportFigures", "SliceFigure", "operating_point",
           "page_path", "png_data_uri", "probability_chart", "render_report", "series_names", "study_pages",
           "study_slices", "synthetic_training", "top_slices", "write_report"]

#: The windows each top slice is shown in (presets of :mod:`ichdet.dicom.windowing`).
REPORT_WINDOWS: tuple[str, ...] = ("brain", "subdural", "bone")

#: The notice on every page, SR and secondary capture.
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE: research software output, not reviewed by a physician"

#: One colour per label, in LABELS order (colour-blind-safe Okabe-Ito palette; "any" in black). Epidural
#: (orange) and subdural (blue, dashed) differ in hue and in line style: the two are told apart on a CT.
COLOURS: tuple[str, ...] = ("#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#0072B2", "#000000")
#: Line style per label (SVG stroke-dasharray; "" solid).
DASHES: tuple[str, ...] = ("", "2 3", "", "6 2 1 2", "7 3", "")


@dataclass(frozen=True)
class SliceFigure:
    """One top slice: where it is (``position`` in :func:`study_slices` order), its probabilities, and
    its overlay images, RGB uint8 (H, W, 3), keyed by window name."""

    sop_uid: str
    position: int
    label: str
    probabilities: dict[str, float]
    overlays: dict[str, np.ndarray]


@dataclass(frozen=True)
class ReportFigures:
    """The images of one study's report: its top slices, highest probability first, and the runs whose
    CNNs made the Grad-CAM (``cam_models``: e.g. ``"base (base run of sequence member seq)"``)."""

    slices: list[SliceFigure] = field(default_factory=list)
    cam_models: tuple[str, ...] = ()

    def overlays(self) -> list[np.ndarray]:
        """Every overlay image, slice by slice, window by window (the secondary-capture series' frames)."""
        return [img for fig in self.slices for img in fig.overlays.values()]

    def overlay_sources(self) -> list[str]:
        """The SOP Instance UID of the slice each of :meth:`overlays` shows (their Source Image Sequence)."""
        return [fig.sop_uid for fig in self.slices for _ in fig.overlays]


def study_slices(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The study's analysed slices in order, series after series, each with its ``series_instance_uid`` added."""
    out = []
    for series in study["series"]:
        for entry in series["slices"]:
            out.append({**entry, "series_instance_uid": series["series_instance_uid"]})
    return out


def top_slices(study: Mapping[str, Any], k: int, label: str = "any") -> list[int]:
    """Positions (in :func:`study_slices` order) of the ``k`` slices most likely to show ``label``.

    Ties keep the slice order (stable sort), so the choice is reproducible.
    """
    scores = np.array([entry["probabilities"][label] for entry in study_slices(study)], np.float64)
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


def png_data_uri(rgb: np.ndarray) -> str:
    """An RGB (or grey) uint8 image as a ``data:image/png;base64,...`` URI."""
    img = rgb if rgb.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"png_data_uri: OpenCV could not encode an image of shape {rgb.shape}")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _tick_positions(n: int, most: int = 9) -> list[int]:
    """At most ``most`` slice positions spread over ``n`` slices, the first and the last included."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def probability_chart(slices: Sequence[Mapping[str, Any]], marked: Sequence[int] = (),
                      thresholds: Mapping[str, float] | None = None, width: int = 860, height: int = 300) -> str:
    """An inline SVG line chart of the six probabilities (y, 0-1) along the slices (x, in order, feet on
    the left and head on the right), the x axis ticked with each slice's Instance Number ("image 12") and
    position (mm), each label's threshold a short dashed line in its colour at the right edge.

    ``marked`` positions (the top slices) get a dashed vertical line. Pure string; no script.
    """
    left, right, top, bottom = 60, 150, 12, 64
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(slices) - 1, 1)

    def x(i: float) -> float:
        return left + plot_w * i / n

    def y(p: float) -> float:
        return top + plot_h * (1.0 - min(max(p, 0.0), 1.0))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="probability of each label along the slices, feet to head" '
             'xmlns="http://www.w3.org/2000/svg">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     'stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for i in _tick_positions(len(slices)):
        entry = slices[i]
        number = entry.get("instance_number")
        where = entry.get("position_mm")
        parts.append(f'<line class="xtick" x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top + plot_h}" '
                     f'y2="{top + plot_h + 4}" stroke="#666"/>'
                     f'<text class="xtick-label" x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f'{"-" if number is None else number}</text>')
        if where is not None:
            parts.append(f'<text class="xtick-mm" x="{x(i):.1f}" y="{top + plot_h + 29}" text-anchor="middle" '
                         f'fill="#666">{float(where):.0f}</text>')
    for i in marked:
        parts.append(f'<line class="marked" x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top}" y2="{top + plot_h}" '
                     'stroke="#888" stroke-dasharray="4 3"/>')
    for j, label in enumerate(LABELS):
        if thresholds and label in thresholds:
            ty = y(float(thresholds[label]))
            parts.append(f'<line class="threshold" data-label="{label}" x1="{left + plot_w - 60}" '
                         f'x2="{left + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="{COLOURS[j]}" '
                         'stroke-width="2" stroke-dasharray="3 2"/>')
    for j, label in enumerate(LABELS):
        points = " ".join(f"{x(i):.1f},{y(float(s['probabilities'][label])):.1f}" for i, s in enumerate(slices))
        widthpx = 2.5 if label == "any" else 1.8
        dash = f' stroke-dasharray="{DASHES[j]}"' if DASHES[j] else ""
        parts.append(f'<polyline class="series" data-label="{label}" fill="none" stroke="{COLOURS[j]}" '
                     f'stroke-width="{widthpx}"{dash} points="{points}"/>')
        ly = top + 16 + 18 * j
        parts.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{COLOURS[j]}" stroke-width="3"{dash}/>'
                     f'<text x="{left + plot_w + 38}" y="{ly}">{label}</text>')
    legend_y = top + 16 + 18 * len(LABELS) + 8
    parts.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{legend_y - 4}" '
                 f'y2="{legend_y - 4}" stroke="#444" stroke-width="2" stroke-dasharray="3 2"/>'
                 f'<text x="{left + plot_w + 38}" y="{legend_y}">threshold</text>')
    parts.append(f'<text x="{left - 14}" y="{top + plot_h + 16}" text-anchor="end" fill="#444">image</text>'
                 f'<text x="{left - 14}" y="{top + plot_h + 29}" text-anchor="end" fill="#444">mm</text>')
    parts.append(f'<text class="direction" x="{left}" y="{height - 8}" text-anchor="start">&#8592; feet</text>'
                 f'<text class="direction" x="{left + plot_w}" y="{height - 8}" text-anchor="end">head &#8594;</text>'
                 f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle">'
                 f'{len(slices)} slices along the slice normal: Instance Number (image) and position (mm)</text></svg>')
    return "".join(parts)


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#eef0f3;color:#1b1f24}
main{max-width:1180px;margin:0 auto;padding:16px 20px 40px;background:#fff;min-height:100vh}
.notice{background:#b00020;color:#fff;font-weight:700;padding:10px 14px;border-radius:4px;letter-spacing:.02em}
h1{font-size:1.45em;margin:.6em 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .5em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top}
.pos{color:#b00020;font-weight:700}.neg{color:#2e7d32}
.chart{width:100%;height:auto;font-size:12px;font-family:inherit}
.slice{display:grid;grid-template-columns:repeat(3,1fr);gap:8px;margin-bottom:14px}
figure{margin:0}figure img{width:100%;height:auto;image-rendering:auto;border-radius:3px;display:block}
figcaption{font-size:.85em;color:#555}.muted{color:#666;font-size:.9em}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px;max-height:320px}
.demo{background:#7a4b00;color:#fff;font-weight:700;padding:8px 14px;border-radius:4px;margin-top:6px}
.warn{color:#8a5300}.kv th{width:14em;color:#444;font-weight:600}
.worklist td.flag{font-weight:700}.worklist td.where{white-space:nowrap}.worklist tr.flagged td{background:#fdecee}
"""


def series_names(study: Mapping[str, Any]) -> dict[str, str]:
    """Series UID -> ``"series 3"`` (its Series Number) when the study has several analysed series, else {}:
    with one series the image numbers say all."""
    if len(study["series"]) < 2:
        return {}
    return {s["series_instance_uid"]: f"series {s['series_number']}" if s["series_number"] is not None
            else "series without number" for s in study["series"]}


def _ranges_text(study: Mapping[str, Any], label: str) -> str:
    """Where ``label`` is called, by Instance Number and position (:func:`ichdet.study.naming.ranges_text`)."""
    return ranges_text(study["summary"]["slice_ranges"][label], series_names(study)) or "-"


def _headline(summary: Mapping[str, Any]) -> tuple[bool, str]:
    """The study flag (:data:`ichdet.study.result.FLAG_RULE`) and its one-line text: never "no hemorrhage"
    above a called label, whatever the result file says."""
    called = [label for label in LABELS if summary["called"].get(label)]
    flagged = bool(summary["hemorrhage"]) or bool(called)
    if not flagged:
        return False, "No intracranial hemorrhage flagged"
    subtypes = [label for label in called if label != "any"]
    return True, "Intracranial hemorrhage flagged" + (f" ({', '.join(subtypes)})" if subtypes else "")


def operating_point(model: Mapping[str, Any], label: str) -> Mapping[str, Any]:
    """``model.operating_points[label]`` (threshold, sensitivity, specificity, auc, warnings; from the
    bundle's out-of-fold predictions) or {} where the result has none."""
    points = model.get("operating_points")
    point = points.get(label) if isinstance(points, Mapping) else None
    return point if isinstance(point, Mapping) else {}


def _fraction(value: Any) -> str:
    return f"{float(value):.2f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _summary(study: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    summary = study["summary"]
    if not summary["analysed"]:
        return '<p class="neg" id="decision">Not analysed: no usable axial CT series (see the skipped series)</p>'
    probs, called = summary["probability"], summary["called"]
    rows = []
    for label in LABELS:
        pos = bool(called[label])
        point = operating_point(model, label)
        warns = [str(w) for w in point.get("warnings") or []]
        warn_html = f'<div class="warn">{_esc("; ".join(warns))}</div>' if warns else ""
        rows.append(f'<tr><td>{label}</td><td>{float(probs[label]):.3f}</td>'
                    f'<td>{float(summary["thresholds"][label]):.3f}</td>'
                    f'<td class="{"pos" if pos else "neg"}">{"positive" if pos else "negative"}{warn_html}</td>'
                    f'<td class="op">{_fraction(point.get("sensitivity"))}</td>'
                    f'<td class="op">{_fraction(point.get("specificity"))}</td>'
                    f"<td>{_esc(_ranges_text(study, label))}</td></tr>")
    flagged, headline = _headline(summary)
    return (f'<p class="{"pos" if flagged else "neg"}" id="decision">{_esc(headline)} '
            f'(probability of any hemorrhage {float(probs["any"]):.3f})</p>'
            f'<p class="muted" id="flag-rule">Rule: {_esc(FLAG_RULE)}. Sensitivity and specificity: the '
            "operating point of each threshold on the bundle's out-of-fold predictions (- where the bundle "
            "records none).</p>"
            "<table><tr><th>label</th><th>probability</th><th>threshold</th><th>decision at the operating point"
            "</th><th>sensitivity</th><th>specificity</th><th>images where called</th></tr>"
            f"{''.join(rows)}</table>")


def _figures(figures: ReportFigures, slices: Sequence[Mapping[str, Any]]) -> str:
    if not figures.slices:
        return '<p class="muted">No overlay images (no 2D model to explain, or no slice analysed).</p>'
    blocks = []
    for fig in figures.slices:
        probs = ", ".join(f"{k} {float(v):.2f}" for k, v in fig.probabilities.items())
        entry = slices[fig.position]
        name_ = slice_name(entry.get("instance_number"), entry["position_mm"])
        cells = "".join(f'<figure><img class="overlay" alt="{_esc(name_)} {name} window, Grad-CAM of '
                        f'{_esc(fig.label)}" src="{png_data_uri(img)}"><figcaption>{_esc(name)} window'
                        "</figcaption></figure>" for name, img in fig.overlays.items())
        blocks.append(f"<h3>{_esc(name_[0].upper() + name_[1:])} <span class=\"muted\">{_esc(fig.sop_uid)} &middot; "
                      f"{_esc(probs)}</span></h3><div class=\"slice\">{cells}</div>")
    names = _esc(", ".join(figures.cam_models))
    source = (f'<p class="muted" id="cam-source">Grad-CAM of the CNNs (every fold) of {names}; the probabilities, '
              "chart and decision are the whole ensemble's.</p>" if figures.cam_models else "")
    return source + "".join(blocks)


def _skipped(study: Mapping[str, Any]) -> str:
    skipped = study["skipped_series"]
    if not skipped:
        return '<p class="muted">None: every series found was analysed.</p>'
    rows = "".join(f"<tr><td>{_cell(s['series_number'])}</td><td>{_cell(s['description'])}</td>"
                   f"<td>{_esc(s['series_instance_uid'])}</td><td>{_esc(s['n_files'])}</td>"
                   f"<td>{_esc(s['reason'])}</td></tr>" for s in skipped)
    head = "<tr><th>number</th><th>description</th><th>series</th><th>files</th><th>reason</th></tr>"
    return f"<table>{head}{rows}</table>"


def _model_note(model: Mapping[str, Any]) -> str:
    """How the ensemble's sequence members are explained (none: no note)."""
    seq = [m for m in model.get("members") or [] if m.get("kind") == "seq"]
    if not seq:
        return ""
    each = "; ".join(f"{m['name']} reads the per-slice embeddings of its base runs {', '.join(m['bases'])}"
                     for m in seq)
    return (f'<p id="model-note">Sequence members: {_esc(each)}. A sequence model sees embeddings, not pixels, '
            "so the Grad-CAM overlays come from its base runs' CNNs; the probabilities and the decision are "
            "the whole ensemble's, sequence members included.</p>")


def synthetic_training(model: Mapping[str, Any]) -> bool:
    """Whether the bundle says it was trained on ichdet's synthetic data set (``model.training.synthetic``)."""
    training = model.get("training")
    return isinstance(training, Mapping) and bool(training.get("synthetic"))


def _notices(result: Mapping[str, Any]) -> str:
    """The demonstration-model banner (synthetic training data) and the result's warnings, at the top."""
    out = ""
    if synthetic_training(result["model"]):
        out += ('<div class="demo" id="synthetic">DEMONSTRATION MODEL: trained on ichdet\'s synthetic data set '
                "only. Its probabilities say nothing about real patients.</div>")
    warnings = [str(w) for w in result.get("warnings") or []]
    if warnings:
        out += '<ul class="warn" id="warnings">' + "".join(f"<li>{_esc(w)}</li>" for w in warnings) + "</ul>"
    return out


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple):
        return _esc(", ".join(map(str, value))) or "-"
    return "-" if value is None or value == "" else _esc(value)


def _model_section(model: Mapping[str, Any]) -> str:
    """The ensemble as tables: identification, training, members (no JSON dump)."""
    training = model.get("training")
    facts = [("bundle sha256", model.get("bundle_sha256") or "none (run folders)"),
             ("run folders", model.get("runs")), ("ichdet version", model.get("ichdet_version")),
             ("thresholds", model.get("thresholds_source"))]
    if isinstance(training, Mapping):
        facts += [(f"training: {k}", v) for k, v in training.items() if not isinstance(v, Mapping | list)]
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in facts if v is not None)
    members = []
    for m in [*(model.get("members") or []), *(model.get("bases") or [])]:
        network = (f"{m.get('sequence_model', '-')} over {', '.join(m.get('bases') or [])}" if m.get("kind") == "seq"
                   else f"{m.get('backbone', '-')} at {m.get('image_size', '-')} px")
        members.append(f"<tr><td>{_cell(m.get('name'))}</td><td>{_cell(m.get('kind'))}</td>"
                       f"<td>{_cell(m.get('weight'))}</td><td>{_cell(m.get('folds'))}</td><td>{_esc(network)}</td></tr>")
    table = ("<table id=\"members\"><tr><th>member</th><th>kind</th><th>weight</th><th>folds</th><th>network</th>"
             f"</tr>{''.join(members)}</table>" if members else "")
    return f'<table class="kv" id="model">{rows}</table>{_model_note(model)}{table}'


def render_report(result: Mapping[str, Any], study: Mapping[str, Any], figures: ReportFigures) -> str:
    """One study's report (``study``: an entry of ``result["studies"]``) as a complete HTML document
    (UTF-8 string, no external reference). The model manifest and timings come from ``result``."""
    slices = study_slices(study)
    patient = study.get("patient")
    patient_html = ("<h2>Patient</h2><table class=\"kv\">" + "".join(
        f"<tr><th>{_esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in patient.items()) + "</table>"
        if patient else "")
    thresholds = study["summary"].get("thresholds") if study["summary"].get("analysed") else None
    chart = (f"<h2>Probabilities along the slices</h2>"
             f"{probability_chart(slices, [f.position for f in figures.slices], thresholds)}" if slices else "")
    timings = result.get("timings_s") or {}
    timing_html = ('<p class="muted">Timings: ' + ", ".join(f"{_esc(k)} {float(v):.2f} s" for k, v in timings.items()
                                                          if isinstance(v, int | float)) + "</p>") if timings else ""
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>ichdet study report</title><style>{_CSS}</style></head><body><main>"
        f'<div class="notice" role="alert">{_esc(NOT_FOR_DIAGNOSIS)}</div>{_notices(result)}'
        f"<h1>Head CT: intracranial hemorrhage study report</h1>"
        f'<p class="muted">Study {_esc(study["study_instance_uid"])} &middot; {len(slices)} slices analysed '
        f"in {len(study['series'])} series</p>{patient_html}"
        f"<h2>Summary</h2>{_summary(study, result['model'])}{chart}"
        f"<h2>Top slices with Grad-CAM</h2>{_figures(figures, slices)}"
        f"<h2>Skipped series</h2>{_skipped(study)}"
        f"<h2>Model</h2>{_model_section(result['model'])}"
        f"{timing_html}</main></body></html>\n"
    )


def _worklist_row(study: Mapping[str, Any], page: str, k: int) -> tuple[tuple[int, float, int], str]:
    """(sort key: flagged first, then the highest probability of any hemorrhage) and one worklist row."""
    summary = study["summary"]
    slices = study_slices(study)
    if not summary.get("analysed"):
        return (2, 0.0, k), (f'<tr><td class="flag muted">not analysed</td><td>-</td><td>0</td>'
                             f'<td>-</td><td><a href="{_esc(page)}">Study {k}</a></td></tr>')
    flagged, _ = _headline(summary)
    called = [label for label in LABELS if summary["called"].get(label) and label != "any"]
    flag = ("FLAGGED" + (f": {', '.join(called)}" if called else "")) if flagged else "not flagged"
    p_any = float(summary["probability"]["any"])
    top = summary.get("max_slice", {}).get("any", {})
    where = slice_name(top.get("instance_number"), top["position_mm"]) if "position_mm" in top else "-"
    patient = study.get("patient") or {}
    who = f" &middot; {_esc(patient.get('PatientName'))}" if patient.get("PatientName") else ""
    row = (f'<tr class="{"flagged" if flagged else ""}"><td class="flag {"pos" if flagged else "neg"}">'
           f'{_esc(flag)}</td><td>{p_any:.3f}</td><td>{len(slices)}</td><td class="where">{_esc(where)}</td>'
           f'<td><a href="{_esc(page)}">Study {k}</a>{who}<div class="muted">{_esc(study["study_instance_uid"])}'
           "</div></td></tr>")
    return (0 if flagged else 1, -p_any, k), row


def _index(result: Mapping[str, Any], pages: Sequence[Path]) -> str:
    """The worklist of several studies: one row per study, flagged ones first, then by probability."""
    rows = sorted(_worklist_row(st, p.name, k) for k, (st, p) in enumerate(zip(result["studies"], pages, strict=True),
                                                                            start=1))
    head = ("<tr><th>flag</th><th>probability of any hemorrhage</th><th>slices analysed</th>"
            "<th>most likely slice</th><th>report</th></tr>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ichdet worklist"
            f"</title><style>{_CSS}</style></head><body><main><div class=\"notice\">{_esc(NOT_FOR_DIAGNOSIS)}"
            f"</div>{_notices(result)}<h1>Worklist: {len(pages)} studies, flagged first</h1>"
            f'<table class="worklist">{head}{"".join(r for _, r in rows)}</table></main></body></html>\n')


def page_path(out: Path, k: int) -> Path:
    """Where :func:`write_report` puts the page of the ``k``-th study (from 1) when it has several."""
    return out.with_name(f"{out.stem}-{k}.html")


def study_pages(out: Path) -> list[Path]:
    """The entries next to ``out`` named like a study page of it (:func:`page_path`, any ``k``), by ``k``.

    How many pages a report writes is known only once its folder is scanned; a command that must not
    replace a file it did not write checks these before any work.
    """
    pattern = re.compile(re.escape(out.stem) + r"-([1-9][0-9]*)\.html")
    found = [(int(m.group(1)), p) for p in out.parent.iterdir()
             if (m := pattern.fullmatch(p.name))] if out.parent.is_dir() else []
    return [p for _, p in sorted(found)]


def write_report(result: Mapping[str, Any], figures: Mapping[str, ReportFigures], out: Path) -> Path:
    """Write the report of every study of ``result`` atomically and return ``out``.

    ``figures`` maps a Study Instance UID to its figures (a study without an entry gets none). One
    study: ``out`` is its page. Several: each study's page is ``<stem>-<k>.html`` next to ``out``
    (numbered, so no identifier reaches a file name) and ``out`` is an index linking them, written last.
    """
    out = Path(out)
    studies = result["studies"]
    if not studies:
        raise ValueError("write_report: no study to report")
    pages = [render_report(result, st, figures.get(st["study_instance_uid"], ReportFigures())) for st in studies]
    if len(pages) == 1:
        return write_text_atomic(out, pages[0])
    paths = [page_path(out, k) for k in range(1, len(pages) + 1)]
    for path, page in zip(paths, pages, strict=True):
        write_text_atomic(path, page)
    return write_text_atomic(out, _index(result, paths))
