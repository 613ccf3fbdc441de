"""Linear registration: initialisation, then translation → rigid → similarity → affine."""

from __future__ import annotations

import math
import time

import numpy as np
import scipy.fft
import SimpleITK as sitk

from ..config import AffineConfig
from ..errors import RegistrationError
from .geometry import body_scan, domain
from .itk import Masks, new_method, run_pyramid, samples_every_voxel, standardized, transform_is_finite
from .landmarks import landmark_transform
from .metrics import image_metric
from .pyramid import derive_affine_shrink_factors, level_shrinks, per_level, pyramid_image, shrink_record

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
        raise RegistrationError(
            f"{initialization} initialisation failed: {str(err).strip().splitlines()[-1]}"
        ) from None


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
    start = time.perf_counter()
    transform = initial_transform(fixed, moving, initialization=config.initialization, landmarks=landmarks)
    scan = body_scan(fixed)
    window = config.local_normalization if scan else 0.0
    optimised = (fixed, moving)
    if window > 0:
        optimised = tuple(locally_normalized(image, window) for image in optimised)
    if config.metric == "nmse":  # ITK's mean squares of the images standardised once, each over its whole domain
        optimised = tuple(standardized(image) for image in optimised)
    record = {
        "initialization": config.initialization,
        "metric": config.metric,
        "optimizer": config.optimizer,
        "local_normalization": window,
        # before and after: on the images the optimiser compares (locally normalised where it was)
        "metric_before": image_metric(*optimised, transform, metric=config.metric, masks=masks),
        "stages": [],
    }
    if scan and config.translation_search > 0 and config.stages and config.initialization != "landmarks":
        transform, record["translation_search"] = _search_start(*optimised, transform, config=config, masks=masks)
    for kind in config.stages:
        transform, stage_record = _optimise(*optimised, transform, kind, config=config, seed=seed, masks=masks)
        record["stages"].append(stage_record)
    if not transform_is_finite(transform):
        raise RegistrationError("affine registration diverged: non-finite transform parameters")
    record["metric_after"] = image_metric(*optimised, transform, metric=config.metric, masks=masks)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return transform, record


def _optimise(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    kind: str,
    *,
    config: AffineConfig,
    seed: int,
    masks: Masks | None,
) -> tuple[sitk.Transform, dict]:
    """One stage of the chain (``kind``) from ``transform`` on ``config``'s pyramid: the result and its record.

    ITK runs the pyramid in one ``Execute`` where every level bins all axes alike (see
    :func:`~atlasseg.registration.itk.run_pyramid`); SimpleITK takes no per-axis factors, so a pyramid that
    respects anisotropy (a derived one on thick slices) runs one ``Execute`` a level, on the fixed image smoothed
    and binned per axis and the moving image smoothed, the transform carried from level to level."""
    dim = fixed.GetDimension()
    transform = _as_kind(transform, kind, dim)
    shrinks = level_shrinks(config, fixed.GetSize(), fixed.GetSpacing(), derive=derive_affine_shrink_factors)
    sigmas = per_level(list(config.smoothing_sigmas), len(shrinks))
    shares = level_sampling(fixed, config, shrinks)

    def method_for(percentages: list[float]) -> sitk.ImageRegistrationMethod:
        method = new_method(
            metric=config.metric,
            sampling_percentage=config.sampling_percentage,
            seed=seed,
            sampling_strategy=config.sampling_strategy,
            masks=masks,
            level_percentages=percentages,
        )
        OPTIMIZERS[config.optimizer](method, config)
        if kind == "translation":
            _frozen_rotation(method, transform, dim)
        method.SetInitialTransform(transform, inPlace=True)
        return method

    stage_start = time.perf_counter()
    if all(len(set(shrink)) == 1 for shrink in shrinks):
        _, stage_record = run_pyramid(
            method_for(shares), fixed, moving, shrink_factors=[s[0] for s in shrinks], smoothing_sigmas=sigmas
        )
    else:
        levels = []
        for level, (shrink, sigma, share) in enumerate(zip(shrinks, sigmas, shares)):
            _, level_record = run_pyramid(
                method_for([share]),
                pyramid_image(fixed, shrink, sigma),
                pyramid_image(moving, 1, sigma),  # smoothed only: the metric samples the fixed grid
                shrink_factors=[1],
                smoothing_sigmas=[0.0],
            )
            levels.append({**level_record["levels"][0], "level": level, "shrink": shrink_record(shrink)})
        stage_record = {"levels": levels, "stop_condition": level_record["stop_condition"]}
    stage_record["levels"] = [
        {**level, "sampling": round(share, 5)}
        for level, share in zip(_as_loss(stage_record["levels"], config.metric), shares)
    ]
    return transform, {"stage": kind, "seconds": round(time.perf_counter() - stage_start, 3), **stage_record}


