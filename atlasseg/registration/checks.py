"""Checks on a stage's result: the target's foreground, overlap with the atlas, folding; RegistrationDiverged."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from ..errors import RegistrationError
from .geometry import domain
from .itk import Masks


class RegistrationDiverged(RegistrationError):
    """A registration that ran but whose result cannot be trusted; ``record`` says what was measured."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def foreground(fixed: sitk.Image, masks: Masks | None = None) -> np.ndarray:
    """Boolean array (numpy order) of the target's foreground: its mask, else an Otsu threshold."""
    if masks is not None and masks.fixed is not None:
        region = sitk.GetArrayFromImage(masks.fixed) > 0
    else:
        region = sitk.GetArrayFromImage(sitk.OtsuThreshold(fixed, 0, 1)) > 0
    return region if region.any() else np.ones(region.shape, bool)


def overlap_fraction(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, region: np.ndarray) -> float:
    """Fraction of the foreground ``region`` of ``fixed`` that ``transform`` maps inside ``moving``'s domain."""
    inside = domain(moving)
    mapped = sitk.GetArrayFromImage(sitk.Resample(inside, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0
    return float((mapped & region).sum() / region.sum())


def check_result(stage: str, record: dict, *, min_overlap: float, max_folded_fraction: float) -> None:
    """Raise :class:`RegistrationDiverged` with the reason when a stage's result cannot be trusted.

    ``record`` holds the stage's ``metric_before``/``metric_after`` (lower is better),
    ``overlap`` and ``folded_fraction``; a metric that got worse than its start by more
    than sampling noise (1 % of its magnitude, at least 1e-3), or that cannot be evaluated,
    means the optimiser diverged (``status: diverged``). A result that converged but overlaps
    too little or folds too much is ``rejected``, and the reason says which.
    """
    before, after = record["metric_before"], record["metric_after"]
    diverged, rejected = [], []
    if not math.isfinite(after):
        diverged.append("the metric cannot be evaluated (no overlap left)")
    elif math.isfinite(before) and after > before + max(1e-3, 0.01 * abs(before)):
        diverged.append(f"metric worse than at the start ({before:.4g} -> {after:.4g})")
    if record["overlap"] < min_overlap:
        rejected.append(
            f"too little overlap: only {record['overlap']:.0%} of the target's foreground maps inside "
            f"the atlas (min_overlap {min_overlap:.0%})"
        )
    if record["folded_fraction"] > max_folded_fraction:
        rejected.append(
            f"too much folding: {record['folded_fraction']:.1%} of the target's foreground is folded "
            f"(max_folded_fraction {max_folded_fraction:.1%})"
        )
    if diverged or rejected:
        record["status"] = "diverged" if diverged else "rejected"
        raise RegistrationDiverged(f"{stage} registration {record['status']}: {'; '.join(diverged + rejected)}", record)
    record["status"] = "ok"
