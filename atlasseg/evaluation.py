"""Scoring a segmentation against ground truth, per label.

Metrics (``EvaluationConfig.metrics``), per label value:

- ``dice``: 2|A∩B| / (|A|+|B|);
- ``jaccard``: |A∩B| / |A∪B|;
- ``hd95``: 95th percentile of the symmetric surface distances, mm;
- ``assd``: average symmetric surface distance, mm;
- ``volume_difference``: predicted minus true volume, ml (mm³ / 1000; in 2D the
  same formula on areas, mm² / 1000).

Distances are physical (voxel spacing; the direction is a rotation, so it does not
change them). A label absent from both images scores NaN everywhere (nothing to
compare) and is left out of means. A label present in only one image scores 0 for
``dice`` and ``jaccard`` and NaN for the distances (no surface to measure to).
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import ImageError
from .imageio import same_grid

UNITS = {"dice": "", "jaccard": "", "hd95": "mm", "assd": "mm", "volume_difference": "ml"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A∩B| / (|A|+|B|) of two boolean masks; NaN when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index |A∩B| / |A∪B|; NaN when both are empty."""
    union = int(np.logical_or(a, b).sum())
    return math.nan if union == 0 else int(np.logical_and(a, b).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to ``b``'s surface and back, concatenated.

    ``spacing`` is in numpy axis order. Empty when either mask is empty.
    """
    if not a.any() or not b.any():
        return np.empty(0)
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return np.concatenate([to_b[sa], to_a[sb]])


def _distance_metric(reduce):
    def metric(a, b, spacing, _cache):
        key = "distances"
        if key not in _cache:
            _cache[key] = surface_distances(a, b, spacing)
        d = _cache[key]
        return math.nan if d.size == 0 else float(reduce(d))

    return metric


METRICS = {
    "dice": lambda a, b, spacing, _cache: dice(a, b),
    "jaccard": lambda a, b, spacing, _cache: jaccard(a, b),
    "hd95": _distance_metric(lambda d: np.percentile(d, 95)),
    "assd": _distance_metric(np.mean),
    "volume_difference": lambda a, b, spacing, _cache: (
        math.nan if not (a.any() or b.any()) else (int(a.sum()) - int(b.sum())) * float(np.prod(spacing)) / 1000.0
    ),
}


def evaluate(
    prediction: sitk.Image, truth: sitk.Image, *, labels=None, metrics=("dice",)
) -> dict[int, dict[str, float]]:
    """Scores per label value (default: every non-zero value in either image) and metric name."""
    if not same_grid(prediction, truth):
        raise ImageError("evaluation: prediction and ground truth lie on different grids")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ImageError(f"evaluation: unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    pred = sitk.GetArrayViewFromImage(prediction)
    true = sitk.GetArrayViewFromImage(truth)
    spacing = prediction.GetSpacing()[::-1]
    if labels is None:
        labels = sorted((set(np.unique(pred).tolist()) | set(np.unique(true).tolist())) - {0})
    out = {}
    for value in labels:
        a, b = pred == value, true == value
        cache: dict = {}
        out[int(value)] = {m: METRICS[m](a, b, spacing, cache) for m in metrics}
    return out


def dice_per_label(prediction: sitk.Image, truth: sitk.Image, *, labels=None) -> dict[int, float]:
    """Dice for each label value (see :func:`evaluate`)."""
    return {v: s["dice"] for v, s in evaluate(prediction, truth, labels=labels).items()}


def mean_score(scores: dict[int, float]) -> float:
    """Mean over labels, ignoring NaN (labels absent from both images)."""
    values = [v for v in scores.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def rows(target_id: str, scores: dict[int, dict[str, float]], label_names: dict[int, str], metrics) -> list[list]:
    """Table rows ``[target, label, name, *metrics]``, one per label and one for the mean."""
    out = [[target_id, label, label_names.get(label, ""), *(s[m] for m in metrics)] for label, s in scores.items()]
    out.append([target_id, "mean", "", *(mean_score({v: s[m] for v, s in scores.items()}) for m in metrics)])
    return out


def header(metrics) -> list[str]:
    """Column names matching :func:`rows`, with units."""
    return ["target", "label", "name", *(f"{m}_{UNITS[m]}" if UNITS[m] else m for m in metrics)]
