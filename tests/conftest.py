"""Synthetic data for the tests: phantoms with known geometry and known transforms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def phantom(*, dim: int = 3, size: int = 40, spacing: float = 2.0, origin=None) -> tuple[sitk.Image, sitk.Image]:
    """A smooth blob phantom (image, labels): an ellipsoid body (1) holding two touching
    off-centre ellipsoids (2, 3) and a small sphere (4); intensities differ per label."""
    shape = (size,) * dim
    grid = np.meshgrid(*[np.linspace(-1, 1, size) for _ in range(dim)], indexing="ij")  # array order z,y,x
    coords = grid[::-1]  # x, y, z

    def inside(centre, radii):
        return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1.0

    labels = np.zeros(shape, np.uint8)
    labels[inside([0.0] * dim, [0.75, 0.6, 0.55][:dim])] = 1
    labels[inside([-0.2, 0.1, 0.0][:dim], [0.25, 0.3, 0.3][:dim])] = 2
    labels[inside([0.25, 0.1, 0.0][:dim], [0.2, 0.25, 0.25][:dim])] = 3
    labels[inside([0.0, -0.35, 0.1][:dim], [0.12] * dim)] = 4
    intensity = np.array([0.0, 0.3, 0.7, 1.0, 0.5], np.float32)[labels]
    image = sitk.SmoothingRecursiveGaussian(_with_geometry(intensity, spacing, origin), spacing * 0.7)
    return image, _with_geometry(labels, spacing, origin)


def texture(*, dim: int = 3, size: int = 32, spacing: float = 2.0, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """Smoothed noise in [0, 1] (every point has a distinct neighbourhood, so every
    displacement is observable) and a label map of its brightest 30 %."""
    from scipy.ndimage import gaussian_filter

    array = gaussian_filter(np.random.default_rng(seed).standard_normal((size,) * dim), 2.0)
    array = ((array - array.min()) / np.ptp(array)).astype(np.float32)
    labels = (array > np.percentile(array, 70)).astype(np.uint8)
    return _with_geometry(array, spacing, None), _with_geometry(labels, spacing, None)


def _with_geometry(array: np.ndarray, spacing: float, origin) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    dim = image.GetDimension()
    image.SetSpacing([spacing] * dim)
    image.SetOrigin(origin if origin is not None else [-(s - 1) * spacing / 2 for s in image.GetSize()])
    return image


def warp(image: sitk.Image, transform: sitk.Transform, *, labels: bool = False) -> sitk.Image:
    """``image`` resampled on its own grid through ``transform`` (output point → input point)."""
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, image, transform, interpolator, 0)


def rigid(dim: int, *, angle_deg: float = 8.0, shift=(4.0, -3.0, 2.0)) -> sitk.Transform:
    angle = np.deg2rad(angle_deg)
    if dim == 2:
        return sitk.Euler2DTransform((0.0, 0.0), angle, shift[:2])
    return sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, angle, shift)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dim(request) -> int:
    return request.param


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own registration cache (never the user's ~/.cache/atlasseg)."""
    monkeypatch.setenv("ATLASSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def data(source, tmp_path) -> Path:
    """A fresh copy of the test module's ``source`` dataset folder, for one test to edit (modules that need no
    copy define their own ``data``)."""
    return Path(shutil.copytree(source, tmp_path / "data"))
