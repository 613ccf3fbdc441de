"""Linear registration: initialisation, then translation → rigid → similarity → affine."""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from ..config import AffineConfig
from ..errors import RegistrationError
from .common import metric_value, new_method, run_pyramid, transform_is_finite

_INITIALIZERS = {
    "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
    "moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
}

_KINDS = {
    ("rigid", 2): sitk.Euler2DTransform,
    ("rigid", 3): sitk.Euler3DTransform,
    ("similarity", 2): sitk.Similarity2DTransform,
    ("similarity", 3): sitk.Similarity3DTransform,
}


def _matrix_offset(transform: sitk.Transform, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matrix, translation, centre) of a linear transform: x ↦ M (x − c) + c + t."""
    if isinstance(transform, sitk.TranslationTransform):
        return np.eye(dim), np.asarray(transform.GetOffset()), np.zeros(dim)
    matrix = np.asarray(transform.GetMatrix()).reshape(dim, dim)
    return matrix, np.asarray(transform.GetTranslation()), np.asarray(transform.GetCenter())


def linear_parts(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(M, b) with ``transform(x) = M x + b`` for a linear transform (identity included)."""
    dim = transform.GetDimension()
    if isinstance(transform, sitk.TranslationTransform):
        return np.eye(dim), np.asarray(transform.GetOffset())
    if not hasattr(transform, "GetMatrix"):
        if transform.GetTransformEnum() == sitk.sitkIdentity:
            return np.eye(dim), np.zeros(dim)
        raise RegistrationError(f"expected a linear transform, got {transform.GetName()}")
    matrix, translation, centre = _matrix_offset(transform, dim)
    return matrix, translation + centre - matrix @ centre


def _as_kind(transform: sitk.Transform, kind: str, dim: int) -> sitk.Transform:
    """The same mapping as ``transform`` held by a transform of ``kind`` (which is at least as general)."""
    matrix, translation, centre = _matrix_offset(transform, dim)
    if kind == "translation":
        # Translation can only be the first stage; initialisers leave the matrix at identity.
        return sitk.TranslationTransform(dim, translation.tolist())
    out = sitk.AffineTransform(dim) if kind == "affine" else _KINDS[(kind, dim)]()
    out.SetCenter(centre.tolist())
    out.SetMatrix(matrix.ravel().tolist())
    out.SetTranslation(translation.tolist())
    return out


def initial_transform(fixed: sitk.Image, moving: sitk.Image, *, initialization: str) -> sitk.Transform:
    """Start point mapping fixed-space points into the moving image (physical space, never array order)."""
    dim = fixed.GetDimension()
    if initialization == "none":
        return sitk.AffineTransform(dim)
    base = _KINDS[("rigid", dim)]()
    try:
        return sitk.CenteredTransformInitializer(fixed, moving, base, _INITIALIZERS[initialization])
    except RuntimeError as err:
        raise RegistrationError(f"{initialization} initialisation failed: {str(err).strip().splitlines()[-1]}") from None


def register_affine(
    fixed: sitk.Image, moving: sitk.Image, *, config: AffineConfig, seed: int
) -> tuple[sitk.Transform, dict]:
    """Align ``moving`` to ``fixed`` linearly.

    Returns
    -------
    transform : SimpleITK.Transform
        Maps fixed-space points (mm) to moving-space points.
    record : dict
        Metric before/after, per-stage levels, iterations, stop conditions, seconds.
    """
    if fixed.GetDimension() != moving.GetDimension():
        raise RegistrationError(f"cannot register a {moving.GetDimension()}D image to a {fixed.GetDimension()}D one")
    dim = fixed.GetDimension()
    start = time.perf_counter()
    transform = initial_transform(fixed, moving, initialization=config.initialization)
    record = {
        "initialization": config.initialization,
        "metric": config.metric,
        "metric_before": metric_value(fixed, moving, transform, metric=config.metric),
        "stages": [],
    }
    for kind in config.stages:
        transform = _as_kind(transform, kind, dim)
        method = new_method(metric=config.metric, sampling_percentage=config.sampling_percentage, seed=seed)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=config.learning_rate,
            minStep=1e-3 * config.learning_rate,
            numberOfIterations=config.iterations,
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8,
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetInitialTransform(transform, inPlace=True)
        stage_start = time.perf_counter()
        _, stage_record = run_pyramid(
            method, fixed, moving, shrink_factors=config.shrink_factors, smoothing_sigmas=config.smoothing_sigmas
        )
        record["stages"].append({"stage": kind, "seconds": round(time.perf_counter() - stage_start, 3), **stage_record})
    if not transform_is_finite(transform):
        raise RegistrationError("affine registration diverged: non-finite transform parameters")
    record["metric_after"] = metric_value(fixed, moving, transform, metric=config.metric)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return transform, record
