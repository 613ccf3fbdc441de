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

The page holds the run's summary, the metrics table, and per target its picture, an interactive view,
its atlas ranking (selected and dropped atlases, with reasons) and its registration records. It needs
no server: the pictures are linked relative to ``index.html``. Every text from the run is HTML-escaped.

The interactive view is NiiVue (``atlasseg/viewer/niivue.umd.js``, the npm package's built file, with
its licence beside it), copied to ``<out>/viewer/``. A browser refuses ``fetch()`` of a ``file://``
URL but runs a classic ``<script src>``: so each target's volumes are written as base64 NIfTI into
``<out>/<target>/viewer.js``, and the page loads that file (and NiiVue) when the view is opened. The
volumes: the target image (its grey window, 0.5th–99.5th percentile, on 0–255), the segmentation, the
candidates' disagreement (:class:`Disagreement`, in percent) when the run wrote it, and the ground
truth. One view is open at a time (a browser holds few WebGL contexts).
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import tempfile
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
_PALETTE = (
    "#ff0000",
    "#00e000",
    "#1e90ff",
    "#ffff00",
    "#00ffff",
    "#ff00ff",
    "#ff8c00",
    "#8a2be2",
    "#7fff00",
    "#ff69b4",
)
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
            spans = [
                np.flatnonzero(labels.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
                for axis in range(labels.ndim)
            ]
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
_LEFT, _RIGHT, _TOP, _GAP, _LEGEND_ROW, _LEGEND_ENTRY, _LEGEND_CHAR, _LEGEND_NAME = (
    0.3,
    0.1,
    0.6,
    0.1,
    0.25,
    0.7,
    0.075,
    40,
)
_EDGE_LETTERS = (
    (0.02, 0.5, "left", "center"),
    (0.98, 0.5, "right", "center"),
    (0.5, 0.98, "center", "top"),
    (0.5, 0.02, "center", "bottom"),
)


def qc_figure(
    image: sitk.Image,
    segmentation: sitk.Image,
    truth: sitk.Image | None = None,
    *,
    label_names: dict[int, str] | None = None,
    title: str = "",
):
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
            axes = figure.add_axes(
                (left / width, (top - h_mm * scale) / height, w_mm * scale / width, h_mm * scale / height)
            )
            left += w_mm * scale + _GAP
            axes.imshow(
                _plane(values, view, centre),
                cmap="gray",
                vmin=low,
                vmax=high,
                interpolation="nearest",
                extent=(0, w_mm, h_mm, 0),
            )
            for value in np.unique(plane[plane > 0]).tolist():
                axes.add_collection(
                    LineCollection(
                        _outline(plane, value, w_mm, h_mm),
                        colors=label_colour(value),
                        linewidths=1.5,
                        capstyle="projecting",
                    )
                )
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(titles[col], fontsize=9)
            if col == 0:
                axes.set_ylabel(row_names[row], fontsize=9)
            for side, (x, y, ha, va) in zip(view.sides or (), _EDGE_LETTERS):
                axes.text(
                    x, y, side, transform=axes.transAxes, ha=ha, va=va, color="white", fontsize=8, path_effects=outline
                )
    if legend:
        handles = [Line2D([], [], color=label_colour(v), linewidth=3, label=name) for v, name in zip(present, legend)]
        figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=9, frameon=False, borderaxespad=0.2)
    title = _text(title) + ("   (oblique image: shown on its nearest LPS axes)" if oblique and dim == 3 else "")
    if title:
        figure.suptitle(title, fontsize=11, y=1 - 0.06 / height, va="top")
    return figure


def _read_target(image_path: str | Path, segmentation_path: str | Path, truth_path: str | Path | None):
    """(image, segmentation, truth or None) of one target; the label maps checked against the image's grid."""
    image = read_image(image_path)
    segmentation = read_labels(segmentation_path, like=image, like_path=image_path)
    truth = None if truth_path is None else read_labels(truth_path, like=image, like_path=image_path)
    return image, segmentation, truth


def _save_picture(path: str | Path, figure) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI), what="QC picture")


def write_qc_picture(
    path: str | Path,
    image_path: str | Path,
    segmentation_path: str | Path,
    truth_path: str | Path | None = None,
    *,
    label_names: dict[int, str] | None = None,
    title: str = "",
) -> None:
    """Write ``path`` (PNG, atomically): :func:`qc_figure` of the files; label maps checked against the image's grid."""
    image, segmentation, truth = _read_target(image_path, segmentation_path, truth_path)
    _save_picture(path, qc_figure(image, segmentation, truth, label_names=label_names, title=title))


