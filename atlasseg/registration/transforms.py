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

import numpy as np
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


def jacobian_determinant(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Jacobian determinant of ``transform`` sampled on ``reference``'s grid (float32).

    Central differences inside, one-sided at the borders (exact for an affine map
    everywhere). The displacement vectors are physical while differences run along the
    grid's axes: they are first expressed in the grid's axes (u' = Dᵀ u, for direction D),
    so det(I + Dᵀ (du/dx) D) = det(I + du/dx) on oblique and flipped grids alike.
    (ITK's DisplacementFieldJacobianDeterminant misses that rotation and pads the borders.)
    """
    dim = reference.GetDimension()
    direction = np.asarray(reference.GetDirection()).reshape(dim, dim)
    local = sitk.GetArrayFromImage(displacement_field(transform, reference)) @ direction  # (..., component)
    spacing = reference.GetSpacing()[::-1]  # numpy axis order
    jacobian = np.empty(local.shape + (dim,))
    for axis in range(dim):  # numpy axis `axis` is grid axis dim − 1 − axis
        jacobian[..., dim - 1 - axis] = np.gradient(local, spacing[axis], axis=axis, edge_order=1)
    jacobian += np.eye(dim)
    out = sitk.GetImageFromArray(_determinant(jacobian).astype(np.float32))
    out.CopyInformation(reference)
    return out


def _determinant(m: np.ndarray) -> np.ndarray:
    """Determinants of a stack of 2×2 or 3×3 matrices (last two axes), written out: many times
    faster than ``np.linalg.det``, which factorises each small matrix on its own."""
    if m.shape[-1] == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    return (
        m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
        - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
        + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0])
    )
