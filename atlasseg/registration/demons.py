"""Non-rigid registration by demons: a dense displacement field, smoothed, coarse to fine (mse or local NCC forces)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..config import NonrigidConfig
from ..similarity import box_mean, floored, local_moments
from .geometry import body_scan
from .itk import Masks
from .pyramid import per_level, pyramid, pyramid_image, run_levels


class _Linear:
    """Linear interpolation at continuous indices ``coords`` (numpy order, shape (dim, ...)) of any
    array on a grid of ``shape``, clamped to the grid (nearest-neighbour extrapolation).

    The lower corner and the weights are found once; calling it interpolates an array, or each
    component of a field (components first). ``outside`` marks the points beyond the grid's voxel
    centres. Each neighbour is read through a shifted view of the array, so no index array per
    corner is made (memory: about 4 bytes per point per dimension, plus 8 for the index).
    """

    def __init__(self, coords: np.ndarray, shape: tuple[int, ...]):
        self.strides = [int(np.prod(shape[axis + 1 :])) if n > 1 else 0 for axis, n in enumerate(shape)]
        self.index, self.fractions = 0, []
        self.outside = np.zeros(coords.shape[1:], bool)
        for axis, n in enumerate(shape):
            c = np.clip(coords[axis], 0, n - 1)
            self.outside |= c != coords[axis]
            lower = np.minimum(np.floor(c), max(n - 2, 0))  # in the coordinates' float type, as the fractions
            self.index = self.index + lower.astype(np.intp) * self.strides[axis]
            self.fractions.append(c - lower)
        self.dim = len(shape)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if array.ndim > self.dim:
            return np.stack([self(component) for component in array])
        return self._corner(array.ravel(), 0, 0)

    def _corner(self, flat: np.ndarray, axis: int, offset: int) -> np.ndarray:
        """The interpolation along axes ``axis`` onwards, from the corner ``offset`` elements on (depth first)."""
        if axis == self.dim:
            return flat[offset:].take(self.index)
        low = self._corner(flat, axis + 1, offset)
        high = self._corner(flat, axis + 1, offset + self.strides[axis])
        return low + self.fractions[axis] * (high - low)


def _regrid(field: np.ndarray, source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """A displacement field (components first) on ``source``'s grid, linearly resampled onto ``target``'s.

    Both grids share their direction (pyramid levels of one image), so each target axis maps to
    the same source axis; outside the source's voxel centres the border value is kept.
    """
    dim = source.GetDimension()
    direction = np.asarray(source.GetDirection()).reshape(dim, dim)
    shift = direction.T @ (np.asarray(target.GetOrigin()) - np.asarray(source.GetOrigin()))  # x first
    scale = np.asarray(target.GetSpacing()) / np.asarray(source.GetSpacing())
    shape = target.GetSize()[::-1]
    axes = [
        (np.arange(n) * scale[dim - 1 - a] + shift[dim - 1 - a] / source.GetSpacing()[dim - 1 - a])
        for a, n in enumerate(shape)
    ]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).astype(field.dtype)
    return _Linear(coords, field.shape[1:])(field)


def _derivatives(array: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """Central differences (one-sided at the borders) of ``array`` along its last ``len(spacing)`` axes,
    in units of ``spacing``; zero along a one-voxel axis."""
    lead = array.ndim - len(spacing)
    return [
        np.gradient(array, float(step), axis=lead + axis) if array.shape[lead + axis] > 1 else np.zeros_like(array)
        for axis, step in enumerate(spacing)
    ]


# Axes up to this many voxels long are smoothed by a product with the smoothing matrix: it costs as many
# multiply-adds per voxel as the axis is long, against the kernel's 2 × radius + 1 (about 11 at the default
# sigmas) in ndimage's loop, but BLAS does them many times faster than ndimage's per-line loop on short lines.
# Measured on fields of 3 × 18 × 25 × 18, 3 × 36 × 50 × 36 and 3 × 64 × 64 × 40 voxels: 2.2, 1.7 and 1.7 times
# as fast; 3 × 128 × 128 × 30 (in-plane axes of 128): 0.7 times, so longer axes keep ndimage's loop.
_MATRIX_AXIS = 64


def _smoother(sigma: np.ndarray):
    """Gaussian smoothing of a field (components first) by ``sigma`` voxels per axis; None: no smoothing.

    As ``ndimage.gaussian_filter(field, [0, *sigma], mode="nearest", truncate=3.0)``: the same kernel, the axes
    in the same order, each in float64 and rounded to the field's float32 after it; an axis up to
    ``_MATRIX_AXIS`` voxels long by a product with its smoothing matrix (the border voxel repeated folded into
    it), which sums in another order, so a value may differ in its last bit where float64 lands on a float32
    rounding boundary (none of 5 × 10⁶ random values did)."""
    if not np.any(sigma > 0):
        return None
    kernels = [_gaussian_kernel(float(s)) if s > 0 else None for s in sigma]
    matrices: dict[tuple[int, int], np.ndarray] = {}  # per (axis, length)

    def smooth(field: np.ndarray) -> np.ndarray:
        out = field
        for axis, kernel in enumerate(kernels, start=1):
            if kernel is None:
                continue
            n = field.shape[axis]
            if n > _MATRIX_AXIS:
                out = ndimage.correlate1d(out, kernel, axis=axis, mode="nearest")
                continue
            if (axis, n) not in matrices:
                matrices[axis, n] = _smoothing_matrix(kernel, n).T
            lines = np.moveaxis(out, axis, -1).astype(np.float64)  # contiguous, the axis last
            out = np.moveaxis((lines @ matrices[axis, n]).astype(field.dtype), -1, axis)
        return np.ascontiguousarray(out)

    return smooth


def _gaussian_kernel(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """The weights ``ndimage.gaussian_filter1d`` correlates with (radius ``int(truncate × sigma + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * x**2)
    return weights / weights.sum()


def _smoothing_matrix(kernel: np.ndarray, n: int) -> np.ndarray:
    """The n × n matrix of correlating a line of ``n`` values with ``kernel``, the border values repeated."""
    radius = len(kernel) // 2
    rows = np.repeat(np.arange(n), len(kernel))
    columns = np.clip(rows + np.tile(np.arange(-radius, radius + 1), n), 0, n - 1)
    matrix = np.zeros((n, n))
    np.add.at(matrix, (rows, columns), np.tile(kernel, n))
    return matrix


LNCC_STEP_QUANTILE = 0.95
LNCC_GROWTH = 1.5  # after an accepted LNCC step the next may be this much longer (up to the cap) ...
LNCC_CONVERGED = 0.01  # ... after a rejected one half as long; below this share of the cap the level has converged


def _unit_step(step: np.ndarray) -> np.ndarray:
    """An LNCC update direction (components first) scaled so that its ``LNCC_STEP_QUANTILE`` quantile of step
    lengths is 1, longer steps cut to 1. (Scaling the longest step instead, as Greedy does, left most of the field
    nearly still: 0.03 to 0.09 lower Dice on cardiac pairs.) Zero stays zero."""
    norm = np.sqrt((step * step).sum(axis=0))
    typical = float(np.quantile(norm, LNCC_STEP_QUANTILE)) or float(norm.max())
    if typical <= 0:
        return step
    return step * (np.minimum(1.0, typical / np.maximum(norm, 1e-30)) / typical)


class _BoxMeans:
    """Local normalised cross-correlation (LNCC) of a fixed image ``f`` with warped moving images, in a
    box of ``radius`` voxels along every axis, and its derivative with respect to the moving intensities.

    With box means ⟨·⟩, A = ⟨f m⟩ − ⟨f⟩⟨m⟩, B = ⟨f f⟩ − ⟨f⟩², C = ⟨m m⟩ − ⟨m⟩², the metric is
    A² / (B C) per voxel; its derivative with respect to m at a voxel is taken, as ANTs and Greedy take
    it (Avants et al. 2008), as 2A / (B C) · ((f − ⟨f⟩) − A / C (m − ⟨m⟩)). B and C are floored
    (:func:`~atlasseg.similarity.floored`), so a flat window, where A vanishes too, gives no force.
    """

    def __init__(self, f: np.ndarray, radius: int):
        self.size = 2 * radius + 1
        self.f = f
        self.mean_f, var_f = local_moments(f, self.size)
        self.var_f = floored(var_f)

    def force(self, m: np.ndarray, outside: np.ndarray) -> tuple[np.ndarray, float]:
        """d(A²/(BC))/dm per voxel (zero at ``outside`` voxels) and the mean LNCC."""
        mean_m, c = local_moments(m, self.size)
        c = floored(c)
        a = box_mean(self.f * m, self.size) - self.mean_f * mean_m
        inside = ~outside
        ratio = np.where(inside, a / (self.var_f * c), 0.0)
        force = 2.0 * ratio * ((self.f - self.mean_f) - (a / c) * (m - mean_m))
        return force, float(np.mean(ratio * a)) if inside.any() else np.nan


def _demons_level(
    f: np.ndarray,
    m: np.ndarray,
    u: np.ndarray,
    *,
    spacing: np.ndarray,
    voxels: np.ndarray,
    config: NonrigidConfig,
    iterations: int,
    offset: np.ndarray,
    force: str,
) -> tuple[np.ndarray, dict]:
    """``iterations`` demons updates of the field ``u`` registering ``m`` to ``f`` on one pyramid level.

    ``u`` is in mm along the grid's axes (components and axes in numpy order); ``spacing`` is the
    level's voxel size (mm, numpy order); ``m`` lies on a grid with the same spacing and axes,
    ``offset`` voxels (numpy order) from ``f``'s (the moving image is padded, so that the field can
    pull in what lies just beyond the target's field of view). Symmetric (ESM) forces: the step is
    (f − m∘φ) J / (|J|² + (f − m∘φ)² / K), with J the mean of both images' gradients; K, the
    smallest voxel size squared, bounds every step by half the smallest voxel (ITK's demons use the
    mean squared voxel size, whose steps fold thick-slice images). No force where φ leaves ``m``'s grid.
    ``diffeomorphic`` composes each step onto the field (φ ← φ ∘ (x + step)), ``symmetric`` adds it;
    the step is smoothed by ``update_sigma`` and the field by ``field_sigma``, both in mm at full
    resolution measured in units of ``voxels`` (mm per voxel, numpy order), so each keeps its width
    in voxels on every level. ``force`` ``lncc`` replaces the SSD step by the gradient of the local
    normalised cross-correlation (:class:`_BoxMeans`) times the warped image's gradient, smoothed, and
    scaled (:func:`_unit_step`) to a step size that a backtracking search sets: it starts at the SSD forces'
    bound of half the smallest voxel; an update (with the field smoothing after it) is kept only if it raises
    the mean LNCC, otherwise it is undone and the next is half as long; after a kept one the next may be
    ``LNCC_GROWTH`` times longer, up to the bound. The level has converged when the size falls below
    ``LNCC_CONVERGED`` of the bound (a fixed step size, as Greedy's, oscillates round the optimum and lets the
    field smoothing erode what it found). Each update costs one warp and one force, as an SSD update. The
    record's ``metric`` is the last update's mean squared difference (``ssd``; lower is better) or the kept
    field's mean LNCC (``lncc``; higher is better), ``iterations`` the updates made.
    """
    dim = f.ndim
    grid = np.indices(f.shape, dtype=f.dtype)
    scale = spacing.reshape((dim,) + (1,) * dim).astype(f.dtype)
    grad_f = np.stack(_derivatives(f, spacing))
    normalizer = float(np.min(spacing) ** 2)
    smooth_update = _smoother(config.update_sigma / voxels)
    smooth_field = _smoother(config.field_sigma / voxels)
    metric = np.nan
    lncc = force == "lncc"
    stop, made = "maximum iterations", iterations
    if lncc:
        window = _BoxMeans(f, config.ncc_radius)
        cap = 0.5 * float(np.min(spacing))  # the SSD forces' bound: half the smallest voxel
        size, metric, kept, direction = cap, -np.inf, u, None
    for iteration in range(iterations):
        warp = _Linear(grid + u / scale + offset.reshape(scale.shape).astype(f.dtype), m.shape)
        warped = warp(m)
        if lncc:
            slope, value = window.force(warped, warp.outside)
            if value > metric:  # the update helped (or is the level's start): keep it, go on from its force
                if direction is not None:
                    size = min(cap, LNCC_GROWTH * size)
                metric, kept = value, u
                direction = slope * np.stack(_derivatives(warped, spacing))
                direction = _unit_step(smooth_update(direction) if smooth_update else direction)
            else:  # undo it and try half the step from the kept field
                size *= 0.5
            if direction is None or size < LNCC_CONVERGED * cap:
                stop, made = "converged", iteration + 1
                break
            u, step = kept, direction * size
        else:
            diff = np.where(warp.outside, 0.0, f - warped)  # no force where the atlas was not sampled
            metric = float(np.mean(diff * diff))
            gradient = 0.5 * (grad_f + np.stack(_derivatives(warped, spacing)))
            denominator = (gradient * gradient).sum(axis=0) + diff * diff / normalizer
            step = np.divide(diff, denominator, out=np.zeros_like(diff), where=denominator > 1e-9) * gradient
            if smooth_update:
                step = smooth_update(step)
        if config.demons_variant == "diffeomorphic":
            u = step + _Linear(grid + step / scale, f.shape)(u)
        else:
            u = u + step
        if smooth_field:
            u = smooth_field(u)
    if lncc:
        u = kept  # the last update was not yet judged
    return u, {"force": force, "iterations": made, "metric": metric, "stop_condition": stop}


def demons_forces(config: NonrigidConfig, fixed: sitk.Image, shrinks: list) -> list[str]:
    """The demons force of each level (coarse to fine) of the pyramid with ``shrinks`` on ``fixed``: as configured,
    or for ``auto`` ``lncc`` on the coarse levels of a scan of a body region (:func:`~.geometry.body_scan`) and
    ``ssd`` elsewhere. Measured (benchmarks/pipeline.py, update_sigma 1.7), on the fixed ``[2, 1]`` pyramid:
    ``lncc`` at the coarse level gave CHAOS abdomens 0.862 mean Dice against 0.844 with ``ssd`` throughout (0.864
    with ``lncc`` throughout), cardiac stacks 0.842 against 0.843 (0.829 throughout); hippocampus crops lose 0.003
    with it at their coarse level, which is why crops keep ``ssd``. On the derived pyramid (the default): CHAOS
    0.901, cardiac 0.853, hippocampus 0.874 (its pyramid is ``[2, 1]`` either way)."""
    if config.demons_force != "auto":
        return per_level(config.demons_force, len(shrinks))
    body = body_scan(fixed)
    return ["lncc" if body and np.max(shrink) > 1 else "ssd" for shrink in shrinks]


def register_demons(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    initial: sitk.Transform,
    config: NonrigidConfig,
    seed: int = 0,
    masks: Masks | None = None,
) -> tuple[sitk.Transform, dict]:
    """Refine ``initial`` with a dense displacement field found by demons, coarse to fine.

    The moving image is first resampled through ``initial`` onto the fixed grid, padded by two
    voxels of the coarsest level; each level then runs diffeomorphic demons (or additive
    symmetric-forces demons) on the smoothed, shrunk pair, starting from the previous level's
    field (see :func:`_demons_level`; in numpy: ITK's demons filters took three to four times as
    long per update on 40³-voxel images). Demons compares intensities directly (``ssd``) or locally
    correlates them (``lncc``), each level's force chosen by :func:`demons_forces`: for same-contrast images
    only. It takes no masks and no seed (it uses every voxel); they are accepted for a
    common signature.

    Returns ``initial`` ∘ displacement field as a composite, and the per-level record.
    """
    dim = fixed.GetDimension()
    direction = np.asarray(fixed.GetDirection()).reshape(dim, dim)
    shrinks, sigmas, iterations = pyramid(config, fixed)
    forces = demons_forces(config, fixed, shrinks)
    pad = 2 * np.max([np.broadcast_to(shrink, (dim,)) for shrink in shrinks], axis=0)  # voxels per axis, x first
    padded = sitk.Image([int(n + 2 * p) for n, p in zip(fixed.GetSize(), pad)], sitk.sitkFloat32)
    padded.SetSpacing(fixed.GetSpacing())
    padded.SetDirection(fixed.GetDirection())
    padded.SetOrigin((np.asarray(fixed.GetOrigin()) - direction @ (pad * np.asarray(fixed.GetSpacing()))).tolist())
    moved = sitk.Resample(moving, padded, initial, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    reference = sitk.Cast(fixed, sitk.sitkFloat32)
    # Smoothing widths are mm along the finest axis, the same number of voxels along every axis (as ITK
    # and ANTs smooth fields, in voxels): 1 mm across 8 mm slices would let neighbouring slices move
    # apart freely, and such fields folded on cardiac data.
    voxels = np.full(dim, min(fixed.GetSpacing()))

    def start(shrink, sigma: float) -> tuple[np.ndarray, sitk.Image]:
        f = pyramid_image(reference, shrink, sigma)
        return np.zeros((dim,) + f.GetSize()[::-1], np.float32), f

    def upsample(state, level: int, shrink, sigma: float) -> tuple[np.ndarray, sitk.Image]:
        (field, grid), f = state, pyramid_image(reference, shrink, sigma)
        return _regrid(field, grid, f), f

    def solve(level: int, shrink, sigma: float, state) -> tuple[tuple[np.ndarray, sitk.Image], dict]:
        u, f = state  # the field (mm, numpy order) on the level's fixed image f
        m = pyramid_image(moved, shrink, sigma)
        shift = direction.T @ (np.asarray(f.GetOrigin()) - np.asarray(m.GetOrigin()))  # mm along the axes, x first
        offset = (shift / np.asarray(m.GetSpacing()))[::-1]
        u, info = _demons_level(
            sitk.GetArrayFromImage(f),
            sitk.GetArrayFromImage(m),
            u,
            spacing=np.asarray(f.GetSpacing())[::-1],
            voxels=voxels,
            config=config,
            iterations=iterations[level],
            offset=offset,
            force=forces[level],
        )
        return (u, f), info

    (u, last), levels = run_levels(shrinks, sigmas, start=start, upsample=upsample, solve=solve)
    same_grid = (
        last.GetSize() == fixed.GetSize()
        and last.GetOrigin() == fixed.GetOrigin()
        and last.GetSpacing() == fixed.GetSpacing()
    )
    local = (u if same_grid else _regrid(u, last, fixed))[::-1]  # x first, grid axes
    physical = np.einsum("ij,j...->...i", direction, local.astype(np.float64))
    field = sitk.GetImageFromArray(physical, isVector=True)
    field.CopyInformation(fixed)
    return sitk.CompositeTransform([initial, sitk.DisplacementFieldTransform(field)]), {"levels": levels}