# --------------------------------------------------------------------------- the interactive view


class Disagreement:
    """The candidates' disagreement, voxel by voxel: the share of them that vote against the most
    voted label (0: all agree; at most 1 - 1/n for n candidates). A running quantity: a vote count
    per label value seen (uint16), never the candidates themselves.
    """

    def __init__(self) -> None:
        self._votes: dict[int, np.ndarray] = {}
        self._geometry: tuple | None = None  # origin, spacing, direction of the candidates' grid
        self.n_candidates = 0

    def add(self, labels: sitk.Image) -> None:
        """Count one candidate's labels (all candidates on one grid)."""
        values = sitk.GetArrayViewFromImage(labels)
        for value in np.unique(values).tolist():
            votes = self._votes.setdefault(value, np.zeros(values.shape, np.uint16))
            votes += values == value
        self._geometry = labels.GetOrigin(), labels.GetSpacing(), labels.GetDirection()
        self.n_candidates += 1

    def result(self) -> sitk.Image:
        """The disagreement (float32, 0–1) on the candidates' grid."""
        if not self.n_candidates:
            raise AtlassegError("no candidates: their disagreement is undefined")
        most = np.zeros(next(iter(self._votes.values())).shape, np.uint16)
        for votes in self._votes.values():
            np.maximum(most, votes, out=most)
        image = sitk.GetImageFromArray((1.0 - most / np.float32(self.n_candidates)).astype(np.float32))
        origin, spacing, direction = self._geometry
        image.SetOrigin(origin)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        return image


_VIEWER_ASSETS = ("niivue.umd.js", "LICENSE-niivue.txt")
_VIEWER_DIR = "viewer"  # in the package and in the output folder
_VIEWER_DATA = "viewer.js"  # per target


def _nifti_base64(image: sitk.Image) -> str:
    """``image`` as gzipped NIfTI bytes (its geometry kept), in base64."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "volume.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        return base64.b64encode(path.read_bytes()).decode("ascii")


def _grey(image: sitk.Image) -> sitk.Image:
    """The image on its QC grey window (0.5th–99.5th percentile) as uint8 0–255: a quarter of float32's bytes."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = np.percentile(values, _WINDOW_PERCENTILES)
    scaled = np.clip((values - low) / (high - low if high > low else 1.0), 0, 1) * 255
    grey = sitk.GetImageFromArray(np.round(scaled).astype(np.uint8))
    grey.CopyInformation(image)
    return grey


def _label_volume(labels: sitk.Image) -> sitk.Image:
    """A label map in the narrowest unsigned type that holds its values (NiiVue's label colours index them)."""
    high = int(sitk.GetArrayViewFromImage(labels).max(initial=0))
    return sitk.Cast(labels, sitk.sitkUInt8 if high < 256 else sitk.sitkUInt16)


def write_viewer_data(
    path: str | Path,
    target_id: str,
    image: sitk.Image,
    segmentation: sitk.Image,
    truth: sitk.Image | None = None,
    disagreement: sitk.Image | None = None,
) -> None:
    """Write one target's volumes for the page's interactive view (``<target>/viewer.js``, atomically):
    a script that hands them, as base64 NIfTI, to ``atlassegViewer.add``."""
    volumes = {"image": _nifti_base64(_grey(image)), "segmentation": _nifti_base64(_label_volume(segmentation))}
    dim = image.GetDimension()
    index = _centre(tuple(reversed(image.GetSize())), sitk.GetArrayViewFromImage(segmentation))[::-1]
    point = image.TransformIndexToPhysicalPoint([int(i) for i in index])
    centre = [-point[0], -point[1], point[2] if dim == 3 else 0.0]  # LPS to NiiVue's RAS, mm
    data = {"dimension": dim, "centre": centre, "volumes": volumes}  # the cross starts where the labels are
    if disagreement is not None:
        percent = sitk.Cast(sitk.Clamp(disagreement * 100.0 + 0.5, lowerBound=0, upperBound=100), sitk.sitkUInt8)
        volumes["disagreement"] = _nifti_base64(percent)
        data["disagreement_max"] = int(sitk.GetArrayViewFromImage(percent).max())  # the heat map's top colour
    if truth is not None:
        volumes["reference"] = _nifti_base64(_label_volume(truth))
    atomic_write_text(path, f"atlassegViewer.add({json.dumps(target_id)}, {json.dumps(data)});\n")


