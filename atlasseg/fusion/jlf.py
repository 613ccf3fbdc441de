"""Joint label fusion (Wang et al. 2013)."""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..config import FusionConfig
from ..errors import AtlassegError
from ..imageio import Geometry
from ..similarity import floored, local_moments
from .base import Fuser


class JointLabelFusion(Fuser):
    """Joint label fusion (Wang et al. 2013): weights that minimise the atlases' expected joint error.

    Patches and the search window are boxes of ``patch_radius`` and ``search_radius`` voxels
    along the finest axis and about as many mm along the others (see :func:`voxel_radii`: on
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
    chunks of at most ``_CHUNK`` candidate × voxel × patch (or candidate × candidate × voxel) values;
    with threads, chunks are solved and their votes summed side by side (as many as threads), the sums added
    in chunk order. The search tries its offsets in blocks, nearest first (see ``_SEARCH_BYTES``).

    Memory does not grow with the number of candidates: the candidates, padded by the search
    and patch radii, are kept in memory while together they take at most ``_SLAB_BYTES``;
    beyond that they are written to its spill folder (by default a temporary folder in ``TMPDIR``; removed
    when fusion ends), and the voting reads them
    back in slabs of whole rows of the first array axis, every candidate's slab (with the rows
    its patches and search reach) together taking at most about ``_SLAB_BYTES``. The result
    does not depend on the slab size. What else stays in memory is a few target-sized arrays:
    the target, the vote maps, and the per-voxel label range.
    """

    _CHUNK = 1 << 22
    _SEARCH_BYTES = 1 << 21  # per thread, the search's stack of box products for a block of offsets (at least one)
    _SLAB_BYTES = 1 << 28
    # Rough bytes per voxel for estimate_bytes: the padded target and each voxel's label range (int64), and
    # per candidate (in memory up to _SLAB_BYTES, else in the temporary folder) float32 intensities and
    # labels of up to 2 bytes.
    _BYTES_PER_VOXEL = 24
    _BYTES_PER_VOXEL_AND_CANDIDATE = 6
    title = "joint label fusion"

    @classmethod
    def uses_intensities(cls, method: str) -> bool:
        return True

    @classmethod
    def _candidate_bytes(cls, geometry: Geometry, n_candidates: int) -> int:
        """What the candidates take, padding aside."""
        return math.prod(geometry.size) * cls._BYTES_PER_VOXEL_AND_CANDIDATE * n_candidates

    @classmethod
    def estimate_bytes(cls, geometry: Geometry, n_candidates: int) -> int:
        return math.prod(geometry.size) * cls._BYTES_PER_VOXEL + min(
            cls._candidate_bytes(geometry, n_candidates), cls._SLAB_BYTES
        )

    @classmethod
    def estimate_disk_bytes(cls, geometry: Geometry, n_candidates: int) -> int:
        """The candidates, when together they take more than ``_SLAB_BYTES`` (else they stay in memory)."""
        need = cls._candidate_bytes(geometry, n_candidates)
        return need if need > cls._SLAB_BYTES else 0

    def __init__(
        self,
        reference: sitk.Image,
        *,
        config: FusionConfig,
        threads: int | None = None,
        spill_folder: Path | None = None,
    ):
        super().__init__(reference, config=config, threads=threads, spill_folder=spill_folder)
        self._radii: dict[str, int] | None = None  # patch and search radius, chosen at the first candidate
        self._store: tempfile.TemporaryDirectory | None = None  # the candidates, padded, once on disk
        self._labels: list[np.ndarray] = []  # in memory, or then read-only memory maps of those files
        self._intensities: list[np.ndarray] = []
        self._low = self._high = None  # per voxel, the smallest and largest label in any candidate's search window
        self._difference = 0.0  # sum over candidates of the mean |A − T|

    @property
    def chosen(self) -> dict:
        """``patch_radius`` and ``search_radius`` as used (``auto`` resolved; none before the first candidate)."""
        return dict(self._radii or {})

    def add(self, candidate: sitk.Image, intensities: sitk.Image | None = None) -> None:
        self._check(candidate, intensities)
        labels = sitk.GetArrayFromImage(candidate)
        if self._radii is None:
            self._choose_radii(labels)
        warped = sitk.GetArrayViewFromImage(intensities).astype(np.float32)
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
                arrays[:] = [
                    a if isinstance(a, np.memmap) else self._spill(a, f"{i}-{kind}") for i, a in enumerate(arrays)
                ]

    def _choose_radii(self, labels: np.ndarray) -> None:
        """The radii of the config, ``auto`` ones from the size of the first (best-ranked) candidate's smallest
        label (:func:`auto_radii`), in voxels per axis."""
        spacing = np.asarray(self._reference.GetSpacing())[::-1]  # array order
        chosen = auto_radii(labels, spacing)
        config = self._config
        self._radii = {
            key: chosen[key] if getattr(config, key) == "auto" else getattr(config, key)
            for key in ("patch_radius", "search_radius")
        }
        self._search = voxel_radii(self._radii["search_radius"], spacing)
        self._patch = voxel_radii(self._radii["patch_radius"], spacing)
        self._pad = tuple((int(r), int(r)) for r in self._search + self._patch)

    def _spill(self, array: np.ndarray, name: str) -> np.memmap:
        """``array`` written to the temporary folder, and mapped back read-only."""
        try:
            if self._store is None:
                self._store = tempfile.TemporaryDirectory(prefix="atlasseg-jlf-", dir=self._spill_folder)
            path = Path(self._store.name) / f"{name}.npy"
            np.save(path, array)
            return np.load(path, mmap_mode="r")
        except OSError as err:
            place = self._store.name if self._store is not None else self._spill_folder or tempfile.gettempdir()
            raise AtlassegError(
                f"joint label fusion: cannot keep its candidates in {place} ({err.strerror or err}): "
                f"set TMPDIR to a folder with room (about {array.size * 5 / 2**20:.0f} MiB "
                "per atlas)"
            ) from None

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
            self._fuse_slab(
                target[window],
                [_read(a[window]) for a in self._labels],
                [_read(a[window]) for a in self._intensities],
                centres[start : start + rows],
                start,
                undecided,
            )
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
        steps = patch @ strides

        def votes(first: int):
            chunk = slice(first, first + step)
            offsets = [None if b is None else search[b[chunk]] @ strides for b in best]
            centres = [base[chunk] if offset is None else base[chunk] + offset for offset in offsets]
            w = self._weights(target.reshape(-1), intensities, base[chunk], centres, steps)
            return self._chunk_votes(labels, centres, w, patch, steps, voxels[chunk], undecided)

        # Each chunk's weights are solved and its votes summed in threads (numpy's products, solves and sums
        # release the GIL), as many chunks ahead as threads; the chunks' sums are added here in chunk order, so
        # the result is the same in any number of threads.
        firsts = range(0, len(voxels), step)
        threads = min(self._threads, len(firsts))
        with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
            for first, sums, covered in map(votes, firsts) if pool is None else _ahead(pool, votes, firsts, threads):
                span = slice(first, first + covered.size)
                for value, sum_ in sums.items():
                    self._accumulator(value).reshape(-1)[span] += sum_
                self._covered.reshape(-1)[span] += covered

    def _best_offsets(
        self, target: np.ndarray, intensities: list, lo: np.ndarray, hi: np.ndarray, search: np.ndarray, centres
    ) -> list:
        """Per candidate and centre voxel (in ``argwhere`` order), the row of ``search`` whose patch
        best matches the target's; None for every candidate without search. The candidates are
        searched in parallel, in as many threads as the fuser was lent (numpy releases the GIL in its loops)."""
        if len(search) == 1:
            return [None] * len(intensities)
        r, pad = self._patch.tolist(), (self._search + self._patch).tolist()
        size = tuple(2 * self._patch + 1)

        def box(shift):
            return tuple(slice(a + p - q + o, b + p + q + o) for a, b, p, q, o in zip(lo, hi, pad, r, shift))

        fixed = np.ascontiguousarray(target[box([0] * target.ndim)])  # contiguous: each product runs faster
        inside = np.argwhere(centres[tuple(slice(a, b) for a, b in zip(lo, hi))])  # from lo
        at_box = np.ravel_multi_index(tuple((inside + r).T), fixed.shape)  # the centres in box arrays
        # Offsets go in blocks (nearest first), each block's box sums in one stack: a few long numpy calls per
        # block rather than many short ones per offset (which held the GIL long enough to idle the other thread).
        block = int(min(len(search), max(1, self._SEARCH_BYTES // (4 * fixed.size))))
        # where each centre's patch starts in the block's stacked box sums
        at_sums = np.ravel_multi_index(tuple(inside.T), fixed.shape) + (np.arange(block) * fixed.size)[:, None]
        scale = np.float32(1.0 / math.prod(size))
        shifts = search @ _strides(target.shape)
        # the centres in the slab's flat arrays, moved by the most negative shift: each shift is then a view
        at_slab = np.ravel_multi_index(tuple((inside + lo + pad).T), target.shape) + shifts.min()
        views = shifts - shifts.min()
        normalized = self._config.patch_normalization
        if normalized:
            fixed_mean, fixed_std = (m.reshape(-1)[at_box] for m in _local_moments(fixed, size))
        radii = np.concatenate([[0], self._patch])  # no sums across the stack

        def search_one(warped: np.ndarray) -> np.ndarray:
            lowest = np.full(len(inside), np.inf, dtype=np.float32)
            index = np.zeros(lowest.size, dtype=np.min_scalar_type(len(search) - 1))
            better = np.empty(lowest.size, dtype=bool)
            stack = np.empty((block, *fixed.shape), dtype=np.float32)
            if normalized:
                mean, std = (m.reshape(-1) for m in _local_moments(warped, size))
            for first in range(0, len(search), block):
                offsets = search[first : first + block].tolist()
                n = len(offsets)
                for j, offset in enumerate(offsets):
                    if normalized:
                        np.multiply(warped[box(offset)], fixed, out=stack[j])
                    else:
                        np.subtract(warped[box(offset)], fixed, out=stack[j])
                if not normalized:
                    np.square(stack[:n], out=stack[:n])
                sums = _window_sums(stack[:n], radii).take(at_sums[:n])  # offset in the block × centre
                if normalized:  # minus the correlation of the two patches
                    at = at_slab + views[first : first + n, None]
                    cost = (fixed_mean * mean.take(at) - sums * scale) / (fixed_std * std.take(at))
                else:
                    cost = sums
                for j, row in enumerate(cost):  # as one by one, nearest first: a tie keeps the nearer
                    np.less(row, lowest, out=better)
                    np.copyto(lowest, row, where=better)
                    np.copyto(index, first + j, where=better)
            return index

        threads = min(len(intensities), self._threads)
        if threads < 2:
            return [search_one(warped) for warped in intensities]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(search_one, intensities))

    def _weights(self, target, intensities, base, centres, steps) -> np.ndarray:
        """The candidates' weights (voxel × candidate, summing to 1) at the centre voxels whose flat indices into
        the slab's padded arrays are ``base``; ``centres``: per candidate, the flat index of its best patch."""
        config = self._config
        n = len(intensities)
        fixed = np.take(target, base[:, None] + steps)
        if config.patch_normalization:
            fixed = _standardised(fixed)
        differences = np.empty((len(base), n, len(steps)), dtype=np.float32)
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
        return w

    def _chunk_votes(self, labels, centres, w, patch, steps, voxels, undecided) -> tuple[int, dict, np.ndarray]:
        """The votes of one chunk: each candidate's weight ``w`` at the centre ``voxels`` for its labels (read at
        ``centres``, flat indices into the slab's padded arrays, plus ``steps``) at the undecided voxels of the
        patch around the centre (with ``patch_voting``; else at the centre alone). Returns the first voxel (flat
        index) the chunk votes at, and from there on, per label value, the sum of its votes at each voxel and
        the number of patches that vote there. What depends on the patch offset alone (where its voxels are,
        which take votes, the labels shown there) is found for every offset at once; the votes are then added
        offset by offset, on arrays of centre × candidate that stay in the processor's cache."""
        if not self._config.patch_voting:
            patch, steps = patch[:1], steps[:1]
        shape = np.asarray(self._target.shape)
        at = voxels + patch[:, None, :]  # patch offset × centre → voxel (array coordinates)
        inside = np.all((at >= 0) & (at < shape), axis=2)
        flat = np.ravel_multi_index(tuple(np.moveaxis(np.clip(at, 0, shape - 1), 2, 0)), self._target.shape)
        keep = inside & undecided.reshape(-1)[flat]
        if not keep.any():
            return 0, {}, np.zeros(0, dtype=np.float32)
        first = int(flat[keep].min())
        size = int(flat[keep].max()) + 1 - first
        flat -= first
        # patch offset × centre × candidate: the label each candidate shows there
        shown = np.stack([np.take(a.reshape(-1), c + steps[:, None]) for a, c in zip(labels, centres)], axis=2)
        sums: dict[int, np.ndarray] = {}
        covered = np.zeros(size, dtype=np.float32)
        ones = np.ones(len(labels))  # a product with it sums each centre's row (faster than .sum(axis=1))
        for k in range(len(patch)):
            rows = np.flatnonzero(keep[k])
            if not rows.size:
                continue
            # (take: several times faster than fancy indexing for these row gathers)
            here = flat[k].take(rows)  # distinct: one offset maps distinct centres to distinct voxels
            seen, weights = shown[k].take(rows, axis=0), w.take(rows, axis=0)
            for value in _present(seen):
                if value not in sums:
                    sums[value] = np.zeros(size, dtype=np.float32)
                sums[value][here] += np.where(seen == value, weights, 0.0) @ ones
            covered[here] += 1.0
        return first, sums, covered


def _window_sums(array: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Sums of ``array`` (C-contiguous, float32) over boxes of ``2 * radii + 1`` voxels per axis, flat: element
    q holds the sum over the box whose first voxel has flat index q in ``array``, for every box that fits
    (later elements mix rows; the array ends at the last box that fits). One axis after the other, each a
    running sum of shifted views of the whole flat array: long loops rather than one per short row, no
    padding, no float64 copy (cheaper than ``ndimage.uniform_filter``), the input left as it was."""
    flat = array.reshape(-1)
    for r, step in zip(radii.tolist(), (stride // array.itemsize for stride in array.strides)):
        if r:
            n = flat.size - 2 * r * step
            total = flat[:n] + flat[step : step + n]
            for k in range(2, 2 * r + 1):
                total += flat[k * step : k * step + n]
            flat = total
    return flat


def _present(labels: np.ndarray) -> list[int]:
    """The distinct values of an integer array (counted, which is faster than sorting, for 1- and 2-byte
    unsigned labels)."""
    if labels.dtype.kind == "u" and labels.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(labels.reshape(-1))).tolist()
    return np.unique(labels).tolist()


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
    """Each row scaled to zero mean and unit variance (a flat row stays zero: its variance is floored)."""
    centred = patches - patches.mean(axis=1, keepdims=True)
    return centred / np.sqrt(floored((centred * centred).mean(axis=1, keepdims=True)))


def _local_moments(array: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (its variance floored like :func:`_standardised`'s) in a cube of ``size``."""
    mean, variance = local_moments(array, size)
    return mean, np.sqrt(floored(variance))


# auto radii: structures this many voxels of the finest axis across (equivalent-sphere diameter) or larger get
# the larger patch and search. Measured (benchmarks/fusion.py, same candidates): hippocampus (~15 voxels across)
# loses with radii 3 / 5 or more, cardiac (~25) and abdominal organs (>= 54) gain with them.
_LARGE_STRUCTURE_VOXELS = 20.0
_RADII = {False: {"patch_radius": 2, "search_radius": 3}, True: {"patch_radius": 3, "search_radius": 5}}


def auto_radii(labels: np.ndarray, spacing: np.ndarray) -> dict[str, int]:
    """``patch_radius`` and ``search_radius`` (voxels of the finest axis) for a label map whose axes have
    ``spacing`` (mm, array order): 2 and 3 (ANTs' defaults) for small structures, 3 and 5 where the smallest
    non-zero label spans at least ``_LARGE_STRUCTURE_VOXELS`` voxels of the finest axis (the diameter of the
    ball, or disc in 2D, of its area or volume): a patch of 5 voxels is then a small part of every structure,
    a 7-voxel one describes its boundary better, and the residual misregistration, which grows with the
    structure, needs the wider search. Empty labels: the small radii."""
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False))[1:]
    counts = counts[counts > 0]
    if not counts.size:
        return dict(_RADII[False])
    measure = counts.min() * float(np.prod(spacing))  # mm² or mm³
    dimension = labels.ndim
    diameter = 2 * (measure / math.pi) ** 0.5 if dimension == 2 else (6 * measure / math.pi) ** (1 / 3)
    return dict(_RADII[diameter / float(spacing.min()) >= _LARGE_STRUCTURE_VOXELS])


def voxel_radii(radius: int, spacing: np.ndarray) -> np.ndarray:
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


def _ahead(pool: ThreadPoolExecutor, function, items, depth: int):
    """``map(function, items)`` run in ``pool``, at most ``depth`` items ahead of the one yielded (memory stays
    bounded), in order."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
