"""Label fusion: candidates (atlas labels in target space) become one segmentation.

Most methods here are a weighted vote: each candidate adds its weight to the label
it shows at each voxel, and the label with the most weight wins (a tie goes to the
smallest label value, background 0 first). The methods differ in the weight:

- ``majority``: 1 for every candidate;
- ``global_weighted``: one weight per candidate, the inverse mean squared intensity
  difference between the warped atlas and the target, to the power ``gain``;
- ``local_weighted``: a weight per voxel, the inverse of that squared difference
  averaged in a Gaussian window (``sigma``, mm), to the power ``gain``
  (Artaechevarria et al. 2009, local weighted voting); with ``metric: nmse`` both
  weights compare the images standardised to zero mean and unit variance;
- ``jlf``: joint label fusion (Wang et al. 2013), weights per voxel that account
  for atlases making the same errors (see :class:`JointLabelFusion`).

``staple`` is not a vote: it estimates each candidate's confusion matrix by
expectation-maximisation and takes the most probable true label (Warfield et al.
2004, multi-label; see :class:`Staple`). It uses labels only, no intensities.

Fusers take candidates one by one: ``add`` each candidate, then ``result``. The
voting methods stream, so their memory does not grow with the number of atlases;
joint label fusion needs all candidates together, so beyond a memory budget it keeps
them on disk and reads them back a slab at a time, and STAPLE keeps each candidate only
where the candidates disagree.
"""

from __future__ import annotations

