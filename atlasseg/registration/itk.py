"""The ITK side of registration: the metric registry, the method factory with its masks, the ITK pyramid driver."""

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


def samples_every_voxel(metric: str, sampling_strategy: str) -> bool:
    """Whether the metric is computed on every voxel: no sampling asked for, or ANTs neighbourhood
    correlation, which needs whole neighbourhoods."""
    return sampling_strategy == "none" or metric == "ants_ncc"


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
    level_percentages: list[float] | None = None,
) -> sitk.ImageRegistrationMethod:
    """A registration method with the named metric, seeded sampling and optional masks.

    ``level_percentages`` (one per pyramid level) replace ``sampling_percentage`` where given."""
    if seed < 1:  # SimpleITK reads 0 as "seed from the wall clock": a run that does not repeat
        raise RegistrationError(f"sampling seed must be >= 1, got {seed}")
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
    percentages = level_percentages or [sampling_percentage]
    if not samples_every_voxel(metric, sampling_strategy) and min(percentages) < 1.0:
        method.SetMetricSamplingStrategy(_SAMPLING[sampling_strategy])
        method.SetMetricSamplingPercentagePerLevel(percentages, seed)
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
    solver); this driver owns the pyramid and the bookkeeping. ITK runs the levels itself
    rather than :func:`~atlasseg.registration.pyramid.run_levels` one ``Execute`` per level:
    within one ``Execute`` its random metric sampling draws on from level to level and its
    optimisers (line search, L-BFGS-B) keep state across levels, so level-by-level runs give
    other transforms (parameters apart by up to 0.44 on a hippocampus pair, default random sampling).
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
        levels.append(
            {"level": len(levels), "shrink": int(shrink_factors[len(levels)]), "iterations": 0, "metric": None}
        )

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
