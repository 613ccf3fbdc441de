"""Linear registration: initialisation, then translation → rigid → similarity → affine."""

from __future__ import annotations

import math
import time

import numpy as np
import SimpleITK as sitk

from ..config import AffineConfig
from ..errors import RegistrationError
from .common import Masks, new_method, run_pyramid, standardized, transform_is_finite
from .landmarks import landmark_transform
from .metrics import image_metric

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
    # A translation stage is a rigid transform whose rotation the optimiser may not move
    # (see _frozen_rotation): it keeps whatever rotation the initialisation found.
    out = sitk.AffineTransform(dim) if kind == "affine" else _KINDS[("rigid" if kind == "translation" else kind, dim)]()
    out.SetCenter(centre.tolist())
    out.SetMatrix(matrix.ravel().tolist())
    out.SetTranslation(translation.tolist())
    return out


def _frozen_rotation(method: sitk.ImageRegistrationMethod, transform: sitk.Transform, dim: int) -> None:
    """Optimiser weights that hold a rigid transform's angles fixed and leave its translation free."""
    n = transform.GetNumberOfParameters()
    method.SetOptimizerWeights([0.0] * (n - dim) + [1.0] * dim)


def initial_transform(fixed: sitk.Image, moving: sitk.Image, *, initialization: str, landmarks=None) -> sitk.Transform:
    """Start point mapping fixed-space points into the moving image (physical space, never array order).

    ``landmarks`` is a (fixed points, moving points) pair, needed by ``landmarks``.
    """
    dim = fixed.GetDimension()
    if initialization == "none":
        return sitk.AffineTransform(dim)
    if initialization == "landmarks":
        if landmarks is None:
            raise RegistrationError("initialization 'landmarks' needs landmark files for both images")
        fixed_points, moving_points = landmarks
        if fixed_points.shape[1] != dim:
            raise RegistrationError(f"landmarks are {fixed_points.shape[1]}D but the images are {dim}D")
        return landmark_transform(fixed_points, moving_points)
    base = _KINDS[("rigid", dim)]()
    try:
        return sitk.CenteredTransformInitializer(fixed, moving, base, _INITIALIZERS[initialization])
    except RuntimeError as err:
        raise RegistrationError(f"{initialization} initialisation failed: {str(err).strip().splitlines()[-1]}") from None


def _regular_step(method: sitk.ImageRegistrationMethod, config: AffineConfig) -> None:
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=config.learning_rate,
        minStep=1e-3 * config.learning_rate,
        numberOfIterations=config.iterations,
        # The step shrinks by 0.8 at each reversal of the gradient. ITK's 0.5 shrank it to minStep within
        # ~10 reversals, which sampling noise brings fast: a lone affine stage stopped up to a voxel short.
        relaxationFactor=0.8,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()


def _gradient_descent(method: sitk.ImageRegistrationMethod, config: AffineConfig) -> None:
    method.SetOptimizerAsGradientDescentLineSearch(
        learningRate=config.learning_rate,
        numberOfIterations=config.iterations,
        convergenceMinimumValue=1e-6,
        convergenceWindowSize=10,
        estimateLearningRate=method.Never,  # SimpleITK's default (Once) would override learning_rate
    )
    method.SetOptimizerScalesFromPhysicalShift()


def _lbfgsb(method: sitk.ImageRegistrationMethod, config: AffineConfig) -> None:
    # ITK's L-BFGS-B takes no parameter scales
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-6, numberOfIterations=config.iterations)


# The configured optimiser, with the configured step and iterations really in effect; keyed by
# ``registration.affine.optimizer``.
OPTIMIZERS = {"regular_step": _regular_step, "gradient_descent": _gradient_descent, "lbfgsb": _lbfgsb}


def register_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    config: AffineConfig,
    seed: int,
    masks: Masks | None = None,
    landmarks: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[sitk.Transform, dict]:
    """Align ``moving`` to ``fixed`` linearly.

    ``masks`` restrict the metric; ``landmarks`` (fixed points, moving points) feed the
    ``landmarks`` initialisation.

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
    transform = initial_transform(fixed, moving, initialization=config.initialization, landmarks=landmarks)
    record = {
        "initialization": config.initialization,
        "metric": config.metric,
        "optimizer": config.optimizer,
        "metric_before": image_metric(fixed, moving, transform, metric=config.metric, masks=masks),
        "stages": [],
    }
    # nmse: ITK's mean squares of the images standardised once, each over its whole domain
    optimised = (standardized(fixed), standardized(moving)) if config.metric == "nmse" else (fixed, moving)
    for kind in config.stages:
        transform = _as_kind(transform, kind, dim)
        method = new_method(
            metric=config.metric, sampling_percentage=config.sampling_percentage, seed=seed,
            sampling_strategy=config.sampling_strategy, masks=masks,
        )
        OPTIMIZERS[config.optimizer](method, config)
        if kind == "translation":
            _frozen_rotation(method, transform, dim)
        method.SetInitialTransform(transform, inPlace=True)
        stage_start = time.perf_counter()
        _, stage_record = run_pyramid(
            method, *optimised, shrink_factors=config.shrink_factors, smoothing_sigmas=config.smoothing_sigmas
        )
        stage_record["levels"] = _as_loss(stage_record["levels"], config.metric)
        record["stages"].append({"stage": kind, "seconds": round(time.perf_counter() - stage_start, 3), **stage_record})
    if not transform_is_finite(transform):
        raise RegistrationError("affine registration diverged: non-finite transform parameters")
    record["metric_after"] = image_metric(fixed, moving, transform, metric=config.metric, masks=masks)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return transform, record


# ITK's value of each metric → atlasseg's loss of the same metric (``metrics.make_loss``, what metric_before and
# metric_after hold): ITK's correlation is −NCC², atlasseg's 1 − NCC (here 1 − |NCC|: ITK cannot tell the sign);
# the others share their sign convention.
_ITK_TO_LOSS = {"ncc": lambda value: 1.0 - math.sqrt(max(0.0, -value))}


def _as_loss(levels: list[dict], metric: str) -> list[dict]:
    """Per-level metric values in the convention of ``metric_before``/``metric_after`` (lower is better)."""
    convert = _ITK_TO_LOSS.get(metric)
    if convert is None:
        return levels
    return [{**level, "metric": None if level["metric"] is None else convert(level["metric"])} for level in levels]
