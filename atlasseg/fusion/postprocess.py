"""Post-processing of a fused label map: the largest component per label, holes filled."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..config import FusionConfig


def postprocess(
    labels: sitk.Image, *, config: FusionConfig, probabilities: dict[int, sitk.Image] | None = None
) -> sitk.Image:
    """``keep_largest_component`` then ``fill_holes``, as ``config`` turns them on."""
    if config.keep_largest_component:
        labels = keep_largest_component(labels, probabilities)
    if config.fill_holes:
        labels = fill_holes(labels)
    return labels


def keep_largest_component(labels: sitk.Image, probabilities: dict[int, sitk.Image] | None = None) -> sitk.Image:
    """Each label (not background 0) keeps only its largest connected component.

    Components are fully connected (8 neighbours in 2D, 26 in 3D): pieces that touch at
    a corner are one piece. Of equal largest components, the first in array order stays.
    A voxel cut off goes to the most probable other label there (``probabilities``: per
    label value, a map on the same grid, e.g. a fuser's), background 0 included, a tie
    to the smaller value; to background where no other label has any probability or
    ``probabilities`` is None. It is done once: a voxel so reassigned is not checked again.
    """
    array = sitk.GetArrayFromImage(labels)
    full = ndimage.generate_binary_structure(array.ndim, array.ndim)
    removed = np.zeros(array.shape, dtype=bool)
    for value, box, mask in _label_boxes(array):
        pieces, count = ndimage.label(mask, structure=full)
        if count > 1:
            sizes = np.bincount(pieces.reshape(-1))
            sizes[0] = 0
            removed[box] |= mask & (pieces != np.argmax(sizes))
    out = array.copy()
    own = array[removed]
    best, winner = np.zeros(own.size), np.zeros(own.size, dtype=array.dtype)
    for value in sorted(probabilities or {}):
        p = sitk.GetArrayViewFromImage(probabilities[value])[removed]
        better = (p > best) & (own != value)
        best[better], winner[better] = p[better], value
    out[removed] = winner
    return _array_image(out, labels)


def fill_holes(labels: sitk.Image) -> sitk.Image:
    """Background (0) enclosed by one label becomes that label.

    A hole of label s is a region of voxels other than s, face connected (4 neighbours
    in 2D, 6 in 3D, the complement of the full connectivity of labels), that does not
    reach the image border; only its background voxels are filled, other labels inside
    stay. Background enclosed by several labels together (no one of them surrounds it)
    stays background. Where labels nest, a voxel goes to the innermost label enclosing it
    (the one whose hole is smallest).
    """
    array = sitk.GetArrayFromImage(labels)
    face = ndimage.generate_binary_structure(array.ndim, 1)
    inner = (slice(1, -1),) * array.ndim
    out = array.copy()
    smallest = np.full(array.shape, np.iinfo(np.int64).max)  # size of the smallest hole claiming each voxel
    for value, box, mask in _label_boxes(array):
        regions, _ = ndimage.label(np.pad(~mask, 1, constant_values=True), structure=face)
        sizes = np.bincount(regions.reshape(-1))
        sizes[regions[(0,) * array.ndim]] = np.iinfo(np.int64).max  # the region around the label: not a hole
        size = sizes[regions[inner]]
        claim = (array[box] == 0) & (size < smallest[box])
        out[box][claim] = value
        smallest[box][claim] = size[claim]
    return _array_image(out, labels)


def _label_boxes(array: np.ndarray):
    """(value, bounding box, mask of the value in the box) for every label value but background 0."""
    values, index = np.unique(array, return_inverse=True)
    index = index.reshape(array.shape)
    for i, box in enumerate(ndimage.find_objects(index + 1)):
        if box is not None and values[i] != 0:
            yield values[i], box, index[box] == i


def _array_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    return out
