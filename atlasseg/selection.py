"""Atlas selection: rank affinely aligned atlases by similarity to the target, keep the best.

Scores are computed in target space on a grid of ``grid_spacing`` (along an axis where
the target's voxels are coarser, theirs), both images smoothed to it first; higher is
better for every metric (``ncc``, ``mi``, ``mse`` negated; see :mod:`atlasseg.similarity`).
The region scored is the target's whole field of view (``roi: none``), or narrowed to
where the atlas's labels land through its affine transform: the voxels within a margin
of them (``roi: near_labels``, the default) or their bounding box grown by the margin
(``roi: labels``); and to the target's mask. An atlas whose region is empty (its labels map outside the target)
scores minus infinity: it ranks last.

Why near the labels, on a fine grid: the structures to segment are a small part of the
field of view, and an atlas's score over the whole image is dominated by everything else;
``benchmarks/selection.py`` measures how well each score's ranking predicts an atlas's Dice
after non-rigid registration.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .config import SelectionConfig
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


def smoothed(image: sitk.Image, spacing: float) -> sitk.Image:
    """``image`` smoothed for a grid of ``spacing`` mm (a Gaussian of half that)."""
    return sitk.SmoothingRecursiveGaussian(image, spacing / 2.0)


def indicator(mask: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Non-zero voxels of ``mask`` resampled linearly onto ``grid`` through ``transform``."""
    inside = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(inside, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def label_box(labels: sitk.Image, transform: sitk.Transform, grid: sitk.Image, *, margin: float) -> np.ndarray:
    """Voxels of ``grid`` (array order) in the bounding box of ``labels``' non-zero voxels mapped
    through ``transform`` (grid points → label-map points), grown by ``margin`` mm on every side.

    A grid voxel counts as labelled where the linearly resampled indicator is positive, so a
    structure thinner than the grid still shows. All False when no label maps onto the grid.
    """
    support = indicator(labels, grid, transform) > 0
    box = np.zeros(support.shape, dtype=bool)
    if not support.any():
        return box
    spacing = np.asarray(grid.GetSpacing())[::-1]
    grow = np.ceil(margin / spacing - 1e-9).astype(int)
    found = np.nonzero(support)
    box[tuple(slice(max(0, int(i.min()) - g), int(i.max()) + 1 + g) for i, g in zip(found, grow))] = True
    return box


def near_labels(labels: sitk.Image, transform: sitk.Transform, grid: sitk.Image, *, margin: float) -> np.ndarray:
    """Voxels of ``grid`` (array order) within ``margin`` mm of ``labels``' non-zero voxels mapped
    through ``transform`` (grid points → label-map points), those included; labelled as in
    :func:`label_box`. All False when no label maps onto the grid."""
    support = indicator(labels, grid, transform) > 0
    if not support.any() or margin <= 0:
        return support
    spacing = np.asarray(grid.GetSpacing())[::-1]
    return ndimage.distance_transform_edt(~support, sampling=spacing) <= margin


def score_atlas(
    target: sitk.Image,
    atlas: sitk.Image,
    transform: sitk.Transform,
    *,
    config: SelectionConfig = SelectionConfig(),
    labels: sitk.Image | None = None,
    mask: sitk.Image | None = None,
    smoothed_already: bool = False,
) -> float:
    """Similarity of ``atlas`` mapped through ``transform`` to ``target``, on the scoring grid in target space.

    ``labels`` (the atlas's label map) is needed unless ``roi`` is ``none``; ``mask`` (a binary image
    in target space, e.g. the target's manifest mask) restricts the score to where it is
    at least one half after linear resampling onto the grid. Both images are first :func:`smoothed` for the grid,
    unless ``smoothed_already`` (the pipeline keeps them smoothed: each is used for many pairs).
    """
    spacing = config.grid_spacing
    if not smoothed_already:
        target, atlas = smoothed(target, spacing), smoothed(atlas, spacing)
    grid = coarse_grid(target, spacing=spacing)
    fixed = sitk.GetArrayFromImage(sitk.Resample(target, grid, sitk.Transform(), sitk.sitkLinear, 0.0))
    moving = sitk.GetArrayFromImage(sitk.Resample(atlas, grid, transform, sitk.sitkLinear, 0.0))
    region = np.ones(fixed.shape, dtype=bool)
    if config.roi != "none":
        if labels is None:
            raise ValueError(f"selection.roi {config.roi!r} needs the atlas's label map")
        region &= REGIONS[config.roi](labels, transform, grid, margin=config.roi_margin)
    if mask is not None:
        region &= indicator(mask, grid, sitk.Transform()) >= 0.5
    if not region.any():
        return -math.inf
    return SIMILARITIES[config.metric](fixed[region], moving[region])


REGIONS = {"labels": label_box, "near_labels": near_labels}


def rank(scores: Mapping[str, float]) -> list[str]:
    """Atlas ids best first: higher score first, ties (and NaN, last) by id."""
    return sorted(scores, key=lambda a: (math.isnan(scores[a]), 0.0 if math.isnan(scores[a]) else -scores[a], a))


def min_atlases(config: SelectionConfig, n_atlases: int) -> int:
    """The fewest atlases a target given ``n_atlases`` is segmented with: ``min_atlases``, or for ``auto`` half of
    the ``k`` selected (rounded up) and at least 3, but never more than are selected."""
    if config.min_atlases != "auto":
        return config.min_atlases
    k = n_atlases if config.k == "all" else min(config.k, n_atlases)
    return min(k, max(3, math.ceil(k / 2)))


def select(scores: Mapping[str, float], config: SelectionConfig) -> list[str]:
    """The atlases kept, best first: the best ``k``, of them those scoring at least ``threshold``
    (when set), and never fewer than the best ``min_atlases`` (while there are as many)."""
    ranked = rank(scores)
    kept = ranked if config.k == "all" else ranked[: config.k]
    if config.threshold is not None:
        kept = [a for a in kept if scores[a] >= config.threshold]
    floor = min_atlases(config, len(ranked))
    return kept if len(kept) >= floor else ranked[:floor]
