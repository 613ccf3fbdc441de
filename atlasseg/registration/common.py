"""Registration helpers: the ITK metric registry and pyramid driver of the affine stage, result checks."""

from __future__ import annotations

import math
import time
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
    "ants_ncc": _ants_ncc,
}


def new_method(*, metric: str, sampling_percentage: float, seed: int) -> sitk.ImageRegistrationMethod:
    """A registration method with the named metric and seeded random sampling."""
    method = sitk.ImageRegistrationMethod()
    try:
        METRICS[metric](method)
    except KeyError:
        raise RegistrationError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})") from None
    method.SetInterpolator(sitk.sitkLinear)
    if sampling_percentage < 1.0 and metric != "ants_ncc":
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(sampling_percentage, seed)
    else:
        method.SetMetricSamplingStrategy(method.NONE)
    return method


def metric_value(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, *, metric: str) -> float:
    """The metric of ``moving`` mapped through ``transform`` against ``fixed`` (all voxels, full resolution)."""
    method = new_method(metric=metric, sampling_percentage=1.0, seed=0)
    method.SetInitialTransform(transform, inPlace=False)
    try:
        return float(method.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return math.nan  # e.g. no overlap left; the record says so and the caller judges it


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
        transform = method.Execute(fixed, moving)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Description" in line), lines[-1] if lines else "failed")
        raise RegistrationError(f"registration failed: {reason.replace('Description:', '').strip()}") from None
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
    return bool(np.isfinite(transform.GetParameters()).all() and np.isfinite(transform.GetFixedParameters()).all())
