"""Registration helpers: the ITK metric registry, the pyramid drivers, result checks."""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import RegistrationError


def _mattes(method: sitk.ImageRegistrationMethod) -> None:
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)


def _ncc(method: sitk.ImageRegistrationMethod) -> None:
    method.SetMetricAsCorrelation()


def _mse(method: sitk.ImageRegistrationMethod) -> None:
    method.SetMetricAsMeanSquares()


def _ants_ncc(method: sitk.ImageRegistrationMethod) -> None:
    method.SetMetricAsANTSNeighborhoodCorrelation(radius=2)


METRICS: dict[str, Callable[[sitk.ImageRegistrationMethod], None]] = {
    "mattes": _mattes,
    "ncc": _ncc,
    "mse": _mse,
    "nmse": _mse,  # mean squares of images standardised first (see standardized)
    "ants_ncc": _ants_ncc,
}


def standardized(image: sitk.Image) -> sitk.Image:
    """``image`` as float32 with zero mean and unit variance over all its voxels (unchanged but for the type
    when constant): what the ``nmse`` metric compares, by mean squares."""
    stats = sitk.StatisticsImageFilter()
    stats.Execute(image)
    count = math.prod(image.GetSize())
    spread = stats.GetSigma() * math.sqrt(max(1, count - 1) / count)  # ITK's sigma is the sample one
    out = sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Cast((out - stats.GetMean()) / spread, sitk.sitkFloat32) if spread > 0 else out


_SAMPLING = {
    "random": sitk.ImageRegistrationMethod.RANDOM,
    "regular": sitk.ImageRegistrationMethod.REGULAR,
}


def new_method(
    *,
    metric: str,
    sampling_percentage: float,
    seed: int,
    sampling_strategy: str = "random",
    masks: Masks | None = None,
) -> sitk.ImageRegistrationMethod:
    """A registration method with the named metric, seeded sampling and optional masks."""
    method = sitk.ImageRegistrationMethod()
    try:
        METRICS[metric](method)
    except KeyError:
        raise RegistrationError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})") from None
    method.SetInterpolator(sitk.sitkLinear)
    # Image gradients only at the sampled points, not as whole gradient images filtered at every level
    # and before every metric evaluation: faster, and no less accurate on the tuning data.
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    # ANTs neighbourhood correlation needs whole neighbourhoods: it always uses every voxel.
    if sampling_strategy != "none" and sampling_percentage < 1.0 and metric != "ants_ncc":
        method.SetMetricSamplingStrategy(_SAMPLING[sampling_strategy])
        method.SetMetricSamplingPercentage(sampling_percentage, seed)
    else:
        method.SetMetricSamplingStrategy(method.NONE)
    if masks is not None and masks.fixed is not None:
        method.SetMetricFixedMask(masks.fixed)
    if masks is not None and masks.moving is not None:
        method.SetMetricMovingMask(masks.moving)
    return method


@contextmanager
def quiet_itk():
    """Silence ITK's warnings (e.g. "no valid points"): the stage records and checks its own failures."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def itk_reason(err: RuntimeError) -> str:
    """The gist of an ITK exception: its description, without the class name, address or advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "Description" in line), lines[-1] if lines else "failed")
    reason = re.sub(r"^(Description:\s*)?(ITK ERROR:\s*)?\w+\(0x[0-9a-fA-F]+\):\s*", "", reason.strip())
    return ". ".join(reason.split(". ")[:2]).rstrip(".")


