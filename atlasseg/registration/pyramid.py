"""Multi-resolution pyramids: shrink factors (explicit or derived), the per-level images, the level driver."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import SimpleITK as sitk

COARSEST_VOXELS = 32  # a derived pyramid's coarsest voxels are about 1/32 of the image's longest extent
MIN_AXIS_VOXELS = 8  # ... and a derived level never bins an axis below this many voxels
AFFINE_FINEST_VOXELS = 64  # a derived affine pyramid stops at the coarsest level with this many voxels across


def derive_shrink_factors(size, spacing, *, finest_level: int = 0) -> list[tuple[int, ...]]:
    """Per-axis shrink factors (x first) of each pyramid level, coarse to fine, from an image's ``size`` (voxels)
    and ``spacing`` (mm), x first.

    Level ``l`` (0 = full resolution) aims at voxels ``2**l`` times the finest spacing: each axis is binned by
    as many of its voxels as fit in that (1 where its voxels are already that coarse: anisotropy is respected),
    never leaving fewer than ``MIN_AXIS_VOXELS`` voxels along it. The coarsest level is the first whose target
    voxel size reaches the longest extent / ``COARSEST_VOXELS``, and at least one level coarser than
    ``finest_level`` (as the fixed ``[2, 1]`` did: a small image still gets a coarse start), unless nothing bins
    any more. The finest level is ``finest_level`` (the affine stage stops coarser than 0: see
    :func:`derive_affine_shrink_factors`).
    """
    size = np.asarray(size)
    spacing = np.asarray(spacing, dtype=float)
    limit = np.maximum(1, size // MIN_AXIS_VOXELS)
    coarsest = max(
        finest_level + 1,
        int(np.ceil(np.log2(max(1.0, float((size * spacing).max()) / (COARSEST_VOXELS * spacing.min()))))),
    )
    levels: list[tuple[int, ...]] = []
    for level in range(finest_level, coarsest + 1):
        shrink = np.minimum(np.maximum(1, np.floor(spacing.min() * 2**level / spacing + 1e-6)), limit).astype(int)
        if not levels or tuple(shrink) != levels[-1]:
            levels.append(tuple(int(s) for s in shrink))
    return levels[::-1]


def derive_affine_shrink_factors(size, spacing) -> list[tuple[int, ...]]:
    """The affine stage's derived pyramid (``registration.affine.shrink_factors: auto``): the non-rigid one's
    levels (:func:`derive_shrink_factors`, anisotropy respected) from the same coarsest level down to the
    coarsest that still has ``AFFINE_FINEST_VOXELS`` voxels across the longest extent, never full resolution:
    12 parameters are set by the anatomy's layout, the non-rigid stage refines the detail, and the affine's
    cost grows with every voxel it samples. At least two levels. That is the fixed ``[4, 2]`` it replaces on a
    35×50×35 mm crop, ``(4, 4, 1), (2, 2, 1)`` on 2.5 × 2.5 × 8 mm cardiac stacks (``[4, 2]`` left 3 of their
    13 slices), ``(8, 8, 1), (4, 4, 1)`` on 1.25 × 1.25 × 7.7 mm abdominal scans."""
    extent = float((np.asarray(size) * np.asarray(spacing, dtype=float)).max())
    finest = max(1, int(np.floor(np.log2(max(1.0, extent / (AFFINE_FINEST_VOXELS * min(spacing)))))))
    return derive_shrink_factors(size, spacing, finest_level=finest)


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


def level_shrinks(stage, size, spacing, *, derive=derive_shrink_factors) -> list[tuple[int, ...]]:
    """The shrink factors, one per axis (x first), of each level of ``stage``'s pyramid (a registration stage's
    config) for an image of ``size`` voxels and ``spacing`` mm: derived by ``derive`` for ``shrink_factors: auto``
    (the non-rigid stage's :func:`derive_shrink_factors`, or the affine's :func:`derive_affine_shrink_factors`),
    else the configured ones on every axis."""
    if stage.shrink_factors == "auto":
        return derive(size, spacing)
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


def run_levels(
    shrink_factors,
    smoothing_sigmas,
    *,
    start: Callable[[object, float], object],
    upsample: Callable[[object, int, object, float], object],
    solve: Callable[[int, object, float, object], tuple[object, dict]],
) -> tuple[object, list[dict]]:
    """Coarse-to-fine driver of the non-rigid stages; returns the finest level's state and the per-level records.

    The state is whatever a solver optimises (a field, spline coefficients) on one level's grid. The driver
    owns the warm start: ``start(shrink, sigma)`` is the state before the coarsest level (no deformation, on
    that level's grid), ``upsample(state, level, shrink, sigma)`` carries the previous level's result onto
    level ``level``'s grid; ``solve(level, shrink, sigma, state)`` optimises one level and returns the new
    state and what it wants recorded (iterations, metric, stop condition), to which the driver adds the level,
    its pyramid settings and its time (the warm start's included).
    """
    levels, state = [], None
    for level, (shrink, sigma) in enumerate(zip(shrink_factors, smoothing_sigmas)):
        began = time.perf_counter()
        sigma = float(sigma)
        state = start(shrink, sigma) if level == 0 else upsample(state, level, shrink, sigma)
        state, info = solve(level, shrink, sigma, state)
        levels.append(
            {
                "level": level,
                "shrink": shrink_record(shrink),
                "sigma": sigma,
                **info,
                "seconds": round(time.perf_counter() - began, 3),
            }
        )
    return state, levels
