"""Non-rigid registration: a cubic B-spline free-form deformation, coarse to fine.

The deformation is optimised with vectorised numpy kernels rather than ITK's
metric framework, whose per-sample cost grows with the number of control points
(it fills a dense Jacobian for every sample): here the B-spline is a separable
tensor product, so evaluating the displacement on the whole grid and pulling the
metric gradient back onto the control points each cost O(voxels). The result is
an ordinary ``SimpleITK.BSplineTransform`` on ITK's own control grid, composed
with the initial (affine) transform, so it saves, loads and resamples as usual.
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, optimize
from threadpoolctl import threadpool_limits

from ..config import NonrigidConfig
from ..errors import RegistrationError
from .affine import linear_parts
from .common import Masks, pyramid, pyramid_image, run_levels, transform_is_finite
from .metrics import cubic_bspline, make_loss
from .transforms import displacement_field


def _meshes(fixed: sitk.Image, *, grid_spacing: float, levels: int) -> list[list[int]]:
    """Control-grid mesh sizes (cubic spans per axis), coarse to fine, ending near ``grid_spacing`` mm.

    Each level doubles the mesh of an axis (so the grids nest and refinement is exact)
    unless the spans would become shorter than two voxels of that axis: on thick-slice
    images the control points never outnumber the slices, which would let the
    deformation fold between them.
    """
    voxel = np.asarray(fixed.GetSpacing())
    extent = np.asarray(fixed.GetSize()) * voxel
    finest = np.maximum(1, np.floor(extent / (2.0 * voxel))).astype(int)  # spans of at least two voxels
    mesh = np.minimum(finest, np.maximum(1, np.round(extent / (grid_spacing * 2 ** (levels - 1))))).astype(int)
    meshes = [mesh.tolist()]
    for _ in range(levels - 1):
        mesh = np.where(2 * mesh <= finest, 2 * mesh, mesh)
        meshes.append(mesh.tolist())
    return meshes


def jacobian_determinant(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Jacobian determinant of ``transform`` sampled on ``reference``'s grid (float32).

    Central differences inside, one-sided at the borders (exact for an affine map
    everywhere). The displacement vectors are physical while differences run along the
    grid's axes: they are first expressed in the grid's axes (u' = Dᵀ u, for direction D),
    so det(I + Dᵀ (du/dx) D) = det(I + du/dx) on oblique and flipped grids alike.
    (ITK's DisplacementFieldJacobianDeterminant misses that rotation and pads the borders.)
    """
    dim = reference.GetDimension()
    direction = np.asarray(reference.GetDirection()).reshape(dim, dim)
    local = sitk.GetArrayFromImage(displacement_field(transform, reference)) @ direction  # (..., component)
    spacing = reference.GetSpacing()[::-1]  # numpy axis order
    jacobian = np.empty(local.shape + (dim,))
    for axis in range(dim):  # numpy axis `axis` is grid axis dim − 1 − axis
        jacobian[..., dim - 1 - axis] = np.gradient(local, spacing[axis], axis=axis, edge_order=1)
    jacobian += np.eye(dim)
    out = sitk.GetImageFromArray(_determinant(jacobian).astype(np.float32))
    out.CopyInformation(reference)
    return out


def _determinant(m: np.ndarray) -> np.ndarray:
    """Determinants of a stack of 2×2 or 3×3 matrices (last two axes), written out: many times
    faster than ``np.linalg.det``, which factorises each small matrix on its own."""
    if m.shape[-1] == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