import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .config import FusionConfig
from .errors import AtlassegError
from .imageio import same_grid
from .parallel import available_cores
from .similarity import standardized

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
        return needs_intensities(self._config.method)

    def _check(self, candidate: sitk.Image, intensities: sitk.Image | None) -> None:
        if not same_grid(candidate, self._reference):
            raise AtlassegError("fusion: candidate is not on the target grid; propagate it first")
        if self.needs_intensities and (intensities is None or not same_grid(intensities, self._reference)):
            raise AtlassegError(f"fusion: {self._config.method} needs the warped atlas intensities on the target grid")
        self._pixel_id = _wider(self._pixel_id, candidate.GetPixelID())
        self.n_candidates += 1

    def _accumulator(self, value: int) -> np.ndarray:
        """The vote map of one label value (zeros when new)."""
        votes = self._votes.get(value)
        if votes is None:
            votes = self._votes[value] = np.zeros(self._target.shape, dtype=np.float32)
        return votes

    def _vote(self, labels: np.ndarray, weight) -> None:
        values, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
        for index, value in enumerate(values.tolist()):
            self._accumulator(value)[...] += np.where(inverse == index, weight, np.float32(0.0))

    def result(self) -> sitk.Image:
        """The fused label map on the target grid (the candidates' integer type), post-processed
        as configured (``keep_largest_component``, ``fill_holes``; ``probabilities`` are not).
        With ``probability_sigma``, the arg-max of the smoothed :meth:`probabilities`."""
        smooth = self._config.probability_sigma > 0
        probabilities = self.probabilities() if smooth or self._config.keep_largest_component else None
        if smooth:
            values = sorted(probabilities)
            fused = self._winner(values, np.stack([sitk.GetArrayViewFromImage(probabilities[v]) for v in values]))
        else:
            fused = self._fused()
        return postprocess(fused, config=self._config, probabilities=probabilities)

    def _fused(self) -> sitk.Image:
        return self._winner(*self._stack())

    def _winner(self, values: list[int], stack: np.ndarray) -> sitk.Image:
        """The label of most weight at each voxel (argmax takes the first: the smallest value)."""
        return self._image(np.asarray(values)[np.argmax(stack, axis=0)], self._pixel_id)

    def probabilities(self) -> dict[int, sitk.Image]:
        """Per label value, its probability at each voxel (they sum to 1): see the method's
        ``_probabilities``, smoothed by a Gaussian of ``probability_sigma`` mm when set."""
        maps = self._probabilities()
        if self._config.probability_sigma > 0:
            sigma = self._config.probability_sigma / np.asarray(self._reference.GetSpacing())[::-1]  # voxels, array order
            maps = {v: self._image(ndimage.gaussian_filter(sitk.GetArrayViewFromImage(m), sigma), sitk.sitkFloat32)
                    for v, m in maps.items()}
        return maps

    def _probabilities(self) -> dict[int, sitk.Image]:
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

    Patches and the search window are boxes of ``patch_radius`` and ``search_radius`` voxels
    along the finest axis and about as many mm along the others (see :func:`_radii`: on
    2.5 × 2.5 × 8 mm voxels, radius 2 is 2 × 2 × 1 voxels), so a thick-slice image is not
    compared over several slices' depth. At each voxel x, every atlas i contributes the patch
    at x + o_i, where the offset o_i (within the search window; 0 without search) is the one
    whose patch best matches the target's patch at x (least sum of squared differences; with
    ``patch_normalization``, of the patches scaled to zero mean and unit variance, i.e. the
    highest correlation; a tie goes to the offset nearer in mm, the voxel itself first). With
    the absolute differences d_i(p) = |A_i(x + o_i + p) − T(x + p)| over the patch offsets p
    (of the normalised patches, or else of the intensities scaled by their mean over all atlases and voxels),
    M[i, j] = (mean_p d_i(p)·d_j(p))^beta, and the weights are (M + alpha·I)⁻¹ 1, normalised to
    sum to 1: atlases that err in the same way share their weight. Beyond the image, patches
    repeat the border voxels.

    Votes: atlas i gives its weight at x to its label at x + o_i; with ``patch_voting`` (as
    ANTs' antsJointFusion does) it gives it, for every patch offset p, to its label at
    x + o_i + p as a vote at x + p, and each voxel's votes are divided by the number of
    patches that cover it.

    A voxel where every atlas shows the same label in the whole search window gets that
    label (every weighting gives it): only the others are voted on, from weights solved at
    them (and, with ``patch_voting``, at the voxels within the patch radius of them), in
    chunks of at most ``_CHUNK`` candidate × voxel × patch (or candidate × candidate × voxel) values.

    Memory does not grow with the number of candidates: the candidates, padded by the search
    and patch radii, are kept in memory while together they take at most ``_SLAB_BYTES``;
    beyond that they are written to a temporary folder (``TMPDIR``), and the voting reads them
    back in slabs of whole rows of the first array axis, every candidate's slab (with the rows
    its patches and search reach) together taking at most about ``_SLAB_BYTES``. The result
    does not depend on the slab size. What else stays in memory is a few target-sized arrays:
    the target, the vote maps, and the per-voxel label range.
    """

    _CHUNK = 1 << 22
    _SLAB_BYTES = 1 << 28

    def __init__(self, reference: sitk.Image, *, config: FusionConfig):
        super().__init__(reference, config=config)
        spacing = np.asarray(reference.GetSpacing())[::-1]  # array order
        self._search = _radii(config.search_radius, spacing)
        self._patch = _radii(config.patch_radius, spacing)
        self._pad = tuple((int(r), int(r)) for r in self._search + self._patch)
        self._store: tempfile.TemporaryDirectory | None = None  # the candidates, padded, once on disk
        self._labels: list[np.ndarray] = []  # in memory, or then read-only memory maps of those files
        self._intensities: list[np.ndarray] = []
        self._low = self._high = None  # per voxel, the smallest and largest label in any candidate's search window
        self._difference = 0.0  # sum over candidates of the mean |A − T|

    def add(self, candidate: sitk.Image, intensities: sitk.Image | None = None) -> None:
        self._check(candidate, intensities)
        labels = sitk.GetArrayFromImage(candidate)
        warped = sitk.GetArrayFromImage(intensities).astype(np.float32)
        self._difference += float(np.abs(warped - self._target).mean(dtype=np.float64))
        low = high = labels.astype(np.int64)
        if self._search.any():
            window = tuple(2 * self._search + 1)
            low = ndimage.minimum_filter(low, size=window, mode="nearest")
            high = ndimage.maximum_filter(high, size=window, mode="nearest")
        self._low = low if self._low is None else np.minimum(self._low, low)
        self._high = high if self._high is None else np.maximum(self._high, high)
        self._labels.append(np.pad(labels, self._pad, mode="edge"))
        self._intensities.append(np.pad(warped, self._pad, mode="edge"))
        if self._store is not None or sum(a.nbytes for a in self._labels + self._intensities) > self._SLAB_BYTES:
            for kind, arrays in (("labels", self._labels), ("intensities", self._intensities)):
                arrays[:] = [a if isinstance(a, np.memmap) else self._spill(a, f"{i}-{kind}") for i, a in enumerate(arrays)]

    def _spill(self, array: np.ndarray, name: str) -> np.memmap:
        """``array`` written to the temporary folder, and mapped back read-only."""
        try:
            if self._store is None:
                self._store = tempfile.TemporaryDirectory(prefix="atlasseg-jlf-")
            path = Path(self._store.name) / f"{name}.npy"
            np.save(path, array)
            return np.load(path, mmap_mode="r")
        except OSError as err:
            place = self._store.name if self._store is not None else tempfile.gettempdir()
            raise AtlassegError(f"joint label fusion: cannot keep its candidates in {place} ({err.strerror or err}): "
                                f"set TMPDIR to a folder with room (about {array.size * 5 / 2**20:.0f} MiB "
                                "per atlas)") from None

    def _stack(self):
        if self._labels:
            self._fuse()
        return super()._stack()

    def _fuse(self) -> None:
        config = self._config
        undecided = _undecided(self._low, self._high)
        for value in np.unique(self._low[~undecided]).tolist():
            self._accumulator(value)[(self._low == value) & ~undecided] = 1.0
        centres = undecided
        if config.patch_voting:
            centres = ndimage.maximum_filter(undecided, size=tuple(2 * self._patch + 1), mode="constant")
        self._covered = np.zeros(self._target.shape, dtype=np.float32)  # patches voting at each voxel
        target = np.pad(self._target, self._pad, mode="edge")
        halo = self._pad[0][0]  # rows a slab's patches and search reach beyond it, each side
        row_bytes = sum(a[0].nbytes for a in self._labels + self._intensities)
        rows = max(1, self._SLAB_BYTES // max(row_bytes, 1) - 2 * halo)
        for start in range(0, self._target.shape[0], rows):
            window = slice(start, start + rows + 2 * halo)  # the slab's rows, padded coordinates
            self._fuse_slab(target[window], [_read(a[window]) for a in self._labels],
                            [_read(a[window]) for a in self._intensities], centres[start:start + rows], start, undecided)
        if config.patch_voting:
            covered = np.maximum(self._covered[undecided], 1.0)
            for votes in self._votes.values():
                votes[undecided] /= covered
        self._labels.clear()
        self._intensities.clear()
        if self._store is not None:
            self._store.cleanup()
        self._store = self._low = self._high = None

    def _fuse_slab(self, target, labels, intensities, centres, start: int, undecided) -> None:
        """Weights and votes at the ``centres`` of the slab whose first row is ``start``;
        ``target``, ``labels`` and ``intensities``: the slab's rows of the padded arrays."""
        voxels = np.argwhere(centres)
        if not voxels.size:
            return
        strides = _strides(target.shape)
        spacing = np.asarray(self._reference.GetSpacing())[::-1]
        search, patch = _box(self._search, spacing), _box(self._patch, spacing)
        best = self._best_offsets(target, intensities, voxels.min(axis=0), voxels.max(axis=0) + 1, search, centres)
        base = (voxels + self._search + self._patch) @ strides
        voxels[:, 0] += start
        # Voxels per chunk: each takes n × patch float32 differences and n × n float64 weights (some copies).
        n = len(labels)
        step = max(1, self._CHUNK // (n * max(len(patch), 8 * n)))
        for first in range(0, len(voxels), step):
            chunk = slice(first, first + step)
            offsets = [None if b is None else search[b[chunk]] @ strides for b in best]
            self._solve(target.reshape(-1), labels, intensities, base[chunk], offsets, patch, strides,
                        voxels[chunk], undecided)

    def _best_offsets(self, target: np.ndarray, intensities: list, lo: np.ndarray, hi: np.ndarray,
                      search: np.ndarray, centres) -> list:
        """Per candidate and centre voxel (in ``argwhere`` order), the row of ``search`` whose patch
        best matches the target's; None for every candidate without search. The candidates are
        searched in parallel threads (scipy's filters release the GIL)."""
        if len(search) == 1:
            return [None] * len(intensities)
        r, pad = self._patch.tolist(), (self._search + self._patch).tolist()
        size = tuple(2 * self._patch + 1)
        box = lambda shift: tuple(slice(a + p - q + o, b + p + q + o)  # noqa: E731
                                  for a, b, p, q, o in zip(lo, hi, pad, r, shift))
        fixed = target[box([0] * target.ndim)]
        inside = np.argwhere(centres[tuple(slice(a, b) for a, b in zip(lo, hi))])  # from lo
        at_box = np.ravel_multi_index(tuple((inside + r).T), fixed.shape)  # the centres in box arrays
        at_sums = np.ravel_multi_index(tuple(inside.T), tuple(hi - lo))  # and in their patch sums
        scale = np.float32(1.0 / math.prod(size))
        at_slab = np.ravel_multi_index(tuple((inside + lo + pad).T), target.shape)  # and in the slab's
        shifts = search @ _strides(target.shape)
        normalized = self._config.patch_normalization
        if normalized:
            fixed_mean, fixed_std = (m.reshape(-1)[at_box] for m in _local_moments(fixed, size))

        def search_one(warped: np.ndarray) -> np.ndarray:
            lowest = np.full(len(inside), np.inf, dtype=np.float32)
            index = np.zeros(lowest.size, dtype=np.min_scalar_type(len(search) - 1))
            if normalized:
                mean, std = (m.reshape(-1) for m in _local_moments(warped, size))
            for k, offset in enumerate(search.tolist()):
                moved = warped[box(offset)]
                if normalized:  # minus the correlation of the two patches
                    cross = _patch_sums(moved * fixed, self._patch).reshape(-1)[at_sums] * scale
                    at = at_slab + shifts[k]
                    cost = (fixed_mean * mean[at] - cross) / (fixed_std * std[at])
                else:
                    cost = _patch_sums((moved - fixed) ** 2, self._patch).reshape(-1)[at_sums]
                better = cost < lowest
                lowest[better] = cost[better]
                index[better] = k
            return index

        threads = min(len(intensities), available_cores())
        if threads < 2:
            return [search_one(warped) for warped in intensities]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(search_one, intensities))

    def _solve(self, target, labels, intensities, base, offsets, patch, strides, voxels, undecided) -> None:
        """Weights at the centre voxels ``voxels`` (flat indices ``base`` into the slab's padded
        arrays) and their votes; ``offsets``: per candidate, the flat offset of its best patch
        (None: the voxel itself)."""
        config = self._config
        n, steps = len(labels), patch @ strides
        fixed = np.take(target, base[:, None] + steps)
        if config.patch_normalization:
            fixed = _standardised(fixed)
        differences = np.empty((len(base), n, len(steps)), dtype=np.float32)
        centres = [base if offset is None else base + offset for offset in offsets]
        for i, (warped, centre) in enumerate(zip(intensities, centres)):
            moved = np.take(warped.reshape(-1), centre[:, None] + steps)
            if config.patch_normalization:
                moved = _standardised(moved)
            np.abs(moved - fixed, out=differences[:, i])
        if not config.patch_normalization:
            differences /= max(self._difference / n, 1e-6)
        m = np.matmul(differences, differences.transpose(0, 2, 1)).astype(np.float64)
        del differences
        m /= len(steps)
        np.power(m, config.beta, out=m)
        m[:, np.arange(n), np.arange(n)] += config.alpha
        w = np.linalg.solve(m, np.ones((len(base), n, 1)))[..., 0]
        w /= w.sum(axis=1, keepdims=True)
        shape = np.asarray(self._target.shape)
        for offset, step in zip(patch, steps) if config.patch_voting else [(patch[0], steps[0])]:
            at = voxels + offset
            inside = np.all((at >= 0) & (at < shape), axis=1)
            flat = np.ravel_multi_index(tuple(np.clip(at, 0, shape - 1).T), self._target.shape)
            keep = inside & undecided.reshape(-1)[flat]
            flat = flat[keep]  # distinct: one offset maps distinct centres to distinct voxels
            shown = np.stack([np.take(a.reshape(-1), c[keep] + step) for a, c in zip(labels, centres)], 1)
            for value in np.unique(shown).tolist():
                self._accumulator(value).reshape(-1)[flat] += np.where(shown == value, w[keep], 0.0).sum(axis=1)
            self._covered.reshape(-1)[flat] += 1.0


