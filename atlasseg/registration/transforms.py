"""Transforms on disk and in composition.

Every transform atlasseg produces maps fixed-space (target) points to moving-space
(atlas) points, in mm and ITK's LPS convention — what ``SimpleITK.Resample`` and
ANTs' ``antsApplyTransforms`` expect. Transforms are saved as ITK transform files
(``.h5``, ``.tfm``, ``.txt``, ``.mat``) or, for the whole mapping sampled on an image
grid, as a displacement-field image (NIfTI, NRRD, MetaImage): vectors ``T(x) − x`` in
physical LPS components, the convention of ITK's ``DisplacementFieldTransform``.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from ..errors import RegistrationError
from ..imageio import atomic_write

TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat", ".xfm")
FIELD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def compose(*transforms: sitk.Transform) -> sitk.CompositeTransform:
    """``compose(a, b, c)(x) = a(b(c(x)))``: the last one is applied first (ITK's order).

    Nested composites are flattened, so the result saves as one flat ``.h5`` that other ITK tools read.
    """
    if not transforms:
        raise RegistrationError("compose needs at least one transform")
    flat: list[sitk.Transform] = []
    for transform in transforms:
        if isinstance(transform, sitk.CompositeTransform):
            flat.extend(transform.GetNthTransform(i) for i in range(transform.GetNumberOfTransforms()))
        else:
            flat.append(transform)
    return sitk.CompositeTransform(flat)


def save_transform(transform: sitk.Transform, path: str | Path) -> None:
    """Write an ITK transform file atomically (the format follows the extension)."""
    path = Path(path)
    if _suffix(path) not in TRANSFORM_SUFFIXES:
        raise RegistrationError(f"{path}: unknown transform file type (use one of {', '.join(TRANSFORM_SUFFIXES)})")
    atomic_write(path, lambda tmp: sitk.WriteTransform(transform, tmp), what="transform")


def displacement_field(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """``transform`` sampled on ``reference``'s grid: vectors ``T(x) − x`` (mm, LPS, float64)."""
    return sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )


def save_displacement_field(transform: sitk.Transform, reference: sitk.Image, path: str | Path) -> None:
    """Write ``transform`` sampled on ``reference``'s grid as a displacement-field image (float32 vectors)."""
    field = sitk.Cast(displacement_field(transform, reference), sitk.sitkVectorFloat32)
    atomic_write(path, lambda tmp: sitk.WriteImage(field, tmp, useCompression=True), what="displacement field")


def load_transform(path: str | Path) -> sitk.Transform:
    """Read a transform file, or a displacement-field image as a ``DisplacementFieldTransform``."""
    path = Path(path)
    if not path.is_file():
        raise RegistrationError(f"{path}: transform file not found")
    suffix = _suffix(path)
    try:
        if suffix in FIELD_SUFFIXES:
            field = sitk.ReadImage(str(path))
            if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
                raise RegistrationError(
                    f"{path}: a displacement field needs {field.GetDimension()} components per voxel, "
                    f"found {field.GetNumberOfComponentsPerPixel()}"
                )
            return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        return sitk.ReadTransform(str(path))
    except RuntimeError as err:
        raise RegistrationError(f"{path}: cannot read transform ({str(err).strip().splitlines()[-1][:200]})") from None