@dataclass(frozen=True)
class _ControlGrid:
    """A B-spline control grid (ITK's fixed-parameter layout) over the fixed image's domain."""

    size: tuple[int, ...]  # control points per axis, x first
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray

    @classmethod
    def over(cls, fixed: sitk.Image, mesh: list[int]) -> "_ControlGrid":
        """Grid of ``mesh`` cubic spans per axis over the image's voxel extent, aligned with its axes.

        Like ITK's own initialiser, the first control point lies one span before the
        domain; unlike it, the grid keeps the image's direction (ITK's initialiser
        takes an axis-aligned box), so the spline stays separable in index space.
        """
        dim = fixed.GetDimension()
        direction = np.asarray(fixed.GetDirection()).reshape(dim, dim)
        voxel = np.asarray(fixed.GetSpacing())
        spacing = np.asarray(fixed.GetSize()) * voxel / np.asarray(mesh, float)
        origin = np.asarray(fixed.GetOrigin()) + direction @ (-voxel / 2.0 - spacing)
        return cls(tuple(int(m) + 3 for m in mesh), origin, spacing, direction)

    def weights(self, image: sitk.Image) -> list[np.ndarray]:
        """Per axis (x first): matrix (voxels × control points) of B-spline weights at ``image``'s voxels.

        The image must share the grid's direction, which makes the spline separable in index space.
        """
        offset = self.direction.T @ (np.asarray(image.GetOrigin()) - self.origin)
        out = []
        for axis, (n, step) in enumerate(zip(image.GetSize(), image.GetSpacing())):
            t = (offset[axis] + np.arange(n) * step) / self.spacing[axis]
            out.append(cubic_bspline(t[:, None] - np.arange(self.size[axis])[None, :]))
        return out

    def transform(self, coefficients: np.ndarray) -> sitk.BSplineTransform:
        """A SimpleITK B-spline transform with these coefficients (shape: components, then numpy axes)."""
        dim = len(self.size)
        bspline = sitk.BSplineTransform(dim, 3)
        bspline.SetFixedParameters(
            [*self.size, *self.origin.tolist(), *self.spacing.tolist(), *self.direction.ravel().tolist()]
        )
        bspline.SetParameters(coefficients.ravel().tolist())
        return bspline


def _tensor(coefficients: np.ndarray, weights: list[np.ndarray], *, adjoint: bool = False) -> np.ndarray:
    """Apply the separable spline (control points → voxels), or its adjoint (voxels → control points).

    ``coefficients`` has shape (components, *numpy-order axes); ``weights`` is x-first.
    """
    dim = len(weights)
    grid = string.ascii_lowercase[:dim]
    vox = string.ascii_lowercase[dim : 2 * dim]
    mats = weights[::-1]  # numpy order
    terms = [f"{v}{g}" for v, g in zip(vox, grid)]
    src, dst = (vox, grid) if adjoint else (grid, vox)
    return np.einsum(f"C{src}," + ",".join(terms) + f"->C{dst}", coefficients, *mats, optimize=True)


