"""The fuser interface, and the per-voxel vote the fusers share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..config import FusionConfig
from ..errors import AtlassegError
from ..imageio import Geometry, same_grid
from ..parallel import available_cores
from .postprocess import postprocess


class Fuser:
    """The interface of every fusion method, and the per-voxel vote accumulator over label values that they
    share (the label with the most weight wins).

    A fuser takes candidates one by one (``add``: labels on the target grid, and the warped intensities when
    :attr:`needs_intensities`), then gives ``result`` and ``probabilities``. Before one is made, its class says
    whether a method needs intensities (:meth:`uses_intensities`) and what it will take
    (:meth:`estimate_bytes`, :meth:`estimate_disk_bytes`): what the pipeline's memory and disk checks ask.
    """

    title = "fusion"  # how messages name the method

    @classmethod
    def uses_intensities(cls, method: str) -> bool:
        """Whether fusion ``method`` (one this class implements) needs the warped atlas intensities."""
        return False

    @classmethod
    def estimate_bytes(cls, geometry: Geometry, n_candidates: int) -> int:
        """Rough peak memory (bytes) the method keeps for ``n_candidates`` on ``geometry``'s grid beyond the
        vote maps (a float32 map per label value, which the pipeline counts)."""
        return 0

    @classmethod
    def estimate_disk_bytes(cls, geometry: Geometry, n_candidates: int) -> int:
        """Bytes of temporary files (in ``TMPDIR``) the method writes for ``n_candidates`` on ``geometry``'s grid."""
        return 0

    def __init__(
        self,
        reference: sitk.Image,
        *,
        config: FusionConfig,
        threads: int | None = None,
        spill_folder: Path | None = None,
    ):
        """``threads`` and ``spill_folder`` are what the caller lends the fuser (those that use them say so):
        its threads (None: every available core), and the folder for candidates it cannot keep in memory
        (None: a fresh temporary folder in ``TMPDIR``)."""
        self._reference = reference
        self._config = config
        self._threads = available_cores() if threads is None else max(1, int(threads))
        self._spill_folder = spill_folder
        self._target = sitk.GetArrayViewFromImage(reference).astype(np.float32)
        self._votes: dict[int, np.ndarray] = {}
        self._pixel_id = None
        self.n_candidates = 0

    @property
    def chosen(self) -> dict:
        """Settings this fuser chose from the data (config ``auto`` values resolved), for the target's record."""
        return {}

    @property
    def needs_intensities(self) -> bool:
        """Whether ``add`` needs the warped atlas intensities."""
        return self.uses_intensities(self._config.method)

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
            sigma = (
                self._config.probability_sigma / np.asarray(self._reference.GetSpacing())[::-1]
            )  # voxels, array order
            maps = {
                v: self._image(ndimage.gaussian_filter(sitk.GetArrayViewFromImage(m), sigma), sitk.sitkFloat32)
                for v, m in maps.items()
            }
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


def _wider(current, pixel_id):
    """The integer pixel type that can hold both (candidates may come in different types)."""
    if current is None or current == pixel_id:
        return pixel_id
    order = [sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkInt64]
    rank = {p: i for i, p in enumerate(order)}
    return order[max(rank.get(current, len(order) - 1), rank.get(pixel_id, len(order) - 1))]