def copy_viewer(out_dir: str | Path) -> None:
    """Copy the vendored NiiVue build and its licence into ``<out_dir>/viewer/`` (atomically, each)."""
    source = Path(__file__).with_name(_VIEWER_DIR)
    for name in _VIEWER_ASSETS:
        atomic_write(
            Path(out_dir) / _VIEWER_DIR / name,
            lambda tmp, src=source / name: shutil.copyfile(src, tmp),
            what="viewer file",
        )


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
    """Write a QC picture and the interactive view's volumes per segmented target, the viewer, and
    ``index.html`` into ``out_dir``; return the page's path.

    ``run_record`` is the run's ``run.json`` document; ``manifest`` gives each target's ground truth
    (drawn beside the segmentation) and the label names.
    """
    out = Path(out_dir)
    names = manifest.label_names if manifest is not None else {}
    truths = {t.id: t.labels for t in manifest.targets} if manifest is not None else {}
    pictures, views = {}, {}
    for target_id, record in run_record.get("targets", {}).items():
        segmentation = out / target_id / record.get("segmentation", "")  # none for a failed target
        if not segmentation.is_file():
            continue
        mean = record.get("mean_dice")
        title = target_id + ("" if mean is None else f"   mean Dice {mean:.3f}")
        pictures[target_id] = out / target_id / "qc.png"
        image, labels, truth = _read_target(record["image"], segmentation, truths.get(target_id))
        _save_picture(pictures[target_id], qc_figure(image, labels, truth, label_names=names, title=title))
        disagreement = out / target_id / record.get("disagreement", "")
        disagreement = read_image(disagreement) if record.get("disagreement") and disagreement.is_file() else None
        write_viewer_data(out / target_id / _VIEWER_DATA, target_id, image, labels, truth, disagreement)
        present = {
            v for m in (labels, truth) if m is not None for v in np.unique(sitk.GetArrayViewFromImage(m)).tolist()
        }
        views[target_id] = _ViewLayers(
            image.GetDimension(), sorted(present - {0}), disagreement is not None, truth is not None
        )
    if pictures:
        copy_viewer(out)
    page = out / "index.html"
    atomic_write_text(page, _page(run_record, names, {t: p.relative_to(out) for t, p in pictures.items()}, views))
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
.viewer .controls { display: flex; flex-wrap: wrap; gap: 0.3em 1.2em; align-items: center; font-size: 0.9em; margin: 0.4em 0; }
.viewer .canvas { height: 460px; background: #000; } .viewer canvas { width: 100%; height: 100%; }
.viewer .swatch { display: inline-block; width: 0.8em; height: 0.8em; margin: 0 0.3em; vertical-align: middle; }
.viewer .hint { font-size: 0.8em; color: #555; }
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
    return [
        [key, _number(value)]
        for key, value in record.items()
        if key not in skip and (value is None or isinstance(value, (str, int, float, bool)))
    ]


def _details(summary: str, value) -> str:
    """A collapsed section showing ``value`` as YAML."""
    text = yaml.safe_dump(value, sort_keys=False, default_flow_style=None)
    return f"<details><summary>{_e(summary)}</summary><pre>{_e(text)}</pre></details>"


def _scores(record: dict) -> tuple[dict[int, dict[str, float]], list[str]]:
    """A target's scores from run.json (label keys as text, NaN as null) as :func:`evaluation.rows` takes them."""
    scores = {
        int(label): {m: math.nan if v is None else v for m, v in s.items()} for label, s in record["scores"].items()
    }
    return scores, list(dict.fromkeys(m for s in scores.values() for m in s))


def _summary(run: dict) -> str:
    config = run.get("config", {})
    nonrigid = config.get("registration", {}).get("nonrigid", {})
    settings = [
        [
            "selection",
            f"{config.get('selection', {}).get('metric', '?')}, k = {config.get('selection', {}).get('k', '?')}",
        ],
        ["affine stages", ", ".join(config.get("registration", {}).get("affine", {}).get("stages", [])) or "none"],
        ["non-rigid", nonrigid.get("method", "?") if nonrigid.get("enabled") else "off"],
        ["fusion", config.get("fusion", {}).get("method", "?")],
    ]
    facts = [*_scalars(run, skip=("config", "targets", "versions")), ["targets", str(len(run.get("targets", {})))]]
    versions = " · ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    return _table(None, facts + settings) + f"<p>Versions: {_e(versions)}</p>" + _details("Full configuration", config)


_STATUS_ORDER = {"failed": 0, "degraded": 1}  # what needs a look first; the others in run order


def _ordered(targets: dict) -> dict:
    """The targets with the failed ones first, then the degraded ones, then those with a label flagged for review
    (:mod:`atlasseg.quality`), then the rest, each in run order."""

    def order(record: dict) -> int:
        return _STATUS_ORDER.get(record.get("status"), 3 if not _flagged(record) else 2)

    return dict(sorted(targets.items(), key=lambda item: order(item[1])))


def _overview(targets: dict) -> str:
    body = [
        [
            _Html(f'<a href="#target-{i}">{_e(tid)}</a>'),
            record.get("status", "ok"),
            record.get("mean_dice"),
            f"{len(record.get('selected', []))} of {len(record.get('ranking', []))}",
            len(record.get("dropped", [])),
            sum(record.get("seconds", {}).values()),
        ]
        for i, (tid, record) in enumerate(targets.items())
    ]
    classes = ["dropped" if record.get("status") in _STATUS_ORDER else "" for record in targets.values()]
    head = ["target", "status", "mean Dice", "atlases used", "dropped", "seconds"]
    if any("quality" in record for record in targets.values()):
        head += ["predicted Dice", "review"]
        for row, record in zip(body, targets.values()):
            quality = record.get("quality", {})
            row += [_quality(quality), ", ".join(v for v, q in quality.items() if q["review"])]
    return _table(head, body, row_classes=classes)


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
    return (
        _table(["rank", "atlas", f"{metric} (higher is better)", "status"], body, row_classes=classes, digits=4) + note
    )


def _registrations(record: dict) -> str:
    records = dict(record.get("registrations", {}))
    for item in record.get("dropped", []):
        if "record" in item:  # a diverged registration keeps its record
            records.setdefault(item["atlas"], {})[item["stage"]] = item["record"]
    body = []
    for atlas, stages in records.items():
        for stage, r in stages.items():
            iterations = sum(
                level.get("iterations", 0) for part in r.get("stages", [r]) for level in part.get("levels", [])
            )
            jacobian = (
                (r.get("jacobian_min"), r.get("jacobian_max")) if "jacobian_min" in r else (r.get("jacobian"),) * 2
            )
            body.append(
                [
                    atlas,
                    stage,
                    r.get("method") or ", ".join(s.get("stage", "") for s in r.get("stages", [])),
                    r.get("metric", ""),
                    r.get("metric_before"),
                    r.get("metric_after"),
                    iterations,
                    r.get("seconds"),
                    *jacobian,
                    r.get("folded_voxels"),
                    r.get("overlap"),
                    r.get("status", ""),
                ]
            )
    if not body:
        return ""
    table = _table(
        [
            "atlas",
            "stage",
            "method",
            "metric",
            "before",
            "after",
            "iterations",
            "seconds",
            "Jacobian min",
            "Jacobian max",
            "folded voxels",
            "overlap",
            "status",
        ],
        body,
    )
    summary = (
        f"Registration records ({len(records)} atlases; metric values, per level too, as atlasseg scores "
        "them: lower is better, 1 − NCC for ncc, −MI for mattes, mean squared difference for mse)"
    )
    return f"<details><summary>{_e(summary)}</summary>{table}{_details('Raw records', records)}</details>"


def _target(
    index: int, tid: str, record: dict, picture: Path | None, view: "_ViewLayers | None", names: dict[int, str]
) -> str:
    parts = [f'<section id="target-{index}"><h2>{_e(tid)}</h2>']
    if picture is None:
        parts.append('<p class="fail">No segmentation was written for this target.</p>')
    else:
        src = _e(quote(picture.as_posix()))
        parts.append(f'<p><a href="{src}"><img src="{src}" alt="QC picture of {_e(tid)}"></a></p>')
    if picture is not None and view is not None:
        parts.append(_view(index, tid, picture.parent, view, names))
    facts = _scalars(record, skip=("image",) if "manifest_image" in record else ())  # the path as the user wrote it
    if "fusion" in record:
        fusion = record["fusion"]
        facts.append(["fusion", f"{fusion.get('method')} of {fusion.get('candidates')} candidate(s)"])
    if record.get("seconds"):
        facts.append(["seconds", ", ".join(f"{k} {v:g}" for k, v in record["seconds"].items())])
    parts += [_table(None, facts), "<h3>Atlas ranking</h3>", _ranking(record), _registrations(record), "</section>"]
    return "".join(parts)


@dataclass(frozen=True)
class _ViewLayers:
    """What one target's interactive view holds besides the image and the segmentation."""

    dimension: int
    values: list[int]  # label values in the segmentation or the ground truth
    disagreement: bool
    reference: bool


# The view's layers: (name, its opacity slider's initial value in percent).
_LAYERS = (("segmentation", 60), ("disagreement", 0), ("reference", 0))


def _view(index: int, tid: str, folder: Path, view: _ViewLayers, names: dict[int, str]) -> str:
    """One target's interactive view: a button that opens it, its controls and its canvas."""
    shown = {"segmentation": True, "disagreement": view.disagreement, "reference": view.reference}
    sliders = "".join(
        f'<label>{name} <input type="range" class="opacity" data-layer="{name}" min="0" max="100" value="{value}"></label>'
        for name, value in _LAYERS
        if shown[name]
    )
    toggles = "".join(
        f'<label><input type="checkbox" class="label" value="{v}" checked><span class="swatch" '
        f'style="background:{label_colour(v)}"></span>{_e(v)}{" " + _e(names[v]) if names.get(v) else ""}</label>'
        for v in view.values
    )
    planes = "".join(f'<option value="{p}">{p}</option>' for p in ("multiplanar", "axial", "coronal", "sagittal"))
    layout = f'<label>planes <select class="layout">{planes}</select></label>'
    hint = (
        "Scroll over a plane to move through its slices; click to move the cross; drag with the right button "
        "to change the grey window. The disagreement is the share of candidates that vote against the most "
        "voted label (warm colours: more)."
    )
    src = _e(quote((folder / _VIEWER_DATA).as_posix()))
    return (
        f'<div class="viewer" id="viewer-{index}" data-target="{_e(tid)}" data-src="{src}">'
        '<button type="button" class="open">Open the interactive view</button>'
        f'<div class="panel" hidden><div class="controls">{layout if view.dimension == 3 else ""}{sliders}{toggles}'
        '<span class="location"></span></div><div class="canvas"><canvas></canvas></div>'
        f'<p class="hint">{_e(hint)}</p></div></div>'
    )


_SCRIPT = """
const atlassegViewer = (() => {
  const settings = JSON.parse(document.getElementById("atlasseg-viewer-settings").textContent);
  const data = {};
  let current = null;
  const load = (src) => new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = resolve;
    script.onerror = () => reject(new Error("cannot load " + src));
    document.head.appendChild(script);
  });
  const colormapLabel = (values, hidden) => {
    const cm = {R: [0], G: [0], B: [0], A: [0], I: [0]};
    for (const v of values) {
      const hex = settings.colours[v];
      cm.R.push(parseInt(hex.slice(1, 3), 16)); cm.G.push(parseInt(hex.slice(3, 5), 16));
      cm.B.push(parseInt(hex.slice(5, 7), 16)); cm.A.push(hidden.has(v) ? 0 : 255); cm.I.push(v);
    }
    return cm;
  };
  const close = () => {
    if (!current) return;
    const lose = current.nv.gl && current.nv.gl.getExtension("WEBGL_lose_context");
    if (lose) lose.loseContext();
    const box = current.box;
    box.querySelector("canvas").replaceWith(document.createElement("canvas"));  // a lost context stays lost
    box.querySelector(".panel").hidden = true;
    box.querySelector(".open").hidden = false;
    box.dataset.state = "closed";
    current = null;
  };
  const open = async (box) => {
    close();
    box.dataset.state = "loading";
    const id = box.dataset.target;
    if (!window.niivue) await load(settings.viewer);
    if (!data[id]) await load(box.dataset.src);
    const d = data[id];
    box.querySelector(".open").hidden = true;
    box.querySelector(".panel").hidden = false;
    const opacity = (name) => {
      const slider = box.querySelector(`input.opacity[data-layer="${name}"]`);
      return slider ? slider.value / 100 : 1;
    };
    const nv = new niivue.Niivue({backColor: [0, 0, 0, 1], crosshairColor: [1, 1, 1, 0.5], crosshairWidth: 1,
                                  isColorbar: opacity("disagreement") > 0, logLevel: "error"});
    current = {nv, box};
    await nv.attachToCanvas(box.querySelector("canvas"));
    nv.setInterpolation(true);  // nearest neighbour: every voxel as it is, as in the pictures
    const values = Array.from(box.querySelectorAll("input.label"), (c) => Number(c.value));
    const hidden = new Set();
    const layers = {};
    const options = {
      image: {colormap: "gray", cal_min: 0, cal_max: 255},
      segmentation: {}, reference: {},
      disagreement: {colormap: "warm", cal_min: 1, cal_max: Math.max(d.disagreement_max, 2)},
    };
    for (const name of ["image", "segmentation", "disagreement", "reference"]) {
      if (!d.volumes[name]) continue;
      const volume = await niivue.NVImage.loadFromBase64({
        base64: d.volumes[name], name: name + ".nii.gz", opacity: name === "image" ? 1 : opacity(name),
        trustCalMinMax: true, colorbarVisible: name === "disagreement", ...options[name]});
      if (name === "segmentation" || name === "reference") volume.setColormapLabel(colormapLabel(values, hidden));
      nv.addVolume(volume);
      layers[name] = nv.volumes.length - 1;
    }
    const planes = {multiplanar: nv.sliceTypeMultiplanar, axial: nv.sliceTypeAxial,
                    coronal: nv.sliceTypeCoronal, sagittal: nv.sliceTypeSagittal};
    const layout = box.querySelector("select.layout");
    nv.scene.crosshairPos = nv.mm2frac(d.centre);
    nv.setSliceType(d.dimension === 2 ? nv.sliceTypeAxial : planes[layout ? layout.value : "multiplanar"]);
    if (layout) layout.onchange = () => nv.setSliceType(planes[layout.value]);
    for (const slider of box.querySelectorAll("input.opacity")) {
      slider.oninput = () => {
        if (!(slider.dataset.layer in layers)) return;
        if (slider.dataset.layer === "disagreement") nv.opts.isColorbar = slider.value > 0;  // its colour scale
        nv.setOpacity(layers[slider.dataset.layer], slider.value / 100);
      };
    }
    for (const check of box.querySelectorAll("input.label")) {
      check.onchange = () => {
        const v = Number(check.value);
        if (check.checked) hidden.delete(v); else hidden.add(v);
        for (const name of ["segmentation", "reference"]) {
          if (name in layers) nv.volumes[layers[name]].setColormapLabel(colormapLabel(values, hidden));
        }
        nv.updateGLVolume();
      };
    }
    const where = box.querySelector(".location");
    nv.onLocationChange = (location) => { where.textContent = location.string; };
    box.dataset.state = "ready";
  };
  for (const box of document.querySelectorAll(".viewer")) {
    box.querySelector(".open").onclick = () => open(box).catch((err) => {
      box.dataset.state = "failed";
      box.querySelector(".panel").hidden = false;
      box.querySelector(".hint").textContent = "The interactive view could not open: " + err.message;
    });
  }
  return {add: (id, d) => { data[id] = d; }};
})();
"""


def _script_json(value) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    return json.dumps(value).replace("<", "\\u003c")


def _page(
    run: dict, names: dict[int, str], pictures: dict[str, Path], views: dict[str, _ViewLayers] | None = None
) -> str:
    targets = _ordered(run.get("targets", {}))
    status = run.get("status", "unknown")
    css = "" if status == "complete" else ' class="fail"'
    views = views or {}
    values = sorted({v for view in views.values() for v in view.values})
    settings = {"viewer": f"{_VIEWER_DIR}/niivue.umd.js", "colours": {v: label_colour(v) for v in values}}
    script = (
        ""
        if not views
        else f'<script type="application/json" id="atlasseg-viewer-settings">{_script_json(settings)}'
        f"</script><script>{_SCRIPT}</script>"
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>atlasseg report: {_e(status)}, {len(targets)} target(s)</title><style>{_STYLE}</style></head><body>",
            f"<h1>atlasseg report</h1><p{css}>Run {_e(status)}: {len(targets)} target(s) in "
            f"{_number(run.get('seconds_total'))} s.</p>",
            _summary(run),
            "<h2>Targets</h2>",
            _overview(targets) if targets else "<p>No target finished.</p>",
            "<h2>Metrics</h2>",
            _metrics(targets, names),
            *(
                _target(i, tid, record, pictures.get(tid), views.get(tid), names)
                for i, (tid, record) in enumerate(targets.items())
            ),
            script,
            "</body></html>",
            "",
        ]
    )