def _index_map(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with continuous index (x first) = A @ physical point + b."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    inv = np.diag(1.0 / np.asarray(image.GetSpacing())) @ direction.T
    return inv, -inv @ np.asarray(image.GetOrigin())


def _physical_points(image: sitk.Image) -> np.ndarray:
    """Physical coordinates (components first, then numpy-order axes) of every voxel."""
    dim = image.GetDimension()
    index = np.indices(image.GetSize()[::-1], dtype=np.float64)[::-1]  # x first
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    scaled = index * np.asarray(image.GetSpacing()).reshape((dim,) + (1,) * dim)
    return np.einsum("ij,j...->i...", direction, scaled) + np.asarray(image.GetOrigin()).reshape((dim,) + (1,) * dim)


class _Level:
    """Metric value and gradient with respect to the control points, on one pyramid level."""

    def __init__(self, fixed, moving, initial, grid: _ControlGrid, *, shrink, sigma, config: NonrigidConfig, seed,
                 masks: Masks | None):
        self.grid_spacing = grid.spacing
        self.weight = config.regularization
        level = pyramid_image(fixed, shrink, sigma)
        self.shape = sitk.GetArrayViewFromImage(level).shape
        self.weights = grid.weights(level)
        dim = fixed.GetDimension()
        f = sitk.GetArrayFromImage(level).astype(np.float64).ravel()
        candidates = np.arange(f.size)
        self.fixed_mask = None
        if masks is not None and masks.fixed is not None:
            inside = sitk.Resample(masks.fixed, level, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            self.fixed_mask = sitk.GetArrayFromImage(inside).ravel() > 0
        dense = config.metric == "ants_ncc"  # a windowed metric needs every voxel; the mask only gates them
        if self.fixed_mask is not None and not dense:
            candidates = np.flatnonzero(self.fixed_mask)
            self.fixed_mask = None
        sampling = 1.0 if dense else config.sampling_percentage
        if sampling < 1:
            count = max(1, int(round(candidates.size * sampling)))
            candidates = np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))
        self.samples = None if candidates.size == f.size else candidates
        self.f = f if self.samples is None else f[self.samples]
        points = _physical_points(level).reshape(dim, -1)
        self.points = points if self.samples is None else points[:, self.samples]
        matrix, offset = linear_parts(initial)
        index_matrix, index_offset = _index_map(moving)
        # moving continuous index (x first) of x + u: K (x + u) + k, with K = index_matrix @ matrix
        self.K = index_matrix @ matrix
        self.k = index_matrix @ offset + index_offset
        m = pyramid_image(moving, 1, sigma)
        self.moving = sitk.GetArrayFromImage(m).astype(np.float64)
        self.moving_mask = None
        if masks is not None and masks.moving is not None:
            self.moving_mask = sitk.GetArrayFromImage(masks.moving).astype(np.float64)
        # gradient in index space, x first, then chained to displacement space: dm/du = K^T ∇_index m
        self.gradient = [g for g in np.gradient(self.moving)[::-1]]
        self.upper = np.asarray(m.GetSize(), float) - 1.0
        self.loss = make_loss(config.metric, self.f, self.moving, self.shape, ncc_radius=config.ncc_radius)

    def displacement(self, coefficients: np.ndarray) -> np.ndarray:
        u = _tensor(coefficients, self.weights).reshape(len(self.weights), -1)
        return u if self.samples is None else u[:, self.samples]

    def __call__(self, params: np.ndarray, coefficient_shape) -> tuple[float, np.ndarray]:
        coefficients = params.reshape(coefficient_shape)
        u = self.displacement(coefficients)
        index = self.K @ (self.points + u) + self.k[:, None]
        valid = np.all((index >= 0) & (index <= self.upper[:, None]), axis=0)
        if self.fixed_mask is not None:
            valid &= self.fixed_mask
        coords = index[::-1]  # numpy order for map_coordinates
        if self.moving_mask is not None:
            valid &= ndimage.map_coordinates(self.moving_mask, coords, order=0, mode="constant") > 0
        g = ndimage.map_coordinates(self.moving, coords, order=1, mode="nearest")
        loss, dg = self.loss(self.f, g, valid)
        grads = np.stack([ndimage.map_coordinates(gr, coords, order=1, mode="nearest") for gr in self.gradient])
        force = (self.K.T @ grads) * dg  # dL/du per sample, physical components
        full = np.zeros((len(self.weights), int(np.prod(self.shape))))
        if self.samples is None:
            full[:] = force
        else:
            full[:, self.samples] = force
        grad = _tensor(full.reshape((len(self.weights),) + self.shape), self.weights, adjoint=True)
        if self.weight:
            energy, energy_grad = _membrane_energy(coefficients, self.grid_spacing)
            loss += self.weight * energy
            grad += self.weight * energy_grad
        return loss, grad.ravel()


