"""Atlas selection: rank affinely aligned atlases by similarity to the target, keep the top k."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import SimpleITK as sitk

from .similarity import SIMILARITIES


def coarse_grid(target: sitk.Image, *, spacing: float) -> sitk.Image:
    """An empty image covering ``target``'s field of view with isotropic ``spacing`` (mm), same direction."""
    size = np.asarray(target.GetSize())
    old = np.asarray(target.GetSpacing())
    new = np.maximum(old, spacing)
    new_size = np.maximum(1, np.round(size * old / new)).astype(int)
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkFloat32)
    grid.SetSpacing(new.tolist())
    grid.SetDirection(target.GetDirection())
    # Keep the physical centre: first voxel centre moves by half the change of voxel size.
    direction = np.asarray(target.GetDirection()).reshape(target.GetDimension(), -1)
    shift = direction @ ((new - old) / 2.0 - (new_size * new - size * old) / 2.0)
    grid.SetOrigin((np.asarray(target.GetOrigin()) + shift).tolist())
    return grid


def _smoothed(image: sitk.Image, spacing: float) -> sitk.Image:
    return sitk.SmoothingRecursiveGaussian(image, spacing / 2.0)


def score_atlas(
    target: sitk.Image, atlas: sitk.Image, transform: sitk.Transform, *, metric: str = "ncc", spacing: float = 3.0
) -> float:
    """Similarity of ``atlas`` mapped through ``transform`` to ``target``, on a coarse grid in target space."""
    grid = coarse_grid(target, spacing=spacing)
    fixed = sitk.Resample(_smoothed(target, spacing), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    moving = sitk.Resample(_smoothed(atlas, spacing), grid, transform, sitk.sitkLinear, 0.0)
    return SIMILARITIES[metric](sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(moving))


def select_top(scores: Mapping[str, float], *, k: int | str) -> list[str]:
    """Atlas ids ordered best first (higher score is better; ties by id), the first ``k`` of them."""
    ranked = sorted(scores, key=lambda a: (-scores[a], a))
    return ranked if k == "all" else ranked[: int(k)]