def run_pyramid(
    method: sitk.ImageRegistrationMethod,
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    shrink_factors,
    smoothing_sigmas,
) -> tuple[sitk.Transform, dict]:
    """Run ``method`` coarse to fine; return the optimised transform and a per-level record.

    The stage configures the transform and optimiser on ``method`` (its per-level
    solver); this driver owns the pyramid and the bookkeeping.
    """
    method.SetShrinkFactorsPerLevel(list(shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(smoothing_sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    levels: list[dict] = []
    clock = {"t": time.perf_counter()}

    def on_level():
        now = time.perf_counter()
        if levels:
            levels[-1]["seconds"] = round(now - clock["t"], 3)
        clock["t"] = now
        levels.append({"level": len(levels), "shrink": int(shrink_factors[len(levels)]), "iterations": 0, "metric": None})

    def on_iteration():
        levels[-1]["iterations"] = int(method.GetOptimizerIteration()) + 1
        levels[-1]["metric"] = float(method.GetMetricValue())

    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    try:
        with quiet_itk():
            transform = method.Execute(fixed, moving)
    except RuntimeError as err:
        raise RegistrationError(f"registration failed: {itk_reason(err)}") from None
    if levels:
        levels[-1]["seconds"] = round(time.perf_counter() - clock["t"], 3)
    record = {
        "levels": levels,
        "stop_condition": method.GetOptimizerStopConditionDescription(),
    }
    return transform, record


def transform_is_finite(transform: sitk.Transform) -> bool:
    """False when any parameter of ``transform`` (or of a composite's parts) is NaN or infinite."""
    if isinstance(transform, sitk.CompositeTransform):
        return all(transform_is_finite(transform.GetNthTransform(i)) for i in range(transform.GetNumberOfTransforms()))
    if isinstance(transform, sitk.DisplacementFieldTransform):  # its parameters are the field: read them as an array
        return bool(np.isfinite(sitk.GetArrayViewFromImage(transform.GetDisplacementField())).all())
    return bool(np.isfinite(transform.GetParameters()).all() and np.isfinite(transform.GetFixedParameters()).all())


@dataclass(frozen=True)
class Masks:
    """Optional binary masks (nonzero = inside) restricting the metric, each on its image's grid.

    The fixed mask also defines the target's foreground for the result checks.
    """

    fixed: sitk.Image | None = None
    moving: sitk.Image | None = None

    def __post_init__(self):
        for name in ("fixed", "moving"):
            mask = getattr(self, name)
            if mask is not None:
                object.__setattr__(self, name, sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8))


COARSEST_VOXELS = 32  # a derived pyramid's coarsest voxels are about 1/32 of the image's longest extent
MIN_AXIS_VOXELS = 8  # ... and a derived level never bins an axis below this many voxels


def derive_shrink_factors(size, spacing) -> list[tuple[int, ...]]:
    """Per-axis shrink factors (x first) of each pyramid level, coarse to fine, from an image's ``size`` (voxels)
    and ``spacing`` (mm), x first.

    Level ``l`` (0 = full resolution) aims at voxels ``2**l`` times the finest spacing: each axis is binned by
    as many of its voxels as fit in that (1 where its voxels are already that coarse: anisotropy is respected),
    never leaving fewer than ``MIN_AXIS_VOXELS`` voxels along it. The coarsest level is the first whose target
    voxel size reaches the longest extent / ``COARSEST_VOXELS``, and at least level 1 (as the fixed ``[2, 1]``
    did: a small image still gets a coarse start), unless nothing bins any more.
    """
    size = np.asarray(size)
    spacing = np.asarray(spacing, dtype=float)
    limit = np.maximum(1, size // MIN_AXIS_VOXELS)
    coarsest = max(1, int(np.ceil(np.log2(max(1.0, float((size * spacing).max()) / (COARSEST_VOXELS * spacing.min()))))))
    levels: list[tuple[int, ...]] = []
    for level in range(coarsest + 1):
        shrink = np.minimum(np.maximum(1, np.floor(spacing.min() * 2**level / spacing + 1e-6)), limit).astype(int)
        if not levels or tuple(shrink) != levels[-1]:
            levels.append(tuple(int(s) for s in shrink))
    return levels[::-1]


def shrink_record(shrink) -> int | list[int]:
    """A level's shrink factor as recorded: one number, or one per axis (x first) where they differ."""
    factors = [int(s) for s in np.atleast_1d(shrink)]
    return factors[0] if len(set(factors)) == 1 else factors


def pyramid_image(image: sitk.Image, shrink, sigma: float) -> sitk.Image:
    """``image`` smoothed with a Gaussian of ``sigma`` mm, then shrunk by ``shrink`` (voxel averaging): one
    factor for every axis, or one per axis (x first)."""
    if sigma > 0:
        image = sitk.SmoothingRecursiveGaussian(image, sigma)
    factors = [int(s) for s in np.broadcast_to(shrink, (image.GetDimension(),))]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def per_level(values, levels: int) -> list:
    """A per-level setting (one value, or a list coarse to fine) for ``levels`` levels: a list shorter than that
    repeats its first (coarsest) entry at the extra coarse levels; a longer one keeps its finest ``levels``."""
    if not isinstance(values, (list, tuple)):
        return [values] * levels
    values = list(values)
    return ([values[0]] * (levels - len(values)) + values)[-levels:]


def level_shrinks(stage, size, spacing) -> list[tuple[int, ...]]:
    """The shrink factors, one per axis (x first), of each level of ``stage``'s pyramid (a non-rigid stage's
    config) for an image of ``size`` voxels and ``spacing`` mm: derived for ``shrink_factors: auto``
    (:func:`derive_shrink_factors`), else the configured ones on every axis."""
    if stage.shrink_factors == "auto":
        return derive_shrink_factors(size, spacing)
    return [(int(shrink),) * len(size) for shrink in stage.shrink_factors]


def pyramid(stage, image: sitk.Image) -> tuple[list, list[float], list[int]]:
    """(shrink factors, smoothing sigmas, iterations) per level, coarse to fine, of the non-rigid stage's
    config on ``image``: ``shrink_factors: auto`` derives them (:func:`derive_shrink_factors`)."""
    if stage.shrink_factors == "auto":
        shrinks = derive_shrink_factors(image.GetSize(), image.GetSpacing())
    else:
        shrinks = list(stage.shrink_factors)
    n = len(shrinks)
    return shrinks, [float(s) for s in per_level(stage.smoothing_sigmas, n)], per_level(stage.iterations, n)


def run_levels(shrink_factors, smoothing_sigmas, solve: Callable[[int, object, float], dict]) -> list[dict]:
    """Coarse-to-fine driver of the non-rigid stages.

    ``solve(level, shrink, sigma)`` is the stage's solver for one level: it carries
    its own state from level to level and returns what it wants recorded
    (iterations, metric, stop condition); the driver adds the level, its pyramid
    settings and its time.
    """
    levels = []
    for level, (shrink, sigma) in enumerate(zip(shrink_factors, smoothing_sigmas)):
        start = time.perf_counter()
        info = solve(level, shrink, float(sigma))
        levels.append({"level": level, "shrink": shrink_record(shrink), "sigma": float(sigma), **info,
                       "seconds": round(time.perf_counter() - start, 3)})
    return levels


# --------------------------------------------------------------------------- result checks

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
    inside = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(moving)
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
        rejected.append(f"too little overlap: only {record['overlap']:.0%} of the target's foreground maps inside "
                        f"the atlas (min_overlap {min_overlap:.0%})")
    if record["folded_fraction"] > max_folded_fraction:
        rejected.append(f"too much folding: {record['folded_fraction']:.1%} of the target's foreground is folded "
                        f"(max_folded_fraction {max_folded_fraction:.1%})")
    if diverged or rejected:
        record["status"] = "diverged" if diverged else "rejected"
        raise RegistrationDiverged(f"{stage} registration {record['status']}: {'; '.join(diverged + rejected)}", record)
    record["status"] = "ok"