def _membrane_energy(coefficients: np.ndarray, spacing: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared finite-difference strain of the control points, and its gradient.

    Sum over axes of ((c[i+1] − c[i]) / control spacing)², averaged over control
    points: dimensionless, so one weight suits any grid spacing.
    """
    energy = 0.0
    grad = np.zeros_like(coefficients)
    n = coefficients[0].size
    for axis, step in enumerate(spacing):
        numpy_axis = coefficients.ndim - 1 - axis
        diff = np.diff(coefficients, axis=numpy_axis) / step
        energy += float((diff * diff).sum()) / n
        d = 2.0 * diff / (step * n)
        pad_before = [(0, 0)] * coefficients.ndim
        pad_after = [(0, 0)] * coefficients.ndim
        pad_before[numpy_axis] = (1, 0)
        pad_after[numpy_axis] = (0, 1)
        grad += np.pad(d, pad_before) - np.pad(d, pad_after)
    return energy, grad


def _refine(coefficients: np.ndarray, coarse: _ControlGrid, fine: _ControlGrid, reference: sitk.Image) -> np.ndarray:
    """Coefficients on ``fine`` giving the same displacement as ``coefficients`` on ``coarse``.

    ITK's grids for mesh m and 2m (or m again) over one domain are nested, so the coarse
    spline is exactly a fine spline; the per-axis least-squares fit on the voxel positions finds it.
    """
    out = coefficients
    for axis, (wc, wf) in enumerate(zip(coarse.weights(reference), fine.weights(reference))):
        refine, *_ = np.linalg.lstsq(wf, wc, rcond=None)  # fine × coarse
        numpy_axis = coefficients.ndim - 1 - axis
        out = np.moveaxis(np.tensordot(refine, out, axes=([1], [numpy_axis])), 0, numpy_axis)
    return out


def register_bspline(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    initial: sitk.Transform,
    config: NonrigidConfig,
    seed: int,
    masks: Masks | None = None,
) -> tuple[sitk.Transform, dict]:
    """Refine the linear transform ``initial`` with a B-spline deformation, coarse to fine.

    Each pyramid level smooths both images (``smoothing_sigmas``, mm), shrinks the
    fixed one (``shrink_factors``) and optimises the control points with L-BFGS-B;
    the control grid is refined by 2 between levels (exactly: the coarse spline is
    carried over), ending at about ``grid_spacing`` mm.

    Returns
    -------
    transform : SimpleITK.CompositeTransform
        ``initial`` ∘ B-spline: maps fixed-space points (mm) to moving-space points.
    record : dict
        Per-level iterations, times and stop conditions (metric before/after and the
        Jacobian are added by the caller, for every non-rigid method alike).
    """
    dim = fixed.GetDimension()
    shrinks, sigmas, iterations = pyramid(config, fixed)
    meshes = _meshes(fixed, grid_spacing=config.grid_spacing, levels=len(shrinks))
    state = {"grid": _ControlGrid.over(fixed, meshes[0])}
    state["coefficients"] = np.zeros((dim,) + state["grid"].size[::-1])

    def solve(level: int, shrink, sigma: float) -> dict:
        grid, coefficients = state["grid"], state["coefficients"]
        if level:
            finer = _ControlGrid.over(fixed, meshes[level])
            coefficients = _refine(coefficients, grid, finer, fixed)
            grid = state["grid"] = finer
        objective = _Level(fixed, moving, initial, grid, shrink=shrink, sigma=sigma, config=config,
                           seed=seed + level, masks=masks)
        result = optimize.minimize(
            objective, coefficients.ravel(), args=(coefficients.shape,), jac=True, method="L-BFGS-B",
            options={"maxiter": iterations[level], "maxcor": 7, "gtol": 1e-12, "ftol": 1e-7},
        )
        state["coefficients"] = result.x.reshape(coefficients.shape)
        return {"mesh_size": [s - 3 for s in grid.size], "iterations": int(result.nit),
                "evaluations": int(result.nfev), "metric": float(result.fun), "stop_condition": str(result.message)}

    levels = run_levels(shrinks, sigmas, solve)
    bspline = state["grid"].transform(state["coefficients"])
    return sitk.CompositeTransform([initial, bspline]), {"levels": levels}  # B-spline first, then initial


class _Linear:
    """Linear interpolation at continuous indices ``coords`` (numpy order, shape (dim, ...)) of any
    array on a grid of ``shape``, clamped to the grid (nearest-neighbour extrapolation).

    The lower corner and the weights are found once; calling it interpolates an array, or each
    component of a field (components first). ``outside`` marks the points beyond the grid's voxel
    centres. Each neighbour is read through a shifted view of the array, so no index array per
    corner is made (memory: about 4 bytes per point per dimension, plus 8 for the index).
    """

    def __init__(self, coords: np.ndarray, shape: tuple[int, ...]):
        self.strides = [int(np.prod(shape[axis + 1:])) if n > 1 else 0 for axis, n in enumerate(shape)]
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
    axes = [(np.arange(n) * scale[dim - 1 - a] + shift[dim - 1 - a] / source.GetSpacing()[dim - 1 - a])
            for a, n in enumerate(shape)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).astype(field.dtype)
    return _Linear(coords, field.shape[1:])(field)


def _derivatives(array: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """Central differences (one-sided at the borders) of ``array`` along its last ``len(spacing)`` axes,
    in units of ``spacing``; zero along a one-voxel axis."""
    lead = array.ndim - len(spacing)
    return [np.gradient(array, float(step), axis=lead + axis) if array.shape[lead + axis] > 1 else np.zeros_like(array)
            for axis, step in enumerate(spacing)]


def _smoother(sigma: np.ndarray):
    """Gaussian smoothing of a field (components first) by ``sigma`` voxels per axis; None: no smoothing."""
    if not np.any(sigma > 0):
        return None
    return lambda field: ndimage.gaussian_filter(field, [0.0, *sigma], mode="nearest", truncate=3.0)


LNCC_STEP_QUANTILE = 0.95


def _scale_step(step: np.ndarray, cap: float) -> np.ndarray:
    """An LNCC update (components first) scaled so that its ``LNCC_STEP_QUANTILE`` quantile of step
    lengths is ``cap``, longer steps cut to ``cap``. (Scaling the longest step to ``cap``, as Greedy
    does, left most of the field nearly still: 0.03 to 0.09 lower Dice on cardiac pairs.)"""
    norm = np.sqrt((step * step).sum(axis=0))
    typical = float(np.quantile(norm, LNCC_STEP_QUANTILE))
    if typical <= 0:
        typical = float(norm.max())
        if typical <= 0:
            return step
    scaled = norm * (cap / typical)
    return step * ((cap / typical) * np.minimum(1.0, cap / np.maximum(scaled, 1e-30)))


class _BoxMeans:
    """Local normalised cross-correlation (LNCC) of a fixed image ``f`` with warped moving images, in a
    box of ``radius`` voxels along every axis, and its derivative with respect to the moving intensities.

    With box means ⟨·⟩, A = ⟨f m⟩ − ⟨f⟩⟨m⟩, B = ⟨f f⟩ − ⟨f⟩², C = ⟨m m⟩ − ⟨m⟩², the metric is
    A² / (B C) per voxel; its derivative with respect to m at a voxel is taken, as ANTs and Greedy take
    it (Avants et al. 2008), as 2A / (B C) · ((f − ⟨f⟩) − A / C (m − ⟨m⟩)). Where B C is negligible
    (flat windows; below 1e-6 of the product of the images' global variances) there is no force.
    """

    def __init__(self, f: np.ndarray, radius: int):
        self.size = 2 * radius + 1
        self.f = f
        self.mean_f = self._mean(f)
        self.var_f = np.maximum(self._mean(f * f) - self.mean_f * self.mean_f, 0.0)
        self.global_var_f = float(f.var())

    def _mean(self, x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=self.size, mode="nearest")

    def force(self, m: np.ndarray, outside: np.ndarray) -> tuple[np.ndarray, float]:
        """d(A²/(BC))/dm per voxel (zero at ``outside`` voxels) and the mean LNCC."""
        mean_m = self._mean(m)
        a = self._mean(self.f * m) - self.mean_f * mean_m
        c = np.maximum(self._mean(m * m) - mean_m * mean_m, 0.0)
        bc = self.var_f * c
        valid = (bc > 1e-6 * self.global_var_f * float(m.var()) + 1e-30) & ~outside
        ratio = np.divide(a, bc, out=np.zeros_like(a), where=valid)
        over_c = np.divide(a, c, out=np.zeros_like(a), where=valid)
        force = 2.0 * ratio * ((self.f - self.mean_f) - over_c * (m - mean_m))
        return force, float(np.mean(ratio * a)) if valid.any() else np.nan


def _demons_level(f: np.ndarray, m: np.ndarray, u: np.ndarray, *, spacing: np.ndarray, voxels: np.ndarray,
                  config: NonrigidConfig, iterations: int, offset: np.ndarray) -> tuple[np.ndarray, dict]:
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
    in voxels on every level. ``demons_force: lncc`` replaces the SSD step by the gradient of the local
    normalised cross-correlation (:class:`_BoxMeans`) times the warped image's gradient, smoothed, then
    scaled by :func:`_scale_step` to the same bound of half the smallest voxel. The record's ``metric`` is
    the last update's mean squared difference (``ssd``; lower is better) or mean LNCC (``lncc``; higher is better).
    """
    dim = f.ndim
    grid = np.indices(f.shape, dtype=f.dtype)
    scale = spacing.reshape((dim,) + (1,) * dim).astype(f.dtype)
    grad_f = np.stack(_derivatives(f, spacing))
    normalizer = float(np.min(spacing) ** 2)
    smooth_update = _smoother(config.update_sigma / voxels)
    smooth_field = _smoother(config.field_sigma / voxels)
    metric = np.nan
    lncc = config.demons_force == "lncc"
    if lncc:
        window = _BoxMeans(f, config.ncc_radius)
        cap = 0.5 * float(np.min(spacing))  # the SSD forces' bound: half the smallest voxel
    for _ in range(iterations):
        warp = _Linear(grid + u / scale + offset.reshape(scale.shape).astype(f.dtype), m.shape)
        warped = warp(m)
        if lncc:
            force, metric = window.force(warped, warp.outside)
            step = force * np.stack(_derivatives(warped, spacing))
            if smooth_update:
                step = smooth_update(step)
            step = _scale_step(step, cap)
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
    return u, {"iterations": iterations, "metric": metric, "stop_condition": "maximum iterations"}


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
    long per update on 40³-voxel images). Demons compares intensities directly (``demons_force: ssd``)
    or locally correlates them (``lncc``): for same-contrast images only. It takes no masks and no seed (it uses every voxel); they are accepted for a
    common signature.

    Returns ``initial`` ∘ displacement field as a composite, and the per-level record.
    """
    dim = fixed.GetDimension()
    direction = np.asarray(fixed.GetDirection()).reshape(dim, dim)
    shrinks, sigmas, iterations = pyramid(config, fixed)
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
    state: dict = {"field": None, "grid": None}

    def solve(level: int, shrink, sigma: float) -> dict:
        f, m = pyramid_image(reference, shrink, sigma), pyramid_image(moved, shrink, sigma)
        f_array = sitk.GetArrayFromImage(f)
        if state["field"] is None:
            u = np.zeros((dim,) + f_array.shape, np.float32)
        else:
            u = _regrid(state["field"], state["grid"], f)
        shift = direction.T @ (np.asarray(f.GetOrigin()) - np.asarray(m.GetOrigin()))  # mm along the axes, x first
        offset = (shift / np.asarray(m.GetSpacing()))[::-1]
        state["field"], info = _demons_level(
            f_array, sitk.GetArrayFromImage(m), u, spacing=np.asarray(f.GetSpacing())[::-1], voxels=voxels,
            config=config, iterations=iterations[level], offset=offset,
        )
        state["grid"] = f
        return info

    levels = run_levels(shrinks, sigmas, solve)
    last = state["grid"]
    same_grid = last.GetSize() == fixed.GetSize() and last.GetOrigin() == fixed.GetOrigin() \
        and last.GetSpacing() == fixed.GetSpacing()
    local = (state["field"] if same_grid else _regrid(state["field"], last, fixed))[::-1]  # x first, grid axes
    physical = np.einsum("ij,j...->...i", direction, local.astype(np.float64))
    field = sitk.GetImageFromArray(physical, isVector=True)
    field.CopyInformation(fixed)
    return sitk.CompositeTransform([initial, sitk.DisplacementFieldTransform(field)]), {"levels": levels}


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
