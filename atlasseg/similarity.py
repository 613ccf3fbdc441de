"""Image similarity measures on arrays of equal shape (shared by selection and fusion weights), and the
similarity math that registration and fusion share: global correlation with its derivative, local (box
window) moments and the one floor of a local variance.

Every measure here is a score: higher means more alike.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MI_BINS = 32  # bins per axis of the joint histogram of ``mutual_information``


def _pair(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{name} needs arrays of one shape, got {a.shape} and {b.shape}")
    return a, b


def _correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float, float]:
    """(NCC, a centred, b centred, their norms' product, Σ b centred²) of two flat float64 arrays; NCC 0 when
    either is constant (the product is then 0)."""
    a = a - a.mean()
    b = b - b.mean()
    b2 = (b * b).sum()
    denom = np.sqrt((a * a).sum() * b2)
    return (float((a * b).sum() / denom) if denom > 0 else 0.0), a, b, float(denom), float(b2)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation in [-1, 1]; 0 when either input is constant."""
    return _correlation(*_pair(a, b, "ncc"))[0]


def ncc_gradient(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """:func:`ncc` of two flat arrays and its derivative with respect to each element of ``b`` (zeros when
    either input is constant)."""
    value, a, b, denom, b2 = _correlation(*_pair(a, b, "ncc_gradient"))
    if denom == 0:
        return value, np.zeros_like(b)
    return value, a / denom - value * b / b2


VARIANCE_FLOOR = 1e-8  # of a local (window or patch) variance; intensities normalised to [0, 1]: std 1e-4


def floored(variance: np.ndarray) -> np.ndarray:
    """A local variance floored at ``VARIANCE_FLOOR``: the one rule by which every local correlation here (the
    demons' LNCC forces, the ``ants_ncc`` loss, joint label fusion's patches) treats a flat window, so that
    dividing by it stays finite and a flat window correlates with nothing."""
    return np.maximum(variance, VARIANCE_FLOOR)


def box_mean(array: np.ndarray, size: int, *, mode: str = "nearest") -> np.ndarray:
    """The mean of ``array`` in a box of ``size`` voxels along every axis around each voxel (beyond the border
    as scipy's ``mode``: ``nearest`` repeats it, ``constant`` reads zeros), in ``array``'s float type."""
    return ndimage.uniform_filter(array, size=size, mode=mode)


def local_moments(array: np.ndarray, size: int, *, mode: str = "nearest") -> tuple[np.ndarray, np.ndarray]:
    """Box-window (:func:`box_mean`) mean and variance of ``array`` at each voxel; the variance as computed,
    ⟨x²⟩ − ⟨x⟩² (rounding can make it slightly negative: see :func:`floored`)."""
    mean = box_mean(array, size, mode=mode)
    return mean, box_mean(array * array, size, mode=mode) - mean * mean


def mutual_information(a: np.ndarray, b: np.ndarray, *, bins: int = MI_BINS) -> float:
    """Mutual information (nats) of the joint histogram, ``bins`` equal bins per image spanning
    its own range; 0 when either input is constant (it tells nothing about the other)."""
    a, b = _pair(a, b, "mutual_information")
    if a.size == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    joint /= joint.sum()
    outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
    seen = joint > 0
    return float((joint[seen] * np.log(joint[seen] / outer[seen])).sum())


def negative_mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference, negated (0 for identical inputs, lower for less alike)."""
    a, b = _pair(a, b, "negative_mse")
    return -float(np.mean((a - b) ** 2)) if a.size else 0.0


def standardized(a: np.ndarray) -> np.ndarray:
    """``a`` shifted and scaled to zero mean and unit variance (float64); all zeros when ``a`` is constant."""
    a = np.asarray(a, dtype=np.float64)
    spread = a.std() if a.size else 0.0
    return (a - a.mean()) / spread if spread > 0 else np.zeros_like(a)


def negative_nmse(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mean squared difference, negated: the MSE of the two inputs after each is standardised
    (:func:`standardized`), so unchanged by a positive linear change of either's intensities. Over the same
    samples it equals ``2 * ncc(a, b) - 2`` (0 for identical inputs, -4 at worst)."""
    a, b = _pair(a, b, "negative_nmse")
    return negative_mse(standardized(a), standardized(b))


SIMILARITIES = {"ncc": ncc, "mi": mutual_information, "mse": negative_mse, "nmse": negative_nmse}
