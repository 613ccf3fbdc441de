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

import dataclasses
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
from .common import Masks, pyramid_image, run_levels, transform_is_finite
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
    out = sitk.GetImageFromArray(np.linalg.det(jacobian).astype(np.float32))
    out.CopyInformation(reference)
    return out


def _cubic_bspline(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, 2.0 / 3.0 - x**2 + 0.5 * x**3, np.where(x < 2, (2.0 - x) ** 3 / 6.0, 0.0))


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
            out.append(_cubic_bspline(t[:, None] - np.arange(self.size[axis])[None, :]))
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
        self.loss = make_loss(config, self.f, self.moving, self.shape)

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


# --------------------------------------------------------------------------- metrics
# Each loss takes the fixed samples f, the warped moving samples g and the mask of
# valid samples, and returns (loss, dloss/dg); lower is better.

def _ncc_loss(f: np.ndarray, g: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
    """1 − NCC over valid samples, and its derivative with respect to each g."""
    fv, gv = f[valid], g[valid]
    dg = np.zeros_like(g)
    if fv.size == 0:
        return 1.0, dg
    ft, gt = fv - fv.mean(), gv - gv.mean()
    nf, ng = np.sqrt((ft * ft).sum()), np.sqrt((gt * gt).sum())
    if nf == 0 or ng == 0:
        return 1.0, dg
    ncc = (ft * gt).sum() / (nf * ng)
    dg[valid] = -(ft / (nf * ng) - ncc * gt / (ng * ng))
    return float(1.0 - ncc), dg


def _mse_loss(f: np.ndarray, g: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared difference over valid samples, and its derivative with respect to each g."""
    n = max(1, int(valid.sum()))
    diff = np.where(valid, g - f, 0.0)
    return float((diff * diff).sum() / n), 2.0 * diff / n


def _bspline_derivative(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a < 1, -2.0 * x + 1.5 * x * a, np.where(a < 2, -0.5 * (2.0 - a) ** 2 * np.sign(x), 0.0))


class _MattesLoss:
    """−Mattes mutual information (Mattes et al. 2003): fixed intensities in zero-order
    bins, moving intensities in cubic B-spline Parzen windows, so the joint histogram,
    and hence the metric, is differentiable in the moving intensities."""

    bins = 64  # fewer bins (32, 16) left most of a known deformation in place in our tests
    pad = 2  # bins kept free at each end for the cubic window

    def __init__(self, f: np.ndarray, moving: np.ndarray):
        self.f_min, f_span = float(f.min()), float(np.ptp(f)) or 1.0
        self.f_width = f_span / self.bins
        self.m_min, m_span = float(moving.min()), float(np.ptp(moving)) or 1.0
        self.m_width = m_span / (self.bins - 2 * self.pad - 1)

    def __call__(self, f: np.ndarray, g: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
        dg = np.zeros_like(g)
        n = int(valid.sum())
        if n == 0:
            return 0.0, dg
        nb = self.bins
        fi = np.clip(((f[valid] - self.f_min) / self.f_width).astype(int), 0, nb - 1)
        t = np.clip((g[valid] - self.m_min) / self.m_width, 0, nb - 2 * self.pad - 1) + self.pad
        j = np.floor(t).astype(int)[:, None] + np.arange(-1, 3)[None, :]  # the 4 bins a cubic window touches
        offset = j - t[:, None]
        joint = np.bincount((fi[:, None] * nb + j).ravel(), weights=_cubic_bspline(offset).ravel(), minlength=nb * nb)
        joint = joint.reshape(nb, nb) / n
        pf, pm = joint.sum(axis=1), joint.sum(axis=0)
        nz = joint > 0
        mi = float((joint[nz] * np.log(joint[nz] / np.outer(pf, pm)[nz])).sum())
        ratio = np.log(np.maximum(joint, 1e-300) / np.maximum(pm, 1e-300)[None, :])
        # dMI/dg = (1/n) Σ_j log(p(i,j)/p_m(j)) dβ(j − t)/dg, with dβ(j − t)/dt = −β'(j − t) and dt/dg = 1/width
        dmi = -(ratio[fi[:, None], j] * _bspline_derivative(offset)).sum(axis=1) / (n * self.m_width)
        dg[valid] = -dmi
        return -mi, dg


class _LocalNCCLoss:
    """−mean over voxels of the squared local correlation in a (2r+1)^d window: ANTs'
    neighbourhood cross-correlation, with its exact gradient (box filters are self-adjoint)."""

    def __init__(self, shape: tuple[int, ...], radius: int):
        self.shape = shape
        self.size = 2 * radius + 1

    def _box(self, x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=self.size, mode="constant")

    def __call__(self, f: np.ndarray, g: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
        v = valid.reshape(self.shape)
        fv, gv = f.reshape(self.shape) * v, g.reshape(self.shape) * v
        box = self._box
        mf, mg = box(fv), box(gv)
        a = box(fv * gv) - mf * mg
        b = box(fv * fv) - mf * mf + 1e-5
        c = box(gv * gv) - mg * mg + 1e-5
        cc = a * a / (b * c)
        count = cc.size
        da = 2.0 * a / (b * c)
        dc = -cc / c
        grad = fv * box(da) - box(da * mf) + 2.0 * gv * box(dc) - 2.0 * box(dc * mg)
        return -float(cc.mean()), (-grad * v / count).ravel()


_METRICS = {"ncc": _ncc_loss, "mse": _mse_loss}


def make_loss(config: NonrigidConfig, f: np.ndarray, moving: np.ndarray, shape: tuple[int, ...]):
    """The configured metric for fixed samples ``f`` (every voxel of a grid of ``shape`` for ``ants_ncc``)."""
    if config.metric == "mattes":
        return _MattesLoss(f, moving)
    if config.metric == "ants_ncc":
        return _LocalNCCLoss(shape, config.ncc_radius)
    return _METRICS[config.metric]


def stage_metric(fixed, moving, transform, *, config: NonrigidConfig, masks: Masks | None = None) -> float:
    """The stage's metric of ``moving`` through ``transform`` against ``fixed`` on the full fixed grid."""
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, np.nan, sitk.sitkFloat64))
    f = sitk.GetArrayFromImage(fixed).astype(np.float64)
    valid = np.isfinite(warped)
    if masks is not None and masks.fixed is not None:
        valid &= sitk.GetArrayViewFromImage(masks.fixed) > 0
    if masks is not None and masks.moving is not None:
        inside = sitk.Resample(masks.moving, fixed, transform, sitk.sitkNearestNeighbor, 0)
        valid &= sitk.GetArrayViewFromImage(inside) > 0
    if not valid.any():
        return np.nan
    loss = make_loss(config, f.ravel(), sitk.GetArrayViewFromImage(moving), f.shape)
    return loss(f.ravel(), np.where(valid, warped, 0.0).ravel(), valid.ravel())[0]


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
    meshes = _meshes(fixed, grid_spacing=config.grid_spacing, levels=len(config.shrink_factors))
    state = {"grid": _ControlGrid.over(fixed, meshes[0])}
    state["coefficients"] = np.zeros((dim,) + state["grid"].size[::-1])

    def solve(level: int, shrink: int, sigma: float) -> dict:
        grid, coefficients = state["grid"], state["coefficients"]
        if level:
            finer = _ControlGrid.over(fixed, meshes[level])
            coefficients = _refine(coefficients, grid, finer, fixed)
            grid = state["grid"] = finer
        objective = _Level(fixed, moving, initial, grid, shrink=shrink, sigma=sigma, config=config,
                           seed=seed + level, masks=masks)
        result = optimize.minimize(
            objective, coefficients.ravel(), args=(coefficients.shape,), jac=True, method="L-BFGS-B",
            options={"maxiter": config.iterations, "maxcor": 7, "gtol": 1e-12, "ftol": 1e-7},
        )
        state["coefficients"] = result.x.reshape(coefficients.shape)
        return {"mesh_size": [s - 3 for s in grid.size], "iterations": int(result.nit),
                "evaluations": int(result.nfev), "metric": float(result.fun), "stop_condition": str(result.message)}

    levels = run_levels(config.shrink_factors, config.smoothing_sigmas, solve)
    bspline = state["grid"].transform(state["coefficients"])
    return sitk.CompositeTransform([initial, bspline]), {"levels": levels}  # B-spline first, then initial


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

    The moving image is first resampled through ``initial`` onto the fixed grid; each
    level then runs diffeomorphic demons (or fast symmetric forces) on the smoothed,
    shrunk pair, starting from the previous level's field. The field is smoothed by
    ``field_sigma`` mm after every update (and each update by ``update_sigma`` mm).
    Demons compares intensities directly: for same-contrast images only. It takes no
    masks and no seed (it samples every voxel); they are accepted for a common signature.

    Returns ``initial`` ∘ displacement field as a composite, and the per-level record.
    """
    moved = sitk.Resample(moving, fixed, initial, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    reference = sitk.Cast(fixed, sitk.sitkFloat32)
    state: dict = {"field": None}

    def solve(level: int, shrink: int, sigma: float) -> dict:
        f, m = pyramid_image(reference, shrink, sigma), pyramid_image(moved, shrink, sigma)
        if state["field"] is None:
            start = sitk.Image(f.GetSize(), sitk.sitkVectorFloat64, f.GetDimension())
            start.CopyInformation(f)
        else:
            start = sitk.Resample(state["field"], f, sitk.Transform(), sitk.sitkLinear, 0.0)
        if config.demons_variant == "diffeomorphic":
            demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        else:
            demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        voxel = np.asarray(f.GetSpacing())  # ITK takes these sigmas in voxels, per axis
        demons.SetNumberOfIterations(config.iterations)
        demons.SetUseImageSpacing(True)
        demons.SetSmoothDisplacementField(config.field_sigma > 0)
        demons.SetStandardDeviations(np.maximum(config.field_sigma / voxel, 1e-3).tolist())
        demons.SetSmoothUpdateField(config.update_sigma > 0)
        demons.SetUpdateFieldStandardDeviations(np.maximum(config.update_sigma / voxel, 1e-3).tolist())
        state["field"] = demons.Execute(f, m, start)
        iterations = int(demons.GetElapsedIterations())
        return {"iterations": iterations, "metric": float(demons.GetMetric()),
                "stop_condition": "maximum iterations" if iterations >= config.iterations else "converged"}

    levels = run_levels(config.shrink_factors, config.smoothing_sigmas, solve)
    field = sitk.Resample(state["field"], fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
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
    """Run the configured non-rigid method from ``initial``; the record holds, for every method,
    the stage metric before and after (full resolution) and the per-level record."""
    start = time.perf_counter()
    # The numpy kernels multiply small matrices many times: BLAS threads only add overhead
    # (5x slower on 2 busy cores); the parallelism is across atlases.
    with threadpool_limits(limits=1, user_api="blas"):
        transform, record = NONRIGID_METHODS[config.method](
            fixed, moving, initial=initial, config=config, seed=seed, masks=masks
        )
    if not transform_is_finite(transform):
        raise RegistrationError("non-rigid registration diverged: non-finite transform parameters")
    metric = config.metric if config.method == "bspline" else "mse"
    scoring = dataclasses.replace(config, metric=metric)
    record = {
        "method": config.method,
        "metric": metric,
        "metric_before": stage_metric(fixed, moving, initial, config=scoring, masks=masks),
        "metric_after": stage_metric(fixed, moving, transform, config=scoring, masks=masks),
        **record,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return transform, record