def level_sampling(fixed: sitk.Image, config: AffineConfig, shrinks: list[tuple[int, ...]]) -> list[float]:
    """Per pyramid level (``shrinks``: its factors per axis), the share of the fixed image's voxels sampled:
    ``sampling_percentage``, but never more than ``max_samples`` points. A linear transform has at most 12
    parameters, whose estimate needs a number of samples, not a share of the image: a share sized for a small
    crop gave a 256×256×40 scan 80 000 samples a level, most of the affine stage's time. Every voxel (1.0) where
    the metric needs them (:func:`~atlasseg.registration.itk.samples_every_voxel`)."""
    if samples_every_voxel(config.metric, config.sampling_strategy):
        return [1.0] * len(shrinks)
    shares = []
    for shrink in shrinks:
        voxels = math.prod(max(1, n // f) for n, f in zip(fixed.GetSize(), shrink))
        cap = config.max_samples / voxels if config.max_samples else 1.0
        shares.append(min(config.sampling_percentage, cap))
    return shares


_SEARCH_GRID_MM = 8.0  # the search's grid: voxels binned to about this size, never below the image's own spacing
_SEARCH_MIN_OVERLAP = 0.5  # a shift counts only where the images overlap on half the smaller one's domain or more


def _bin_factors(image: sitk.Image, grid_mm: float) -> list[int]:
    """Per axis, how many voxels make a block of about ``grid_mm``: 1 on an axis already that coarse (the thick
    axis of an anisotropic scan), and never so many that the axis keeps fewer than 4 voxels."""
    return [max(1, min(int(grid_mm // step), size // 4)) for size, step in zip(image.GetSize(), image.GetSpacing())]


def _binned(image: sitk.Image, grid_mm: float) -> sitk.Image:
    """``image`` averaged over blocks of about ``grid_mm`` (:func:`_bin_factors`), as float32."""
    return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), _bin_factors(image, grid_mm))


def translation_map(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None, reach
) -> tuple[np.ndarray, np.ndarray]:
    """NCC of ``fixed`` with ``moving`` shifted by every whole-voxel shift up to ``reach`` (voxels per axis, numpy
    axis order) on ``fixed``'s grid, each over the voxels where both images (and their masks) are defined.

    ``moving`` lies on ``fixed``'s grid extended by ``reach`` on every side; the masks are 0/1 arrays-as-images on
    the same grids (None: the whole domain). All six sums of the masked NCC (Padfield, IEEE TIP 2012) are
    correlations, one FFT each way.

    Returns
    -------
    ncc : ndarray
        Shape ``2 * reach + 1``; index ``reach + s`` holds shift ``s``: fixed voxel ``x`` against moving ``x + s``.
    overlap : ndarray
        Same shape: how many voxels each shift compares.
    """
    f = sitk.GetArrayViewFromImage(fixed).astype(np.float64)
    m = sitk.GetArrayViewFromImage(moving).astype(np.float64)
    mf = np.ones_like(f) if fixed_mask is None else sitk.GetArrayViewFromImage(fixed_mask).astype(np.float64)
    mm = np.ones_like(m) if moving_mask is None else sitk.GetArrayViewFromImage(moving_mask).astype(np.float64)
    shape = [scipy.fft.next_fast_len(n, real=True) for n in m.shape]  # ≥ f + 2 reach: no shift wraps round
    fixed_side = [np.conj(scipy.fft.rfftn(a, shape)) for a in (mf, f * mf, f * f * mf)]
    moving_side = [scipy.fft.rfftn(a, shape) for a in (mm, m * mm, m * m * mm)]
    window = tuple(slice(0, 2 * r + 1) for r in reach)

    def correlated(a, b):
        return scipy.fft.irfftn(a * b, shape)[window]

    count = np.rint(correlated(fixed_side[0], moving_side[0]))
    n = np.maximum(count, 1.0)
    sum_f, sum_m = correlated(fixed_side[1], moving_side[0]), correlated(fixed_side[0], moving_side[1])
    var_f = correlated(fixed_side[2], moving_side[0]) - sum_f * sum_f / n
    var_m = correlated(fixed_side[0], moving_side[2]) - sum_m * sum_m / n
    cross = correlated(fixed_side[1], moving_side[1]) - sum_f * sum_m / n
    floor = 1e-6 * max(var_f.max(), var_m.max(), 1e-12)  # a flat overlap correlates with nothing
    ncc = np.where((var_f > floor) & (var_m > floor), cross / np.sqrt(np.maximum(var_f * var_m, floor**2)), -1.0)
    return ncc, count


def _search_start(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    *,
    config: AffineConfig,
    masks: Masks | None,
) -> tuple[sitk.Transform, dict]:
    """``transform`` moved by the best of every translation up to ± ``config.translation_search`` of the images'
    common extent along each of the fixed image's axes, on a grid of about 8 mm: the NCC of every shift at once
    (:func:`translation_map`, exhaustive where a handful of optimised starts each stops in its own basin), among
    shifts whose overlap covers half the smaller image or more. Kept only if at full resolution it also beats
    ``transform`` on the configured metric (else ``transform`` stays). Returns the start and a record."""
    dim = fixed.GetDimension()
    start = time.perf_counter()
    coarse = _binned(fixed, _SEARCH_GRID_MM)
    spacing = np.asarray(coarse.GetSpacing())
    extents = [
        min(fixed.GetSize()[d] * fixed.GetSpacing()[d], moving.GetSize()[d] * moving.GetSpacing()[d])
        for d in range(dim)
    ]
    reach = [int(config.translation_search * extent // step) for extent, step in zip(extents, spacing)]
    # The moving image (and its domain) on the coarse fixed grid grown by the reach, through ``transform``.
    grown = sitk.Image([n + 2 * r for n, r in zip(coarse.GetSize(), reach)], sitk.sitkUInt8)
    grown.SetSpacing(coarse.GetSpacing())
    grown.SetDirection(coarse.GetDirection())
    grown.SetOrigin(coarse.TransformContinuousIndexToPhysicalPoint([-float(r) for r in reach]))
    inside = domain(moving)
    if masks is not None and masks.moving is not None:
        inside = sitk.And(inside, sitk.Cast(masks.moving > 0, sitk.sitkUInt8))
    moved = sitk.Resample(_binned(moving, _SEARCH_GRID_MM), grown, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved_domain = sitk.Resample(inside, grown, transform, sitk.sitkNearestNeighbor, 0)
    fixed_domain = None  # a block counts if the fixed mask covers half of it or more
    if masks is not None and masks.fixed is not None:
        covered = sitk.BinShrink(sitk.Cast(masks.fixed > 0, sitk.sitkFloat32), _bin_factors(fixed, _SEARCH_GRID_MM))
        fixed_domain = sitk.Cast(covered >= 0.5, sitk.sitkUInt8)
    ncc, count = translation_map(coarse, moved, fixed_domain, moved_domain, reach[::-1])
    fixed_size = (
        math.prod(coarse.GetSize())
        if fixed_domain is None
        else np.count_nonzero(sitk.GetArrayViewFromImage(fixed_domain))
    )
    smaller = min(fixed_size, np.count_nonzero(sitk.GetArrayViewFromImage(moved_domain)))
    ncc[count < max(_SEARCH_MIN_OVERLAP * smaller, 1)] = -np.inf  # and never a shift that compares nothing
    record = {"grid_mm": [round(float(s), 2) for s in spacing], "reach_voxels": reach, "shift": None, "ncc": None}
    if not np.isfinite(ncc.max()):  # no shift brings the images together: the initialisation stays
        record["seconds"] = round(time.perf_counter() - start, 3)
        return transform, record
    best = np.unravel_index(np.argmax(ncc), ncc.shape)
    steps = (np.asarray(best) - np.asarray(reach[::-1]))[::-1]  # voxels, the fixed image's index order
    axes = np.asarray(fixed.GetDirection()).reshape(dim, dim)  # columns: the fixed image's axes in physical space
    shift = axes @ (steps * spacing)
    matrix, _ = linear_parts(transform)
    found = _as_kind(transform, "translation", dim)
    found.SetTranslation((np.asarray(found.GetTranslation()) + matrix @ shift).tolist())
    record["ncc"] = round(float(ncc[best]), 4)
    before, after = (image_metric(fixed, moving, t, metric=config.metric, masks=masks) for t in (transform, found))
    if after < before:  # NaN (no overlap) never wins
        transform = found  # the initialisation's rotation, at the position found
        record.update(shift=[round(float(s), 2) for s in shift], metric_before=before, metric_after=after)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return transform, record


def locally_normalized(image: sitk.Image, sigma: float) -> sitk.Image:
    """``image`` (float32) minus its local mean, over its local standard deviation, both in a Gaussian window of
    ``sigma`` mm; the spread is floored at 5 % of the image's range so that flat regions (air) stay flat."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    floor = 0.05 * (stats.GetMaximum() - stats.GetMinimum()) or 1.0
    mean = sitk.SmoothingRecursiveGaussian(image, sigma)
    spread = sitk.Sqrt(sitk.Maximum(sitk.SmoothingRecursiveGaussian(image * image, sigma) - mean * mean, 0.0))
    return sitk.Cast((image - mean) / (spread + floor), sitk.sitkFloat32)


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
