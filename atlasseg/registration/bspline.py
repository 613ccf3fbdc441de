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
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, optimize

from ..config import NonrigidConfig
from .affine import linear_parts
from .itk import Masks
from .metrics import cubic_bspline, make_loss
from .pyramid import pyramid, pyramid_image, run_levels


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

    def __init__(
        self,
        fixed,
        moving,
        initial,
        grid: _ControlGrid,
        *,
        shrink,
        sigma,
        config: NonrigidConfig,
        seed,
        masks: Masks | None,
    ):
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

    def start(shrink, sigma: float) -> tuple[_ControlGrid, np.ndarray]:
        grid = _ControlGrid.over(fixed, meshes[0])
        return grid, np.zeros((dim,) + grid.size[::-1])

    def upsample(state, level: int, shrink, sigma: float) -> tuple[_ControlGrid, np.ndarray]:
        (grid, coefficients), finer = state, _ControlGrid.over(fixed, meshes[level])
        return finer, _refine(coefficients, grid, finer, fixed)

    def solve(level: int, shrink, sigma: float, state) -> tuple[tuple[_ControlGrid, np.ndarray], dict]:
        grid, coefficients = state
        objective = _Level(
            fixed, moving, initial, grid, shrink=shrink, sigma=sigma, config=config, seed=seed + level, masks=masks
        )
        result = optimize.minimize(
            objective,
            coefficients.ravel(),
            args=(coefficients.shape,),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": iterations[level], "maxcor": 7, "gtol": 1e-12, "ftol": 1e-7},
        )
        return (grid, result.x.reshape(coefficients.shape)), {
            "mesh_size": [s - 3 for s in grid.size],
            "iterations": int(result.nit),
            "evaluations": int(result.nfev),
            "metric": float(result.fun),
            "stop_condition": str(result.message),
        }

    (grid, coefficients), levels = run_levels(shrinks, sigmas, start=start, upsample=upsample, solve=solve)
    bspline = grid.transform(coefficients)
    return sitk.CompositeTransform([initial, bspline]), {"levels": levels}  # B-spline first, then initial
