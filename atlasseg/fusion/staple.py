"""STAPLE (Warfield et al. 2004), multi-label."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..config import FusionConfig
from ..errors import AtlassegError
from .base import Fuser


class Staple(Fuser):
    """STAPLE (Warfield et al. 2004), multi-label: each candidate's confusion matrix by EM.

    Every candidate j is modelled by a confusion matrix ``θ_j[s, d]``, the probability
    that it shows label d where the true label is s. EM alternates the posterior of
    the true label at each voxel, ``W[x, s] ∝ f[s] · Π_j θ_j[s, d_j(x)]``, with
    ``θ_j[s, d] = Σ_{x: d_j(x)=d} W[x, s] / Σ_x W[x, s]``; the prior f is the labels'
    frequency over all voxels and candidates and is held fixed. The first θ comes from
    the majority vote (W = 1 for the most shown label, a tie shared equally). EM stops
    when no entry of any θ changes by ``staple_tolerance`` or more, or after
    ``staple_iterations``. This is the model of SimpleITK's ``MultiLabelSTAPLE``, which
    has no iteration limit by default.

    Voxels where every candidate shows the same label (the consensus) take that label,
    with posterior 1, and are not stored or visited voxel by voxel: all consensus voxels
    of one label share one posterior, so the EM counts them per label, exactly. (Leaving
    them out of the estimate altogether would bias θ: given that the candidates
    disagree, their errors are no longer independent. On 5 simulated raters, 2 good
    and 3 poor, that variant made 3 to 4 times the errors of this one.)

    The result is the label of highest posterior where candidates disagree; a tie
    (posteriors equal in float32, the precision of the probability maps) goes to the
    smallest label value, so no voxel is left undecided.

    Memory: the first candidate is kept on the whole grid, with a mask of the voxels
    where some candidate differs from it; every candidate is kept only on those voxels,
    as an index into the label values in the smallest unsigned integer type that holds
    it (one byte up to 256 labels). Candidates thus cost O(candidates × disagreeing
    voxels) small integers, and EM works on blocks of at most ``_BLOCK`` candidate ×
    voxel × label values.

    After ``fit`` (which ``result`` and ``probabilities`` call), ``label_values`` holds
    every label shown, ``confusion[j]`` candidate j's θ over them (rows: true label,
    columns: the label shown; a row sums to 1, or is 0 for a label no voxel is likely
    to have), ``prior`` their frequency, ``iterations`` the EM iterations run and
    ``converged`` whether the tolerance was reached.
    """

    _BLOCK = 1 << 22

    def __init__(self, reference: sitk.Image, *, config: FusionConfig, **lent):
        super().__init__(reference, config=config, **lent)
        self._first: np.ndarray | None = None  # the first candidate, flat, on the whole grid
        self._disagree: np.ndarray | None = None  # voxels where some candidate differs from the first
        self._order = np.empty(0, dtype=np.intp)  # flat indices of those voxels, in the order found
        self._stored: list[np.ndarray] = []  # per candidate, label codes at _order[: len]
        self._codes: dict[int, int] = {}  # label value → code, in order of first appearance
        self._fitted = False

    def add(self, candidate: sitk.Image, intensities: sitk.Image | None = None) -> None:
        """Add one candidate (labels on the target grid); intensities are not used."""
        self._check(candidate, intensities)
        array = sitk.GetArrayViewFromImage(candidate).reshape(-1)
        if self._first is None:
            self._first = array.copy()
            self._disagree = np.zeros(array.shape, dtype=bool)
            self._order = self._order.astype(np.min_scalar_type(array.size))
        else:
            found = np.flatnonzero((array != self._first) & ~self._disagree)
            self._disagree[found] = True
            self._order = np.concatenate([self._order, found.astype(self._order.dtype)])
        # Where disagreement is found later, this candidate equals the first: nothing to keep there.
        self._stored.append(self._encode(array[self._order]))
        self._fitted = False

    def _encode(self, values: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(values, return_inverse=True)
        codes = [self._codes.setdefault(v, len(self._codes)) for v in unique.tolist()]
        return np.asarray(codes, dtype=_index_type(len(self._codes)))[inverse.reshape(-1)]

    def fit(self) -> Staple:
        """Estimate the confusion matrices by EM (once, until more candidates are added)."""
        if not self.n_candidates:
            raise AtlassegError("fusion: no candidates to fuse")
        if self._fitted:
            return self
        self._complete()
        theta = self._m_step(None)
        self.iterations, self.converged = 0, False
        while not self.converged and self.iterations < self._config.staple_iterations:
            updated = self._m_step(theta)
            self.iterations += 1
            self.converged = bool(np.abs(updated - theta).max() < self._config.staple_tolerance)
            theta = updated
        self.confusion = theta
        self._fitted = True
        return self

    def _complete(self) -> None:
        """Extend every stored candidate to all disagreeing voxels (one candidates × voxels
        array), count the consensus voxels per label and index the labels by value."""
        first = self._encode(self._first[self._order])
        consensus, counts = np.unique(self._first[~self._disagree], return_counts=True)
        consensus = self._encode(consensus)
        matrix = np.empty((self.n_candidates, self._order.size), dtype=_index_type(len(self._codes)))
        for row, stored in zip(matrix, self._stored):
            row[: stored.size] = stored
            row[stored.size :] = first[stored.size :]
        self._stored = list(matrix)
        by_code = np.fromiter(self._codes, dtype=np.int64, count=len(self._codes))  # code → value
        self.label_values = np.sort(by_code)
        self._index = np.searchsorted(self.label_values, by_code)  # code → index into label_values
        self._consensus = self._index[consensus]
        self._consensus_voxels = counts.astype(np.float64)
        shown = np.zeros(by_code.size)
        shown[self._index] = np.bincount(matrix.reshape(-1), minlength=by_code.size)
        shown[self._consensus] += self.n_candidates * counts
        self.prior = shown / shown.sum()

    def _disagreeing(self):
        """(start, candidates × voxels label indices), block by block over the disagreeing voxels."""
        step = max(1, self._BLOCK // (self.n_candidates * len(self.label_values)))
        for start in range(0, self._order.size, step):
            yield start, self._index[np.stack([s[start : start + step] for s in self._stored])]

    def _posterior(self, block: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
        """W (voxels × labels) for candidates × voxels label indices; without θ, the majority
        vote (a tie shared equally)."""
        n, k = block.shape[0], len(self.label_values)
        if theta is None:
            votes = np.zeros((block.shape[1], k))
            rows = np.arange(block.shape[1])
            for shown in block:
                votes[rows, shown] += 1.0
            w = (votes == votes.max(axis=1, keepdims=True)).astype(np.float64)
            return w / w.sum(axis=1, keepdims=True)
        log_theta = np.log(np.maximum(theta, 1e-300)).transpose(0, 2, 1)  # [candidate, shown, true]
        w = np.log(self.prior) + log_theta[np.arange(n)[:, None], block].sum(axis=0)
        w = np.exp(w - w.max(axis=1, keepdims=True))
        return w / w.sum(axis=1, keepdims=True)

    def _m_step(self, theta: np.ndarray | None) -> np.ndarray:
        n, k = self.n_candidates, len(self.label_values)
        consensus = np.broadcast_to(self._consensus, (n, self._consensus.size))
        blocks = [(consensus, self._consensus_voxels)] + [(b, None) for _, b in self._disagreeing()]
        counts = np.zeros(n * k * k)
        for block, voxels in blocks:
            w = self._posterior(block, theta)
            if voxels is not None:
                w *= voxels[:, None]
            index = ((np.arange(n)[:, None] * k + block)[:, :, None] * k + np.arange(k)).reshape(-1)
            weights = np.broadcast_to(w, (n,) + w.shape).reshape(-1)
            counts += np.bincount(index, weights=weights, minlength=counts.size)
        counts = counts.reshape(n, k, k).transpose(0, 2, 1)  # [candidate, true, shown]
        total = counts.sum(axis=2, keepdims=True)
        return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)

    def _final(self):
        """(flat voxel indices, float32 posterior W), block by block over the disagreeing voxels."""
        self.fit()
        for start, block in self._disagreeing():
            yield self._order[start : start + block.shape[1]], self._posterior(block, self.confusion).astype(np.float32)

    def _fused(self) -> sitk.Image:
        """The consensus label, else the label of highest posterior."""
        winner = self.fit()._first.astype(np.int64)
        for voxels, w in self._final():
            winner[voxels] = self.label_values[np.argmax(w, axis=1)]  # a tie: the first, smallest value
        return self._image(winner.reshape(self._target.shape), self._pixel_id)

    def _probabilities(self) -> dict[int, sitk.Image]:
        """Per label value, its posterior probability (1 for the consensus label where all agree)."""
        self.fit()
        maps = {
            v: np.where(self._disagree, np.float32(0), (self._first == v).astype(np.float32))
            for v in self.label_values.tolist()
        }
        for voxels, w in self._final():
            for column, value in enumerate(self.label_values.tolist()):
                maps[value][voxels] = w[:, column]
        return {v: self._image(m.reshape(self._target.shape), sitk.sitkFloat32) for v, m in maps.items()}


def _index_type(count: int) -> np.dtype:
    """The smallest unsigned integer type that indexes ``count`` items."""
    return np.min_scalar_type(max(count - 1, 0))
