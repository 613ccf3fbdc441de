"""Image similarity metrics in numpy, each with its derivative with respect to the moving intensities.

They serve the B-spline stage's optimiser and every stage's before/after check (the affine
optimiser uses ITK's own). Each loss takes the fixed samples f, the warped moving samples g
and the mask of valid samples, and returns (loss, dloss/dg); lower is better.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..similarity import VARIANCE_FLOOR, box_mean, floored, local_moments, ncc_gradient
from .itk import Masks


def cubic_bspline(x: np.ndarray) -> np.ndarray:
    """The cubic B-spline kernel (support [−2, 2])."""
    x = np.abs(x)
    return np.where(x < 1, 2.0 / 3.0 - x**2 + 0.5 * x**3, np.where(x < 2, (2.0 - x) ** 3 / 6.0, 0.0))


def _ncc_loss(f: np.ndarray, g: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
    """1 − NCC over valid samples (1 when there are none, or either is constant), and its derivative with
    respect to each g."""
    dg = np.zeros_like(g)
    if not valid.any():
        return 1.0, dg
    ncc, gradient = ncc_gradient(f[valid], g[valid])
    dg[valid] = -gradient
    return float(1.0 - ncc), dg


def _mse_loss(f: np.ndarray, g: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared difference over valid samples, and its derivative with respect to each g."""
    n = max(1, int(valid.sum()))
    diff = np.where(valid, g - f, 0.0)
    return float((diff * diff).sum() / n), 2.0 * diff / n


def _bspline_derivative(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a < 1, -2.0 * x + 1.5 * x * a, np.where(a < 2, -0.5 * (2.0 - a) ** 2 * np.sign(x), 0.0))


class _NMSELoss:
    """Mean squared difference after each image is standardised to zero mean and unit variance over its
    whole domain (the fixed samples ``f``, the whole ``moving`` image), as the affine stage's ``nmse`` does."""

    def __init__(self, f: np.ndarray, moving: np.ndarray):
        self.f_mean, self.f_std = float(f.mean()), float(f.std()) or 1.0
        self.m_mean, self.m_std = float(np.mean(moving)), float(np.std(moving)) or 1.0

    def __call__(self, f: np.ndarray, g: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
        n = max(1, int(valid.sum()))
        diff = np.where(valid, (g - self.m_mean) / self.m_std - (f - self.f_mean) / self.f_std, 0.0)
        return float((diff * diff).sum() / n), 2.0 * diff / (n * self.m_std)


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
        joint = np.bincount((fi[:, None] * nb + j).ravel(), weights=cubic_bspline(offset).ravel(), minlength=nb * nb)
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
    neighbourhood cross-correlation, with its exact gradient (box filters are self-adjoint).
    Windows read zeros beyond the grid and at invalid samples; local variances are floored
    (:func:`~atlasseg.similarity.floored`), where the moving one's gradient is zero."""

    def __init__(self, shape: tuple[int, ...], radius: int):
        self.shape = shape
        self.size = 2 * radius + 1

    def _box(self, x: np.ndarray) -> np.ndarray:
        return box_mean(x, self.size, mode="constant")

    def __call__(self, f: np.ndarray, g: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
        v = valid.reshape(self.shape)
        fv, gv = f.reshape(self.shape) * v, g.reshape(self.shape) * v
        box = self._box
        (mf, b), (mg, c) = (local_moments(x, self.size, mode="constant") for x in (fv, gv))
        a = box(fv * gv) - mf * mg
        free = c > VARIANCE_FLOOR  # where the floor holds c, it does not depend on g
        b, c = floored(b), floored(c)
        cc = a * a / (b * c)
        count = cc.size
        da = 2.0 * a / (b * c)
        dc = np.where(free, -cc / c, 0.0)
        grad = fv * box(da) - box(da * mf) + 2.0 * gv * box(dc) - 2.0 * box(dc * mg)
        return -float(cc.mean()), (-grad * v / count).ravel()


_METRICS = {"ncc": _ncc_loss, "mse": _mse_loss}
_GLOBAL_LOSSES = {"mattes": _MattesLoss, "nmse": _NMSELoss}  # losses that need the whole images' statistics


def make_loss(metric: str, f: np.ndarray, moving: np.ndarray, shape: tuple[int, ...], *, ncc_radius: int = 2):
    """The metric ``metric`` for fixed samples ``f`` (every voxel of a grid of ``shape`` for ``ants_ncc``,
    in a window of ``ncc_radius`` voxels); ``moving`` is the whole moving image (Mattes bins its range)."""
    if metric in _GLOBAL_LOSSES:
        return _GLOBAL_LOSSES[metric](f, moving)
    if metric == "ants_ncc":
        return _LocalNCCLoss(shape, ncc_radius)
    return _METRICS[metric]


def mapped(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """``moving`` through ``transform`` on ``fixed``'s grid (linear, float64, numpy order); NaN where a
    voxel maps outside ``moving``'s domain (ITK's test, as for nearest-neighbour resampling)."""
    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, np.nan, sitk.sitkFloat64))


def image_metric(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    *,
    metric: str,
    ncc_radius: int = 2,
    masks: Masks | None = None,
    warped: np.ndarray | None = None,
) -> float:
    """``metric`` (lower is better) of ``moving`` through ``transform`` against ``fixed``, on the full
    fixed grid, over the voxels that map inside ``moving`` (and inside both masks); NaN when none does.

    ``warped`` is ``mapped(moving, fixed, transform)`` when the caller has it already.
    """
    warped = mapped(moving, fixed, transform) if warped is None else warped
    f = sitk.GetArrayFromImage(fixed).astype(np.float64)
    valid = np.isfinite(warped)
    if masks is not None and masks.fixed is not None:
        valid &= sitk.GetArrayViewFromImage(masks.fixed) > 0
    if masks is not None and masks.moving is not None:
        inside = sitk.Resample(masks.moving, fixed, transform, sitk.sitkNearestNeighbor, 0)
        valid &= sitk.GetArrayViewFromImage(inside) > 0
    if not valid.any():
        return np.nan
    loss = make_loss(metric, f.ravel(), sitk.GetArrayViewFromImage(moving), f.shape, ncc_radius=ncc_radius)
    return loss(f.ravel(), np.where(valid, warped, 0.0).ravel(), valid.ravel())[0]
