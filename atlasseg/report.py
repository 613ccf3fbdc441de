"""QC report of a run: a picture per target (``<out>/<target>/qc.png``) and one static ``<out>/index.html``.

The picture draws the segmentation's outlines (one colour per label value, along the voxel edges) over
the target image on three orthogonal slices through the centre of the segmentation's bounding box (one
slice for 2D); a target with ground truth gets the reference outlines on the same slices (a second row;
beside it in 2D). The grey window is the image's 0.5th–99.5th intensity percentile.

Orientation: a 3D image is first put on its nearest LPS grid (axes permuted and flipped, never
resampled: ``SimpleITK.DICOMOrient``) and shown as radiologists view it: axial slices from the feet
(patient's right on the left, anterior up), coronal from the front (right on the left, superior up),
sagittal from the patient's left (anterior on the left, superior up); letters at the edges say so. An
oblique image is shown on that nearest grid, its rotation not undone (the picture's title says so). A
2D image is shown on its voxel grid, first axis to the right, second axis down. Pixels are drawn at
their physical size in mm, so anisotropic voxels keep the anatomy's proportions.

The page holds the run's summary, the metrics table, and per target its picture, its atlas ranking
(selected and dropped atlases, with reasons) and its registration records. It needs no server: the
pictures are linked relative to ``index.html``. Every text from the run is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import SimpleITK as sitk
import yaml

from .errors import AtlassegError
from .evaluation import header, rows
from .imageio import atomic_write, atomic_write_text, read_image, read_labels
from .manifest import Manifest, load_manifest

# Saturated colours that stand out on a grey image, label value v gets _PALETTE[(v - 1) % 10]: the same
# label has the same colour in every picture of every run.
_PALETTE = ("#ff0000", "#00e000", "#1e90ff", "#ffff00", "#00ffff", "#ff00ff", "#ff8c00", "#8a2be2",
            "#7fff00", "#ff69b4")
_WINDOW_PERCENTILES = (0.5, 99.5)
_WIDTH_INCHES = 10.0  # a picture's panels fill about this width ...
_ROW_INCHES = {2: 5.0, 3: 3.6}  # ... and at most this height per row (2D, 3D)
_DPI = 100


def label_colour(value: int) -> str:
    """The colour of label ``value`` (> 0) in the pictures."""
    return _PALETTE[(value - 1) % len(_PALETTE)]


@dataclass(frozen=True)
class _View:
    name: str
    axis: int | None  # numpy axis (z, y, x) the slice cuts; None: the whole 2D image
    flip: bool  # rows reversed (superior up)
    sides: tuple[str, str, str, str] | None  # patient directions at the left, right, top and bottom edges


_VIEWS_3D = (
    _View("axial", 0, False, ("R", "L", "A", "P")),
    _View("coronal", 1, True, ("R", "L", "S", "I")),
    _View("sagittal", 2, True, ("A", "P", "S", "I")),
)
_VIEW_2D = _View("", None, False, None)


def _plane(array: np.ndarray, view: _View, centre: tuple[int, ...]) -> np.ndarray:
    plane = array if view.axis is None else np.take(array, centre[view.axis], axis=view.axis)
    return plane[::-1] if view.flip else plane


def _centre(shape: tuple[int, ...], *label_arrays: np.ndarray) -> tuple[int, ...]:
    """Centre (numpy index) of the bounding box of the first non-empty label map, else of the image."""
    for labels in label_arrays:
        if labels is not None and labels.any():
            spans = [np.flatnonzero(labels.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
                     for axis in range(labels.ndim)]
            return tuple(int(s[0] + s[-1]) // 2 for s in spans)
    return tuple(n // 2 for n in shape)


def _text(value) -> str:
    """``value`` as plain text for matplotlib (a '$' pair would start mathtext)."""
    return str(value).replace("$", r"\$")


def _outline(plane: np.ndarray, value: int, width: float, height: float) -> np.ndarray:
    """Line segments ((x0, y0), (x1, y1)) in mm along the voxel edges between label ``value`` and the rest."""
    inside = np.pad(plane == value, 1)
    ny, nx = plane.shape
    cw, ch = width / nx, height / ny
    rows, cols = np.nonzero(inside[1:, 1:-1] != inside[:-1, 1:-1])  # edge above voxel (row, col)
    across = np.stack([np.stack([cols * cw, rows * ch], -1), np.stack([(cols + 1) * cw, rows * ch], -1)], 1)
    rows, cols = np.nonzero(inside[1:-1, 1:] != inside[1:-1, :-1])  # edge left of voxel (row, col)
    down = np.stack([np.stack([cols * cw, rows * ch], -1), np.stack([cols * cw, (rows + 1) * ch], -1)], 1)
    return np.concatenate([across, down])


# Picture layout, inches: room for the row names (left), the title and view names (top), between panels;
# a legend row's height, an entry's width besides its text (fontsize 9: about 0.075 inch a character).
_LEFT, _RIGHT, _TOP, _GAP, _LEGEND_ROW, _LEGEND_ENTRY, _LEGEND_CHAR, _LEGEND_NAME = 0.3, 0.1, 0.6, 0.1, 0.25, 0.7, 0.075, 40
_EDGE_LETTERS = ((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"),
                 (0.5, 0.98, "center", "top"), (0.5, 0.02, "center", "bottom"))


def qc_figure(image: sitk.Image, segmentation: sitk.Image, truth: sitk.Image | None = None, *,
              label_names: dict[int, str] | None = None, title: str = ""):
    """A matplotlib Figure (Agg, no pyplot state): the segmentation's outlines over ``image``, and
    ``truth``'s (a second row in 3D, beside it in 2D), as described in the module docstring. All
    images on one grid. Outlines follow the voxel edges: they show exactly which voxels carry a label.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patheffects import withStroke

    label_names = label_names or {}
    dim = image.GetDimension()
    maps = [("segmentation", segmentation)] + ([("reference", truth)] if truth is not None else [])
    oblique = not np.allclose(np.abs(image.GetDirection()), np.abs(np.round(image.GetDirection())), atol=1e-3)
    if dim == 3:
        image = sitk.DICOMOrient(image, "LPS")
        maps = [(name, sitk.DICOMOrient(labels, "LPS")) for name, labels in maps]
    values = sitk.GetArrayViewFromImage(image)
    arrays = [(name, sitk.GetArrayFromImage(labels)) for name, labels in maps]
    spacing = image.GetSpacing()[::-1]  # numpy axis order
    centre = _centre(values.shape, *(a for _, a in arrays))
    low, high = np.percentile(values, _WINDOW_PERCENTILES)
    high = high if high > low else low + 1.0
    if dim == 3:  # a row per label map, a column per view
        grid = [[(_plane(labels, view, centre), view) for view in _VIEWS_3D] for _, labels in arrays]
        row_names = [name for name, _ in arrays]
        titles = [f"{v.name} {centre[v.axis] + 1}/{values.shape[v.axis]}" for v in _VIEWS_3D]
    else:  # the label maps side by side
        grid = [[(labels, _VIEW_2D) for _, labels in arrays]]
        row_names, titles = [""], [name for name, _ in arrays]
    present = sorted({v for row in grid for plane, _ in row for v in np.unique(plane).tolist() if v > 0})

    def extent_mm(view: _View) -> tuple[float, float]:  # (width, height) of the view's plane
        rows_axis, cols_axis = [a for a in range(values.ndim) if a != view.axis][-2:]
        return values.shape[cols_axis] * spacing[cols_axis], values.shape[rows_axis] * spacing[rows_axis]

    sizes = [extent_mm(view) for _, view in grid[0]]
    scale = min(_WIDTH_INCHES / sum(w for w, _ in sizes), _ROW_INCHES[dim] / max(h for _, h in sizes))  # inch/mm
    panel_height = max(h for _, h in sizes) * scale
    width = _LEFT + sum(w for w, _ in sizes) * scale + _GAP * (len(sizes) - 1) + _RIGHT
    legend = [_text(f"{v} {label_names[v]}"[:_LEGEND_NAME] if label_names.get(v) else v) for v in present]
    columns = max(1, min(len(legend), int(width // (_LEGEND_ENTRY + _LEGEND_CHAR * max(map(len, legend), default=0)))))
    bottom = _GAP + _LEGEND_ROW * -(-len(legend) // columns)
    height = _TOP + len(grid) * panel_height + _GAP * (len(grid) - 1) + bottom
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    outline = [withStroke(linewidth=2, foreground="black")]
    for row, panels in enumerate(grid):
        left = _LEFT
        top = height - _TOP - row * (panel_height + _GAP)
        for col, (plane, view) in enumerate(panels):
            w_mm, h_mm = sizes[col]
            axes = figure.add_axes((left / width, (top - h_mm * scale) / height, w_mm * scale / width, h_mm * scale / height))
            left += w_mm * scale + _GAP
            axes.imshow(_plane(values, view, centre), cmap="gray", vmin=low, vmax=high, interpolation="nearest",
                        extent=(0, w_mm, h_mm, 0))
            for value in np.unique(plane[plane > 0]).tolist():
                axes.add_collection(LineCollection(_outline(plane, value, w_mm, h_mm), colors=label_colour(value),
                                                   linewidths=1.5, capstyle="projecting"))
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(titles[col], fontsize=9)
            if col == 0:
                axes.set_ylabel(row_names[row], fontsize=9)
            for side, (x, y, ha, va) in zip(view.sides or (), _EDGE_LETTERS):
                axes.text(x, y, side, transform=axes.transAxes, ha=ha, va=va, color="white", fontsize=8,
                          path_effects=outline)
    if legend:
        handles = [Line2D([], [], color=label_colour(v), linewidth=3, label=name) for v, name in zip(present, legend)]
        figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=9, frameon=False, borderaxespad=0.2)
    title = _text(title) + ("   (oblique image: shown on its nearest LPS axes)" if oblique and dim == 3 else "")
    if title:
        figure.suptitle(title, fontsize=11, y=1 - 0.06 / height, va="top")
    return figure


def write_qc_picture(path: str | Path, image_path: str | Path, segmentation_path: str | Path,
                     truth_path: str | Path | None = None, *, label_names: dict[int, str] | None = None,
                     title: str = "") -> None:
    """Write ``path`` (PNG, atomically): :func:`qc_figure` of the files; label maps checked against the image's grid."""
    image = read_image(image_path)
    segmentation = read_labels(segmentation_path, like=image, like_path=image_path)
    truth = None if truth_path is None else read_labels(truth_path, like=image, like_path=image_path)
    figure = qc_figure(image, segmentation, truth, label_names=label_names, title=title)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI), what="QC picture")


# --------------------------------------------------------------------------- the page

def read_run(out_dir: str | Path) -> dict:
    """The ``run.json`` of an output folder."""
    path = Path(out_dir) / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AtlassegError(f"{path}: not found; is {out_dir} the output folder of a run?") from None
    except (OSError, ValueError) as err:
        raise AtlassegError(f"{path}: cannot read run record ({err})") from None
    if not isinstance(record, dict):
        raise AtlassegError(f"{path}: not a run record (expected a JSON object)")
    return record


def report_folder(out_dir: str | Path, manifest_path: str | Path | None = None) -> Path:
    """(Re)write the report of a finished run from its ``run.json``; the manifest (for ground truth and
    label names) is ``manifest_path`` or the one the run recorded. Returns the path of ``index.html``."""
    record = read_run(out_dir)
    manifest_path = manifest_path or record.get("manifest")
    if not manifest_path:
        raise AtlassegError(f"{Path(out_dir) / 'run.json'}: names no manifest; give one with --manifest")
    return write_report(out_dir, record, load_manifest(manifest_path))


def write_report(out_dir: str | Path, run_record: dict, manifest: Manifest | None = None) -> Path:
    """Write a QC picture per segmented target and ``index.html`` into ``out_dir``; return the page's path.

    ``run_record`` is the run's ``run.json`` document; ``manifest`` gives each target's ground truth
    (drawn beside the segmentation) and the label names.
    """
    out = Path(out_dir)
    names = manifest.label_names if manifest is not None else {}
    truths = {t.id: t.labels for t in manifest.targets} if manifest is not None else {}
    pictures = {}
    for target_id, record in run_record.get("targets", {}).items():
        segmentation = out / target_id / record.get("segmentation", "")  # none for a failed target
        if not segmentation.is_file():
            continue
        mean = record.get("mean_dice")
        title = target_id + ("" if mean is None else f"   mean Dice {mean:.3f}")
        pictures[target_id] = out / target_id / "qc.png"
        write_qc_picture(pictures[target_id], record["image"], segmentation, truths.get(target_id),
                         label_names=names, title=title)
    page = out / "index.html"
    atomic_write_text(page, _page(run_record, names, {t: p.relative_to(out) for t, p in pictures.items()}))
    return page


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #eee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.mean td { font-weight: bold; background: #f6f6f6; }
tr.dropped td { color: #a00; } tr.unused td { color: #888; }
img { max-width: 100%; border: 1px solid #ccc; }
pre { background: #f6f6f6; padding: 0.6em; overflow: auto; font-size: 0.8em; }
summary { cursor: pointer; margin: 0.4em 0; }
.fail { color: #a00; font-weight: bold; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 or 0 < abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


class _Html(str):
    """Markup made here from escaped parts: a table cell that is not escaped again."""


def _cell(value, digits: int) -> str:
    if isinstance(value, _Html):
        return f"<td>{value}</td>"
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="n">{_number(value, digits)}</td>'
    return f"<td>{_e(value)}</td>"


def _table(head: list[str] | None, body: list[list], *, row_classes: list[str] | None = None, digits: int = 3) -> str:
    """An HTML table (``head`` None: none); numbers right-aligned with ``digits`` decimals, text escaped
    (except :class:`_Html`)."""
    cells = []
    for i, row in enumerate(body):
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        tds = "".join(_cell(c, digits) for c in row)
        cells.append(f"<tr{css}>{tds}</tr>")
    thead = "" if head is None else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>"
    return f"<table>{thead}<tbody>{''.join(cells)}</tbody></table>"


def _scalars(record: dict, skip=()) -> list[list]:
    """(key, value as text) of the record's plain values: a key-value table, left-aligned."""
    return [[key, _number(value)] for key, value in record.items()
            if key not in skip and (value is None or isinstance(value, (str, int, float, bool)))]


def _details(summary: str, value) -> str:
    """A collapsed section showing ``value`` as YAML."""
    text = yaml.safe_dump(value, sort_keys=False, default_flow_style=None)
    return f"<details><summary>{_e(summary)}</summary><pre>{_e(text)}</pre></details>"


def _scores(record: dict) -> tuple[dict[int, dict[str, float]], list[str]]:
    """A target's scores from run.json (label keys as text, NaN as null) as :func:`evaluation.rows` takes them."""
    scores = {int(label): {m: math.nan if v is None else v for m, v in s.items()} for label, s in record["scores"].items()}
    return scores, list(dict.fromkeys(m for s in scores.values() for m in s))


def _summary(run: dict) -> str:
    config = run.get("config", {})
    nonrigid = config.get("registration", {}).get("nonrigid", {})
    settings = [
        ["selection", f"{config.get('selection', {}).get('metric', '?')}, k = {config.get('selection', {}).get('k', '?')}"],
        ["affine stages", ", ".join(config.get("registration", {}).get("affine", {}).get("stages", [])) or "none"],
        ["non-rigid", nonrigid.get("method", "?") if nonrigid.get("enabled") else "off"],
        ["fusion", config.get("fusion", {}).get("method", "?")],
    ]
    facts = [*_scalars(run, skip=("config", "targets", "versions")), ["targets", str(len(run.get("targets", {})))]]
    versions = " · ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    return (_table(None, facts + settings) + f"<p>Versions: {_e(versions)}</p>"
            + _details("Full configuration", config))


def _overview(targets: dict) -> str:
    body = [[_Html(f'<a href="#target-{i}">{_e(tid)}</a>'), record.get("mean_dice"),
             f"{len(record.get('selected', []))} of {len(record.get('ranking', []))}",
             len(record.get("dropped", [])), sum(record.get("seconds", {}).values())]
            for i, (tid, record) in enumerate(targets.items())]
    head = ["target", "mean Dice", "atlases used", "dropped", "seconds"]
    if any("quality" in record for record in targets.values()):
        head += ["predicted Dice", "review"]
        for row, record in zip(body, targets.values()):
            quality = record.get("quality", {})
            row += [_quality(quality), ", ".join(v for v, q in quality.items() if q["review"])]
    return _table(head, body)


def _flagged(record: dict) -> bool:
    """Whether a label of the target's predicted Dice (:mod:`atlasseg.quality`) asks for review."""
    return any(q["review"] for q in record.get("quality", {}).values())


def _quality(quality: dict) -> str:
    return ", ".join(f"{v}: {q['predicted_dice']:.2f} ± {q['error']:.2f}" for v, q in quality.items())


def _metrics(targets: dict, names: dict[int, str]) -> str:
    body, classes, head = [], [], None
    for tid, record in targets.items():
        if record.get("scores"):
            scores, metrics = _scores(record)
            head = head or header(metrics)
            for row in rows(tid, scores, names, metrics):
                body.append(row)
                classes.append("mean" if row[1] == "mean" else "")
    if not body:
        return "<p>No target has ground truth: nothing scored.</p>"
    return _table(head, body, row_classes=classes)


def _ranking(record: dict) -> str:
    used = record.get("selected", [])
    dropped = {d["atlas"]: d for d in record.get("dropped", [])}
    body, classes = [], []
    for rank, entry in enumerate(record.get("ranking", []), 1):
        atlas = entry["atlas"]
        score = next((v for k, v in entry.items() if k != "atlas"), None)
        if atlas in dropped:
            status, css = f"dropped ({dropped[atlas]['stage']}: {dropped[atlas]['reason']})", "dropped"
        else:
            status, css = ("used", "") if atlas in used else ("not selected", "unused")
        body.append([rank, atlas, score, status])
        classes.append(css)
    ranked = {e["atlas"] for e in record.get("ranking", [])}
    for atlas, item in dropped.items():
        if atlas not in ranked:  # failed before it could be scored
            body.append(["–", atlas, None, f"dropped ({item['stage']}: {item['reason']})"])
            classes.append("dropped")
    metric = next((k for e in record.get("ranking", []) for k in e if k != "atlas"), "score")
    note = f"<p>{len(used)} atlas(es) fused: {_e(', '.join(used)) or 'none'}.</p>"
    return _table(["rank", "atlas", f"{metric} (higher is better)", "status"], body, row_classes=classes, digits=4) + note


def _registrations(record: dict) -> str:
    records = dict(record.get("registrations", {}))
    for item in record.get("dropped", []):
        if "record" in item:  # a diverged registration keeps its record
            records.setdefault(item["atlas"], {})[item["stage"]] = item["record"]
    body = []
    for atlas, stages in records.items():
        for stage, r in stages.items():
            iterations = sum(level.get("iterations", 0) for part in r.get("stages", [r]) for level in part.get("levels", []))
            jacobian = (r.get("jacobian_min"), r.get("jacobian_max")) if "jacobian_min" in r else (r.get("jacobian"),) * 2
            body.append([atlas, stage, r.get("method") or ", ".join(s.get("stage", "") for s in r.get("stages", [])),
                         r.get("metric", ""), r.get("metric_before"), r.get("metric_after"), iterations,
                         r.get("seconds"), *jacobian, r.get("folded_voxels"), r.get("overlap"), r.get("status", "")])
    if not body:
        return ""
    table = _table(["atlas", "stage", "method", "metric", "before", "after", "iterations", "seconds",
                    "Jacobian min", "Jacobian max", "folded voxels", "overlap", "status"], body)
    summary = f"Registration records ({len(records)} atlases; metric values as the optimiser sees them, lower is better)"
    return f"<details><summary>{_e(summary)}</summary>{table}{_details('Raw records', records)}</details>"


def _target(index: int, tid: str, record: dict, picture: Path | None) -> str:
    parts = [f'<section id="target-{index}"><h2>{_e(tid)}</h2>']
    if picture is None:
        parts.append('<p class="fail">No segmentation was written for this target.</p>')
    else:
        src = _e(quote(picture.as_posix()))
        parts.append(f'<p><a href="{src}"><img src="{src}" alt="QC picture of {_e(tid)}"></a></p>')
    facts = _scalars(record)
    if "fusion" in record:
        fusion = record["fusion"]
        facts.append(["fusion", f"{fusion.get('method')} of {fusion.get('candidates')} candidate(s)"])
    if record.get("seconds"):
        facts.append(["seconds", ", ".join(f"{k} {v:g}" for k, v in record["seconds"].items())])
    parts += [_table(None, facts), "<h3>Atlas ranking</h3>", _ranking(record), _registrations(record), "</section>"]
    return "".join(parts)


def _page(run: dict, names: dict[int, str], pictures: dict[str, Path]) -> str:
    targets = dict(sorted(run.get("targets", {}).items(), key=lambda item: not _flagged(item[1])))  # review first
    status = run.get("status", "unknown")
    css = "" if status == "complete" else ' class="fail"'
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>atlasseg report: {_e(status)}, {len(targets)} target(s)</title><style>{_STYLE}</style></head><body>",
        f"<h1>atlasseg report</h1><p{css}>Run {_e(status)}: {len(targets)} target(s) in "
        f"{_number(run.get('seconds_total'))} s.</p>",
        _summary(run), "<h2>Targets</h2>", _overview(targets) if targets else "<p>No target finished.</p>",
        "<h2>Metrics</h2>", _metrics(targets, names),
        *(_target(i, tid, record, pictures.get(tid)) for i, (tid, record) in enumerate(targets.items())),
        "</body></html>", ""])
