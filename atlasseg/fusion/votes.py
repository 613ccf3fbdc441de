"""Majority, global and local weighted votes, streamed."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..config import FusionConfig
from ..similarity import negative_mse, standardized
from .base import Fuser

_EPSILON = 1e-4  # floor of a squared intensity difference (intensities normalised to [0, 1])


class WeightedVote(Fuser):
    """Majority, global or local weighted vote, streamed: memory is one float32 map per label value.

    Parameters
    ----------
    reference : SimpleITK.Image
        The target, intensities normalised like the atlases (used by intensity weights).
    config : FusionConfig
        Method and its parameters.
    """

    @classmethod
    def uses_intensities(cls, method: str) -> bool:
        """The weighted votes weigh candidates by their warped intensities; the majority vote does not."""
        return method in _WEIGHTS

    def add(self, candidate: sitk.Image, intensities: sitk.Image | None = None) -> None:
        """Add one candidate (labels on the target grid) and, for intensity weights, its warped image."""
        self._check(candidate, intensities)
        weight = np.float32(1.0)
        if self.needs_intensities:
            weight = _WEIGHTS[self._config.method](
                self._target, sitk.GetArrayViewFromImage(intensities), self._config, self._reference
            )
        self._vote(sitk.GetArrayViewFromImage(candidate), weight)


def _squared_difference(target, warped, config: FusionConfig) -> np.ndarray:
    """Per voxel, the squared difference of ``config.metric``'s intensities (float32)."""
    target, warped = INTENSITIES[config.metric](target), INTENSITIES[config.metric](warped)
    return ((target - warped) ** 2).astype(np.float32)


def _global_weight(target, warped, config: FusionConfig, reference) -> np.float32:
    """The inverse mean squared difference of ``config.metric``'s intensities, to the power ``gain``."""
    compared = INTENSITIES[config.metric]
    return np.float32(max(-negative_mse(compared(target), compared(warped)), _EPSILON) ** -config.gain)


def _local_weight(target, warped, config: FusionConfig, reference) -> np.ndarray:
    squared = sitk.GetImageFromArray(_squared_difference(target, warped, config))
    squared.CopyInformation(reference)
    local = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(squared, config.sigma))
    return (np.maximum(local, _EPSILON) ** -config.gain).astype(np.float32)


_WEIGHTS = {"global_weighted": _global_weight, "local_weighted": _local_weight}
INTENSITIES = {"mse": np.asarray, "nmse": standardized}  # what fusion.metric compares
