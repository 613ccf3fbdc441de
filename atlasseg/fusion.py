"""Label fusion: candidates (atlas labels in target space) become one segmentation.

Fusers accumulate candidate by candidate, so memory does not grow with the
number of atlases: ``add`` each candidate, then ``result``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import AtlassegError
from .imageio import same_grid


class MajorityVote:
    """Per-voxel majority vote; a tie goes to the smallest label value (background 0 first).

    Memory: one uint16 count array per label value seen, the size of the target grid.
    """

    def __init__(self, reference: sitk.Image):
        self._reference = reference
        self._counts: dict[int, np.ndarray] = {}
        self._shape = sitk.GetArrayViewFromImage(reference).shape
        self._pixel_id = None
        self.n_candidates = 0

    def add(self, candidate: sitk.Image) -> None:
        if not same_grid(candidate, self._reference):
            raise AtlassegError("fusion: candidate is not on the target grid; propagate it first")
        labels = sitk.GetArrayViewFromImage(candidate)
        values, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
        for index, value in enumerate(values.tolist()):
            counts = self._counts.get(value)
            if counts is None:
                counts = self._counts[value] = np.zeros(self._shape, dtype=np.uint16)
            counts += inverse == index
        self._pixel_id = _wider(self._pixel_id, candidate.GetPixelID())
        self.n_candidates += 1

    def result(self) -> sitk.Image:
        if not self.n_candidates:
            raise AtlassegError("fusion: no candidates to fuse")
        values = sorted(self._counts)
        stack = np.stack([self._counts[v] for v in values])
        winner = np.asarray(values)[np.argmax(stack, axis=0)]  # argmax takes the first: the smallest value
        out = sitk.GetImageFromArray(winner)
        out.CopyInformation(self._reference)
        return sitk.Cast(out, self._pixel_id)


def _wider(current, pixel_id):
    """The integer pixel type that can hold both (candidates may come in different types)."""
    if current is None or current == pixel_id:
        return pixel_id
    order = [sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkInt64]
    rank = {p: i for i, p in enumerate(order)}
    return order[max(rank.get(current, len(order) - 1), rank.get(pixel_id, len(order) - 1))]


FUSERS = {"majority": MajorityVote}


def make_fuser(method: str, reference: sitk.Image):
    """A fresh accumulator of the named fusion method on ``reference``'s grid."""
    try:
        return FUSERS[method](reference)
    except KeyError:
        raise AtlassegError(f"unknown fusion method {method!r} (known: {', '.join(FUSERS)})") from None
