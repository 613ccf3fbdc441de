"""The registration stages: affine then non-rigid, each checked (metric, overlap, folding), with their records."""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
from threadpoolctl import threadpool_limits

from ..config import NonrigidConfig, RegistrationConfig
from ..errors import RegistrationError
from .affine import linear_parts, register_affine
from .bspline import register_bspline
from .checks import check_result, foreground, overlap_fraction
from .demons import register_demons
from .itk import Masks, transform_is_finite
from .metrics import image_metric, mapped
from .transforms import (
    jacobian_determinant,
)

NONRIGID_METHODS = {"bspline": register_bspline, "demons": register_demons}


def register_nonrigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    initial: sitk.Transform,
    config: NonrigidConfig,
    seed: int,
    masks: Masks | None = None,
) -> tuple[sitk.Transform, dict]:
    """Run the configured non-rigid method from ``initial``; the record holds the method, the
    per-level record and the seconds (the stage's checks add the metric before and after)."""
    start = time.perf_counter()
    # The numpy kernels multiply small matrices many times: BLAS threads only add overhead
    # (5x slower on 2 busy cores); the parallelism is across atlases.
    with threadpool_limits(limits=1, user_api="blas"):
        transform, record = NONRIGID_METHODS[config.method](
            fixed, moving, initial=initial, config=config, seed=seed, masks=masks
        )
    if not transform_is_finite(transform):
        raise RegistrationError("non-rigid registration diverged: non-finite transform parameters")
    return transform, {"method": config.method, **record, "seconds": round(time.perf_counter() - start, 3)}


def affine_stage(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    config: RegistrationConfig,
    masks: Masks | None = None,
    landmarks: tuple[np.ndarray, np.ndarray] | None = None,
    given: sitk.Transform | None = None,
    region: np.ndarray | None = None,
) -> tuple[sitk.Transform, dict]:
    """The affine stage, checked: overlap with the atlas, and no reflection (a determinant ≤ 0 folds everything).

    With ``given`` (a transform from elsewhere, e.g. ANTs; any kind) no registration runs: ``given`` is
    checked the same way (its folding measured over the target's foreground) and returned. ``region`` is
    the target's foreground, ``foreground(fixed, masks)``, when the caller has it already.
    """
    region = foreground(fixed, masks) if region is None else region
    if given is None:
        transform, record = register_affine(
            fixed, moving, config=config.affine, seed=config.seed, masks=masks, landmarks=landmarks
        )
        record["jacobian"] = float(np.linalg.det(linear_parts(transform)[0]))
        record["folded_fraction"] = 1.0 if record["jacobian"] <= 0 else 0.0
    else:
        transform = given
        value = image_metric(fixed, moving, given, metric=config.affine.metric, masks=masks)
        record = {
            "given": given.GetName(),
            "metric": config.affine.metric,
            "metric_before": value,
            "metric_after": value,
        }
        jacobian = sitk.GetArrayFromImage(jacobian_determinant(given, fixed))[region]
        record["folded_fraction"] = float(np.mean(jacobian <= 0))
    record["overlap"] = overlap_fraction(fixed, moving, transform, region)
    check_result(
        "affine" if given is None else "affine (given transform)",
        record,
        min_overlap=config.min_overlap,
        max_folded_fraction=config.max_folded_fraction,
    )
    return transform, record


def nonrigid_stage(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    initial: sitk.Transform,
    config: RegistrationConfig,
    masks: Masks | None = None,
    region: np.ndarray | None = None,
) -> tuple[sitk.Transform, dict]:
    """The non-rigid stage from ``initial``, checked: metric, overlap and folding inside the target's foreground
    (``region``, as for :func:`affine_stage`)."""
    transform, record = register_nonrigid(
        fixed, moving, initial=initial, config=config.nonrigid, seed=config.seed, masks=masks
    )
    region = foreground(fixed, masks) if region is None else region
    # Demons compares intensities directly: its check scores them so (mse) whatever the B-spline metric is set to.
    metric = config.nonrigid.metric if config.nonrigid.method == "bspline" else "mse"
    warped = mapped(moving, fixed, transform)  # one pass through the deformation serves the metric and the overlap
    record["metric"] = metric
    record["metric_before"] = image_metric(
        fixed, moving, initial, metric=metric, ncc_radius=config.nonrigid.ncc_radius, masks=masks
    )
    record["metric_after"] = image_metric(
        fixed, moving, transform, metric=metric, ncc_radius=config.nonrigid.ncc_radius, masks=masks, warped=warped
    )
    record["overlap"] = float(np.isfinite(warped[region]).mean())
    jacobian = sitk.GetArrayFromImage(jacobian_determinant(transform, fixed))[
        region
    ]  # a copy: the image is a temporary
    record["jacobian_min"] = float(jacobian.min())
    record["jacobian_max"] = float(jacobian.max())
    record["folded_voxels"] = int((jacobian <= 0).sum())
    record["folded_fraction"] = record["folded_voxels"] / jacobian.size
    check_result("non-rigid", record, min_overlap=config.min_overlap, max_folded_fraction=config.max_folded_fraction)
    return transform, record


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    config: RegistrationConfig,
    masks: Masks | None = None,
    landmarks: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[sitk.Transform, dict]:
    """Affine then (if enabled) non-rigid registration of ``moving`` onto ``fixed``.

    Images should already share an intensity scale (see ``imageio.normalize_intensity``).
    Returns the transform mapping fixed-space points to moving-space points and the record;
    raises :class:`RegistrationDiverged` when a stage's result fails its checks.
    """
    region = foreground(fixed, masks)
    transform, affine_record = affine_stage(
        fixed, moving, config=config, masks=masks, landmarks=landmarks, region=region
    )
    record = {"affine": affine_record}
    if config.nonrigid.enabled:
        transform, record["nonrigid"] = nonrigid_stage(
            fixed, moving, initial=transform, config=config, masks=masks, region=region
        )
    return transform, record
