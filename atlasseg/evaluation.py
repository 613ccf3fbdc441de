"""Scoring a segmentation against ground truth, per label."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from .errors import ImageError
from .imageio import same_grid


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A∩B| / (|A|+|B|) of two boolean masks; NaN when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def dice_per_label(prediction: sitk.Image, truth: sitk.Image, *, labels=None) -> dict[int, float]:
    """Dice for each label value (default: every non-zero value in either image).

    A label absent from both images scores NaN (nothing to compare) and is left
    out of means; a label present in only one scores 0.
    """
    if not same_grid(prediction, truth):
        raise ImageError("evaluation: prediction and ground truth lie on different grids")
    pred = sitk.GetArrayViewFromImage(prediction)
    true = sitk.GetArrayViewFromImage(truth)
    if labels is None:
        labels = sorted((set(np.unique(pred).tolist()) | set(np.unique(true).tolist())) - {0})
    return {int(v): dice(pred == v, true == v) for v in labels}


def mean_score(scores: dict[int, float]) -> float:
    """Mean over labels, ignoring NaN (labels absent from both images)."""
    values = [v for v in scores.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan
