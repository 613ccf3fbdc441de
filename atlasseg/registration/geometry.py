"""What an image's geometry says before any registration: whether it is a scan of a body region or a crop
round the anatomy (which stages adapt to), and its field of view as an image."""

from __future__ import annotations

import SimpleITK as sitk

BODY_SCAN_MM = 160.0


def body_scan(image: sitk.Image) -> bool:
    """Whether ``image`` is a scan of a body region (its longest extent at least 160 mm) rather than a crop round
    its anatomy: only there do the affine's translation search and local normalisation apply, and the demons'
    LNCC force at coarse levels (``demons_force: auto``). An operator places a
    scan's field of view over a region, so two scans' centres can sit centimetres apart on the anatomy, and coil
    shading varies across it over decimetres; a crop a few centimetres wide (a hippocampus box) is centred by
    whoever cropped it and has no shading to remove (measured: the search alone cost hippocampus 0.001 Dice)."""
    return max(n * s for n, s in zip(image.GetSize(), image.GetSpacing())) >= BODY_SCAN_MM


def domain(image: sitk.Image) -> sitk.Image:
    """1 (uint8) at every voxel of ``image``, on its grid: its field of view, to resample into another grid."""
    inside = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(image)
    return inside
