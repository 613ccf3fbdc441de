"""Label fusion: candidates (atlas labels in target space) become one segmentation.

Every method here is a weighted vote: each candidate adds its weight to the label
it shows at each voxel, and the label with the most weight wins (a tie goes to the
smallest label value, background 0 first). The methods differ in the weight:

- ``majority``: 1 for every candidate;
- ``global_weighted``: one weight per candidate, the inverse mean squared intensity
  difference between the warped atlas and the target, to the power ``gain``;
- ``local_weighted``: a weight per voxel, the inverse of that squared difference
  averaged in a Gaussian window (``sigma``, mm), to the power ``gain``
  (Artaechevarria et al. 2009, local weighted voting).

Fusers accumulate candidate by candidate, so memory does not grow with the
number of atlases: ``add`` each candidate, then ``result``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .config import FusionConfig
from .errors import AtlassegError
from .imageio import same_grid

_EPSILON = 1e-4  # floor of a squared intensity difference (intensities normalised to [0, 1])


class WeightedVote:
    """Per-voxel weighted vote over candidates; memory: one float32 map per label value seen.

    Parameters
    ----------
    reference : SimpleITK.Image
        The target, intensities normalised like the atlases (used by intensity weights).
    config : FusionConfig
        Method and its parameters.
    """

    def __init__(self, reference: sitk.Image, *, config: FusionConfig):
        if config.method not in _WEIGHTS:
            raise AtlassegError(f"unknown fusion method {config.method!r} (known: {', '.join(_WEIGHTS)})")
        self._reference = reference
        self._config = config
        self._weight = _WEIGHTS[config.method]
        self._target = sitk.GetArrayFromImage(reference).astype(np.float32)
        self._votes: dict[int, np.ndarray] = {}
        self._pixel_id = None
        self.n_candidates = 0

    @property
    def needs_intensities(self) -> bool:
        """Whether ``add`` needs the warped atlas intensities."""
        return self._config.method != "majority"

    def add(self, candidate: sitk.Image, intensities: sitk.Image | None = None) -> None:
        """Add one candidate (labels on the target grid) and, for intensity weights, its warped image."""
        if not same_grid(candidate, self._reference):
            raise AtlassegError("fusion: candidate is not on the target grid; propagate it first")
        if self.needs_intensities:
            if intensities is None or not same_grid(intensities, self._reference):
                raise AtlassegError(f"fusion: {self._config.method} needs the warped atlas intensities on the target grid")
            weight = self._weight(self._target, sitk.GetArrayViewFromImage(intensities), self._config, self._reference)
        else:
            weight = np.float32(1.0)
        labels = sitk.GetArrayViewFromImage(candidate)
        values, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
        for index, value in enumerate(values.tolist()):
            votes = self._votes.get(value)
            if votes is None:
                votes = self._votes[value] = np.zeros(labels.shape, dtype=np.float32)
            votes += np.where(inverse == index, weight, np.float32(0.0))
        self._pixel_id = _wider(self._pixel_id, candidate.GetPixelID())
        self.n_candidates += 1

    def result(self) -> sitk.Image:
        """The fused label map on the target grid (the candidates' integer type)."""
        values, stack = self._stack()
        winner = np.asarray(values)[np.argmax(stack, axis=0)]  # argmax takes the first: the smallest value
        return self._image(winner, self._pixel_id)

    def probabilities(self) -> dict[int, sitk.Image]:
        """Per label value, the fraction of the vote weight it got at each voxel (they sum to 1)."""
        values, stack = self._stack()
        total = stack.sum(axis=0)
        total[total == 0] = 1.0
        return {v: self._image(stack[i] / total, sitk.sitkFloat32) for i, v in enumerate(values)}

    def _stack(self) -> tuple[list[int], np.ndarray]:
        if not self.n_candidates:
            raise AtlassegError("fusion: no candidates to fuse")
        values = sorted(self._votes)
        return values, np.stack([self._votes[v] for v in values])

    def _image(self, array: np.ndarray, pixel_id) -> sitk.Image:
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(self._reference)
        return sitk.Cast(out, pixel_id)


def _global_weight(target, warped, config: FusionConfig, reference) -> np.float32:
    diff = target - warped
    return np.float32(max(float(np.mean(diff * diff)), _EPSILON) ** -config.gain)


def _local_weight(target, warped, config: FusionConfig, reference) -> np.ndarray:
    squared = sitk.GetImageFromArray((target - warped) ** 2)
    squared.CopyInformation(reference)
    local = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(squared, config.sigma))
    return (np.maximum(local, _EPSILON) ** -config.gain).astype(np.float32)


_WEIGHTS = {"majority": None, "global_weighted": _global_weight, "local_weighted": _local_weight}
METHODS = tuple(_WEIGHTS)


def _wider(current, pixel_id):
    """The integer pixel type that can hold both (candidates may come in different types)."""
    if current is None or current == pixel_id:
        return pixel_id
    order = [sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkInt64]
    rank = {p: i for i, p in enumerate(order)}
    return order[max(rank.get(current, len(order) - 1), rank.get(pixel_id, len(order) - 1))]
