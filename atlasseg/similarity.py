"""Image similarity measures on arrays of equal shape (shared by selection and fusion weights).

Every measure here is a score: higher means more alike.
"""

from __future__ import annotations

import numpy as np

MI_BINS = 32  # bins per axis of the joint histogram of ``mutual_information``


def _pair(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{name} needs arrays of one shape, got {a.shape} and {b.shape}")
    return a, b


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation in [-1, 1]; 0 when either input is constant."""
    a, b = _pair(a, b, "ncc")
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


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
