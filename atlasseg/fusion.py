"""Label fusion: candidates (atlas labels in target space) become one segmentation.

Every method here is a weighted vote: each candidate adds its weight to the label
it shows at each voxel, and the label with the most weight wins (a tie goes to the
smallest label value, background 0 first). The methods differ in the weight:

- ``majority``: 1 for every candidate;
- ``global_weighted``: one weight per candidate, the inverse mean squared intensity
  difference between the warped atlas and the target, to the power ``gain``;
- ``local_weighted``: a weight per voxel, the inverse of that squared difference
  averaged in a Gaussian window (``sigma``, mm), to the power ``gain``
  (Artaechevarria et al. 2009, local weighted voting);
- ``jlf``: joint label fusion (Wang et al. 2013), weights per voxel that account
  for atlases making the same errors (see :class:`JointLabelFusion`).

Fusers take candidates one by one: ``add`` each candidate, then ``result``. The
voting methods stream, so their memory does not grow with the number of atlases;
joint label fusion needs all candidates together.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .config import FusionConfig
from .errors import AtlassegError
from .imageio import same_grid

_EPSILON = 1e-4  # floor of a squared intensity difference (intensities normalised to [0, 1])


class _Vote:
    """Per-voxel vote accumulator over label values; the label with the most weight wins."""

    def __init__(self, reference: sitk.Image, *, config: FusionConfig):
        self._reference = reference
        self._config = config
        self._target = sitk.GetArrayFromImage(reference).astype(np.float32)
        self._votes: dict[int, np.ndarray] = {}
        self._pixel_id = None
        self.n_candidates = 0

    @property
    def needs_intensities(self) -> bool:
        """Whether ``add`` needs the warped atlas intensities."""
        return self._config.method != "majority"

    def _check(self, candidate: sitk.Image, intensities: sitk.Image | None) -> None:
        if not same_grid(candidate, self._reference):
            raise AtlassegError("fusion: candidate is not on the target grid; propagate it first")
        if self.needs_intensities and (intensities is None or not same_grid(intensities, self._reference)):
            raise AtlassegError(f"fusion: {self._config.method} needs the warped atlas intensities on the target grid")
        self._pixel_id = _wider(self._pixel_id, candidate.GetPixelID())
        self.n_candidates += 1

    def _vote(self, labels: np.ndarray, weight) -> None:
        values, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
        for index, value in enumerate(values.tolist()):
            votes = self._votes.get(value)
            if votes is None:
                votes = self._votes[value] = np.zeros(self._target.shape, dtype=np.float32)
            votes += np.where(inverse == index, weight, np.float32(0.0))

    def result(self) -> sitk.Image:
        """The fused label map on the target grid (the candidates' integer type)."""
        values, stack = self._stack()
        winner = np.asarray(values)[np.argmax(stack, axis=0)]  # argmax takes the first: the smallest value
        return self._image(winner, self._pixel_id)

    def probabilities(self) -> dict[int, sitk.Image]:
        """Per label value, its share of the vote weight at each voxel (the shares sum to 1)."""
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


class WeightedVote(_Vote):
    """Majority, global or local weighted vote, streamed: memory is one float32 map per label value.

    Parameters
    ----------
    reference : SimpleITK.Image
        The target, intensities normalised like the atlases (used by intensity weights).
    config : FusionConfig
        Method and its parameters.
    """

    def add(self, candidate: sitk.Image, intensities: sitk.Image | None = None) -> None:
        """Add one candidate (labels on the target grid) and, for intensity weights, its warped image."""
        self._check(candidate, intensities)
        weight = np.float32(1.0)
        if self.needs_intensities:
            weight = _WEIGHTS[self._config.method](
                self._target, sitk.GetArrayViewFromImage(intensities), self._config, self._reference
            )
        self._vote(sitk.GetArrayViewFromImage(candidate), weight)


class JointLabelFusion(_Vote):
    """Joint label fusion (Wang et al. 2013): weights that minimise the atlases' expected joint error.

    At each voxel, M[i, j] = (mean over the patch of |A_i − T|·|A_j − T|)^beta, with
    the differences scaled by their mean over all atlases; the weights are
    (M + alpha·I)⁻¹ 1, normalised to sum to 1. Atlases that err in the same way
    share their weight. Needs every candidate at once: memory is one label map and
    one float32 image per candidate; the solve runs in slabs of ``_SLAB`` slices.
    No local search (search radius 0).
    """

    _SLAB = 8

    def __init__(self, reference: sitk.Image, *, config: FusionConfig):
        super().__init__(reference, config=config)
        self._labels: list[np.ndarray] = []
        self._intensities: list[np.ndarray] = []

    def add(self, candidate: sitk.Image, intensities: sitk.Image | None = None) -> None:
        self._check(candidate, intensities)
        self._labels.append(sitk.GetArrayFromImage(candidate))
        self._intensities.append(sitk.GetArrayFromImage(intensities).astype(np.float32))

    def _stack(self):
        if self._labels:
            self._fuse()
        return super()._stack()

    def _fuse(self) -> None:
        config = self._config
        diff = np.abs(np.stack(self._intensities) - self._target[None])
        diff /= max(float(diff.mean()), 1e-6)
        n = len(self._labels)
        radius = config.patch_radius
        size = [1] + [2 * radius + 1] * self._target.ndim
        weights = np.empty((n,) + self._target.shape, dtype=np.float32)
        depth = self._target.shape[0]
        for start in range(0, depth, self._SLAB):
            stop = min(depth, start + self._SLAB)
            lo, hi = max(0, start - radius), min(depth, stop + radius)
            d = diff[:, lo:hi]
            pairs = d[:, None] * d[None, :]  # n × n × slab
            m = ndimage.uniform_filter(pairs.reshape((n * n,) + d.shape[1:]), size=size, mode="nearest")
            m = np.moveaxis(m.reshape((n, n) + d.shape[1:])[:, :, start - lo : stop - lo], (0, 1), (-2, -1))
            m = m.astype(np.float64) ** config.beta + config.alpha * np.eye(n)
            w = np.linalg.solve(m, np.ones(m.shape[:-1] + (1,)))[..., 0]
            w /= w.sum(axis=-1, keepdims=True)
            weights[:, start:stop] = np.moveaxis(w, -1, 0)
        for labels, weight in zip(self._labels, weights):
            self._vote(labels, weight)
        self._labels.clear()
        self._intensities.clear()


def _global_weight(target, warped, config: FusionConfig, reference) -> np.float32:
    diff = target - warped
    return np.float32(max(float(np.mean(diff * diff)), _EPSILON) ** -config.gain)


def _local_weight(target, warped, config: FusionConfig, reference) -> np.ndarray:
    squared = sitk.GetImageFromArray((target - warped) ** 2)
    squared.CopyInformation(reference)
    local = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(squared, config.sigma))
    return (np.maximum(local, _EPSILON) ** -config.gain).astype(np.float32)


_WEIGHTS = {"global_weighted": _global_weight, "local_weighted": _local_weight}
FUSERS = {"majority": WeightedVote, "global_weighted": WeightedVote, "local_weighted": WeightedVote, "jlf": JointLabelFusion}
METHODS = tuple(FUSERS)


def make_fuser(reference: sitk.Image, *, config: FusionConfig) -> _Vote:
    """A fresh accumulator for ``config.method`` on ``reference``'s grid (normalised target intensities)."""
    try:
        return FUSERS[config.method](reference, config=config)
    except KeyError:
        raise AtlassegError(f"unknown fusion method {config.method!r} (known: {', '.join(FUSERS)})") from None


def _wider(current, pixel_id):
    """The integer pixel type that can hold both (candidates may come in different types)."""
    if current is None or current == pixel_id:
        return pixel_id
    order = [sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkInt64]
    rank = {p: i for i, p in enumerate(order)}
    return order[max(rank.get(current, len(order) - 1), rank.get(pixel_id, len(order) - 1))]
