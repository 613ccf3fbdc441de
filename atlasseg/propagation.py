"""Carrying atlas labels (and intensities) into target space."""

from __future__ import annotations

import SimpleITK as sitk

_LABEL_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor}


def propagate_labels(
    labels: sitk.Image, transform: sitk.Transform, reference: sitk.Image, *, interpolator: str = "nearest"
) -> sitk.Image:
    """Resample a label map onto ``reference``'s grid through ``transform`` (fixed → moving points).

    Label values are never mixed: only label-preserving interpolators exist here.
    Voxels mapped outside the atlas get background (0). The pixel type is kept.
    """
    return sitk.Resample(labels, reference, transform, _LABEL_INTERPOLATORS[interpolator], 0, labels.GetPixelID())



def propagate_intensities(image: sitk.Image, transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Resample an intensity image onto ``reference``'s grid with linear interpolation (float32)."""
    return sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