def _patch_sums(array: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Sums of ``array`` over the box of ``radii`` voxels per axis around each voxel at least that far from
    its border (the result is ``2 * radii`` smaller per axis): float32 sums of shifted views, one axis after
    the other, no padding and no float64 copy (cheaper than ``ndimage.uniform_filter``)."""
    for axis, r in enumerate(radii.tolist()):
        if r:
            n = array.shape[axis]
            shifted = [array[(slice(None),) * axis + (slice(k, n - 2 * r + k),)] for k in range(2 * r + 1)]
            total = shifted[0].astype(np.float32)  # a copy, so that the sums never write into the input
            for view in shifted[1:]:
                total += view
            array = total
    return array


def _undecided(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The voxels joint label fusion solves for: where some candidate's search window shows another label
    (``low``, ``high``: per voxel, the least and greatest label in any candidate's window). Everywhere else
    every weighting votes for the one label shown."""
    return low != high


def _strides(shape: tuple[int, ...]) -> np.ndarray:
    """The step in a C-order flat index per unit step along each axis."""
    return np.asarray(np.cumprod((tuple(shape) + (1,))[:0:-1])[::-1])


def _read(rows: np.ndarray) -> np.ndarray:
    """Rows of a candidate: read into memory from its file, or (in memory already) as they are."""
    return np.array(rows) if isinstance(rows, np.memmap) else rows


def _standardised(patches: np.ndarray) -> np.ndarray:
    """Each row scaled to zero mean and unit variance (a flat row stays zero)."""
    centred = patches - patches.mean(axis=1, keepdims=True)
    return centred / np.maximum(np.sqrt((centred * centred).mean(axis=1, keepdims=True)), 1e-4)


def _local_moments(array: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (floored like :func:`_standardised`) in a cube of ``size``."""
    mean = ndimage.uniform_filter(array, size=size, mode="nearest")
    variance = ndimage.uniform_filter(array * array, size=size, mode="nearest") - mean * mean
    return mean, np.sqrt(np.maximum(variance, 1e-8))


def _radii(radius: int, spacing: np.ndarray) -> np.ndarray:
    """Per axis, ``radius`` voxels of the finest axis in whole voxels of that axis (half up): about
    the same extent in mm along every axis (0 along an axis whose voxels are more than 2 × ``radius``
    times as large as the finest)."""
    return np.floor(radius * spacing.min() / spacing + 0.5).astype(int)


def _box(radii: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Offsets (rows, array axis order) of a box of ``radii`` voxels per axis, nearest to the
    centre in mm first (ties in index order): the centre is row 0."""
    axes = np.meshgrid(*[np.arange(-r, r + 1) for r in radii.tolist()], indexing="ij")
    offsets = np.stack([a.reshape(-1) for a in axes], axis=1)
    return offsets[np.argsort(((offsets * spacing) ** 2).sum(axis=1), kind="stable")]


class Staple(_Vote):
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

    def __init__(self, reference: sitk.Image, *, config: FusionConfig):
        super().__init__(reference, config=config)
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


def _squared_difference(target, warped, config: FusionConfig) -> np.ndarray:
    """Per voxel, the squared difference of ``config.metric``'s intensities (float32)."""
    target, warped = INTENSITIES[config.metric](target), INTENSITIES[config.metric](warped)
    return ((target - warped) ** 2).astype(np.float32)


def _global_weight(target, warped, config: FusionConfig, reference) -> np.float32:
    return np.float32(max(float(np.mean(_squared_difference(target, warped, config))), _EPSILON) ** -config.gain)


def _local_weight(target, warped, config: FusionConfig, reference) -> np.ndarray:
    squared = sitk.GetImageFromArray(_squared_difference(target, warped, config))
    squared.CopyInformation(reference)
    local = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(squared, config.sigma))
    return (np.maximum(local, _EPSILON) ** -config.gain).astype(np.float32)


_WEIGHTS = {"global_weighted": _global_weight, "local_weighted": _local_weight}
INTENSITIES = {"mse": np.asarray, "nmse": standardized}  # what fusion.metric compares
FUSERS = {
    "majority": WeightedVote,
    "global_weighted": WeightedVote,
    "local_weighted": WeightedVote,
    "jlf": JointLabelFusion,
    "staple": Staple,
}
METHODS = tuple(FUSERS)


def needs_intensities(method: str) -> bool:
    """Whether fusion ``method`` weighs candidates by their warped intensities (all but majority and STAPLE)."""
    return method not in ("majority", "staple")


def fuse(reference: sitk.Image, candidates, *, config: FusionConfig) -> sitk.Image:
    """The fused label map of ``candidates``, (labels, intensities or None) pairs, with a fresh fuser."""
    fuser = make_fuser(reference, config=config)
    for labels, intensities in candidates:
        fuser.add(labels, intensities if fuser.needs_intensities else None)
    return fuser.result()


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


def _index_type(count: int) -> np.dtype:
    """The smallest unsigned integer type that indexes ``count`` items."""
    return np.min_scalar_type(max(count - 1, 0))
