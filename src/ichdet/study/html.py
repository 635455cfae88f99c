"""The HTML study report: one self-contained page per study (CSS and images inline, no external asset).

The page shows a "not for diagnostic use" banner, the study summary with the decision per label, an
inline SVG chart of the six probabilities along the ordered slices, the top slices in three windows
with their Grad-CAM overlays (PNG ``data:`` URIs), the skipped series with their reasons and the model
manifest. Pure string building: the figures come in as arrays (:class:`ReportFigures`, made by
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
import json
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

__all__ = ["NOT_FOR_DIAGNOSIS", "REPORT_WINDOWS", "ReportFigures", "SliceFigure", "page_path", "png_data_uri",
           "probability_chart", "render_report", "study_pages", "study_slices", "top_slices", "write_report"]

#: The windows each top slice is shown in (presets of :mod:`ichdet.dicom.windowing`).
REPORT_WINDOWS: tuple[str, ...] = ("brain", "subdural", "bone")

#: The notice on every page, SR and secondary capture.
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE: research software output, not reviewed by a physician"

#: One colour per label, in LABELS order (colour-blind-safe Okabe-Ito palette; "any" in black).
COLOURS: tuple[str, ...] = ("#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#D55E00", "#000000")


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


def probability_chart(slices: Sequence[Mapping[str, Any]], marked: Sequence[int] = (),
                      width: int = 860, height: int = 260) -> str:
    """An inline SVG line chart of the six probabilities (y, 0-1) along the slices (x, in order).

    ``marked`` positions (the top slices) get a dashed vertical line. Pure string; no script.
    """
    left, right, top, bottom = 44, 150, 12, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(slices) - 1, 1)

    def x(i: float) -> float:
        return left + plot_w * i / n

    def y(p: float) -> float:
        return top + plot_h * (1.0 - min(max(p, 0.0), 1.0))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="probability of each label along the slices" xmlns="http://www.w3.org/2000/svg">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     'stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for i in marked:
        parts.append(f'<line class="marked" x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top}" y2="{top + plot_h}" '
                     'stroke="#888" stroke-dasharray="4 3"/>')
    for j, label in enumerate(LABELS):
        points = " ".join(f"{x(i):.1f},{y(float(s['probabilities'][label])):.1f}" for i, s in enumerate(slices))
        widthpx = 2.5 if label == "any" else 1.6
        parts.append(f'<polyline class="series" data-label="{label}" fill="none" stroke="{COLOURS[j]}" '
                     f'stroke-width="{widthpx}" points="{points}"/>')
        ly = top + 16 + 18 * j
        parts.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{COLOURS[j]}" stroke-width="3"/>'
                     f'<text x="{left + plot_w + 38}" y="{ly}">{label}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 f'slice (in order along the slice normal, {len(slices)} slices)</text></svg>')
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


def _summary(study: Mapping[str, Any]) -> str:
    summary = study["summary"]
    if not summary["analysed"]:
        return '<p class="neg" id="decision">Not analysed: no usable axial CT series (see the skipped series)</p>'
    probs, called = summary["probability"], summary["called"]
    rows = []
    for label in LABELS:
        pos = bool(called[label])
        rows.append(f'<tr><td>{label}</td><td>{float(probs[label]):.3f}</td>'
                    f'<td>{float(summary["thresholds"][label]):.3f}</td>'
                    f'<td class="{"pos" if pos else "neg"}">{"positive" if pos else "negative"}</td>'
                    f"<td>{_esc(_ranges_text(study, label))}</td></tr>")
    flagged, headline = _headline(summary)
    return (f'<p class="{"pos" if flagged else "neg"}" id="decision">{_esc(headline)} '
            f'(probability of any hemorrhage {float(probs["any"]):.3f})</p>'
            f'<p class="muted" id="flag-rule">Rule: {_esc(FLAG_RULE)}.</p>'
            "<table><tr><th>label</th><th>probability</th><th>threshold</th><th>decision at the operating point"
            f"</th><th>images where called</th></tr>{''.join(rows)}</table>")


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
    rows = "".join(f"<tr><td>{_esc(s['series_number'])}</td><td>{_esc(s['description'])}</td>"
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


def render_report(result: Mapping[str, Any], study: Mapping[str, Any], figures: ReportFigures) -> str:
    """One study's report (``study``: an entry of ``result["studies"]``) as a complete HTML document
    (UTF-8 string, no external reference). The model manifest and timings come from ``result``."""
    slices = study_slices(study)
    patient = study.get("patient")
    patient_html = (f"<h2>Patient</h2><pre>{_esc(json.dumps(patient, indent=2, default=str))}</pre>"
                    if patient else "")
    chart = (f"<h2>Probabilities along the slices</h2>{probability_chart(slices, [f.position for f in figures.slices])}"
             if slices else "")
    timings = result.get("timings_s")
    timing_html = f"<p class=\"muted\">Timings (s): {_esc(json.dumps(timings, default=str))}</p>" if timings else ""
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>ichdet study report</title><style>{_CSS}</style></head><body><main>"
        f'<div class="notice" role="alert">{_esc(NOT_FOR_DIAGNOSIS)}</div>'
        f"<h1>Head CT: intracranial hemorrhage study report</h1>"
        f'<p class="muted">Study {_esc(study["study_instance_uid"])} &middot; {len(slices)} slices analysed '
        f"in {len(study['series'])} series</p>{patient_html}"
        f"<h2>Summary</h2>{_summary(study)}{chart}"
        f"<h2>Top slices with Grad-CAM</h2>{_figures(figures, slices)}"
        f"<h2>Skipped series</h2>{_skipped(study)}"
        f"<h2>Model</h2>{_model_note(result['model'])}"
        f"<pre>{_esc(json.dumps(result['model'], indent=2, sort_keys=True, default=str))}</pre>"
        f"{timing_html}</main></body></html>\n"
    )


def _index(pages: Sequence[Path]) -> str:
    items = "".join(f'<li><a href="{_esc(p.name)}">Study {k}</a></li>' for k, p in enumerate(pages, start=1))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ichdet study reports"
            f"</title><style>{_CSS}</style></head><body><main><div class=\"notice\">{_esc(NOT_FOR_DIAGNOSIS)}"
            f"</div><h1>Study reports</h1><ul>{items}</ul></main></body></html>\n")


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
    return write_text_atomic(out, _index(paths))
