"""nibabel images ↔ SimpleITK images: the one place where their conventions meet.

nibabel describes a voxel grid by a 4 × 4 affine from voxel indices (i, j, k) to RAS+ world
coordinates (x grows towards the patient's Right, y Anterior, z Superior) and holds voxels in
index order ``[i, j, k]``. SimpleITK describes it by origin, spacing and direction
cosines in LPS+ (x grows to the Left, y Posterior, z Superior) and holds voxels in array order
``[k, j, i]``. The same grid therefore has

    affine_RAS = diag(-1, -1, 1, 1) · [[D · diag(spacing), origin], [0, 1]]

with ``D`` the direction matrix (columns: the world direction of each index axis). Every
conversion in atlasseg goes through :func:`affine_from_grid` and :func:`grid_from_affine`;
FreeSurfer MGH/MGZ files (which ITK cannot read) are read and written through them.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageError

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
MGH_SUFFIXES = (".mgh", ".mgz")

#: Largest deviation of a direction matrix's DᵀD from the identity still taken as orthonormal (float32 headers).
ORTHONORMAL_TOLERANCE = 1e-4


def affine_from_grid(spacing, origin, direction) -> np.ndarray:
    """nibabel's 4 × 4 RAS affine of a SimpleITK grid (2D grids lie in the z = 0 plane, spacing 1 along z)."""
    n = len(spacing)
    lps = np.eye(4)
    lps[:n, :n] = np.asarray(direction, float).reshape(n, n) * np.asarray(spacing, float)
    lps[:n, 3] = origin
    return _LPS_FROM_RAS @ lps


def grid_from_affine(affine, dimension: int = 3) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) in SimpleITK's LPS convention of a nibabel RAS affine.

    Raises ``ValueError`` for an affine whose axes are not orthogonal (a shear SimpleITK cannot
    represent) or that collapses an axis.
    """
    lps = _LPS_FROM_RAS @ np.asarray(affine, float)
    axes = lps[:dimension, :dimension]
    spacing = np.linalg.norm(axes, axis=0)
    if not np.all(spacing > 0):
        raise ValueError(f"the affine gives an axis zero length (voxel sizes {spacing.round(6).tolist()})")
    direction = axes / spacing
    if np.abs(direction.T @ direction - np.eye(dimension)).max() > ORTHONORMAL_TOLERANCE:
        raise ValueError(
            "the affine shears the voxel axes (not orthogonal); resample the image onto an orthogonal grid"
        )
    return tuple(spacing.tolist()), tuple(lps[:dimension, 3].tolist()), tuple(direction.ravel().tolist())


def from_nibabel(image) -> sitk.Image:
    """A SimpleITK image of a nibabel spatial image (NIfTI, MGH, ...): voxels as stored, geometry in LPS.

    A 4th axis of length 1 is dropped; a longer one becomes the voxel components (a vector image).
    """
    array = np.asanyarray(image.dataobj)
    array = array.astype(array.dtype.newbyteorder("="), copy=False)  # MGH is big-endian; SimpleITK takes native order
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    spatial = min(array.ndim, 3)
    vector = array.ndim > spatial
    out = sitk.GetImageFromArray(
        np.ascontiguousarray(np.moveaxis(array, range(spatial), range(spatial)[::-1])), isVector=vector
    )
    spacing, origin, direction = grid_from_affine(image.affine, spatial)
    out.SetSpacing(spacing)
    out.SetOrigin(origin)
    out.SetDirection(direction)
    return out


def to_nibabel(image: sitk.Image, kind=None):
    """A nibabel image (``kind``: a nibabel image class, default ``Nifti1Image``) of a SimpleITK image."""
    import nibabel

    return (kind or nibabel.Nifti1Image)(*_indexed(image))


def _indexed(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(voxels in index order [i, j, k(, component)], RAS affine) of a SimpleITK image."""
    dimension = image.GetDimension()
    array = np.moveaxis(sitk.GetArrayFromImage(image), range(dimension), range(dimension)[::-1])
    return array, affine_from_grid(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def is_mgh(path: Path) -> bool:
    """True for a FreeSurfer ``.mgh`` / ``.mgz`` file name."""
    return Path(path).name.lower().endswith(MGH_SUFFIXES)


def _load(path: Path):
    import nibabel

    try:
        return nibabel.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error, ... on damaged files
        raise ImageError(f"{path}: cannot read MGH image ({_reason(err)})") from None


def read_mgh(path: str | Path) -> sitk.Image:
    """A FreeSurfer MGH/MGZ file as a SimpleITK image (voxels as stored, geometry converted to LPS)."""
    path = Path(path)
    image = _load(path)
    try:
        return from_nibabel(image)
    except Exception as err:  # truncated data, or an affine SimpleITK cannot hold
        raise ImageError(f"{path}: cannot read MGH image ({_reason(err)})") from None


def mgh_grid(path: str | Path) -> tuple[tuple[int, ...], tuple, tuple, tuple, int]:
    """(size, spacing, origin, direction, components) of an MGH/MGZ file from its header alone."""
    path = Path(path)
    image = _load(path)
    components = image.shape[3] if len(image.shape) > 3 else 1
    try:
        return (tuple(int(s) for s in image.shape[:3]), *grid_from_affine(image.affine, 3), components)
    except ValueError as err:
        raise ImageError(f"{path}: cannot read MGH image ({err})") from None


def stored_spacing(path: str | Path) -> tuple[str, tuple[float, ...]] | None:
    """(header field, voxel sizes as the file stores them) of a NIfTI or MGH file, else None (also for a header too
    damaged to parse: the readers then say why).

    The readers replace what is not physical behind the caller's back: ITK's NIfTI reader (niftilib) takes a zero
    or NaN ``pixdim`` as 1 mm and a negative one as its absolute value with the axis mirrored, and nibabel's NIfTI
    header check does the same; a negative MGH ``delta`` becomes a mirrored axis of the affine. So the bytes are
    read here: NIfTI-1 and -2 (``dim`` and ``pixdim`` at their fixed offsets, either byte order), MGH (big-endian
    ``delta`` after the dimensions, type, dof and RAS flag).
    """
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith((".gz", ".mgz")) else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(max(_NIFTI_LAYOUTS))  # the longer (NIfTI-2) header
        if is_mgh(path):
            return "delta", struct.unpack_from(">3f", head, 30)
        for size, (dims_at, dim_type, pixdim_at, pixdim_type) in _NIFTI_LAYOUTS.items():
            for order in "<>":
                if struct.unpack_from(order + "i", head, 0)[0] == size:
                    axes = min(max(struct.unpack_from(order + dim_type, head, dims_at)[0], 1), 3)
                    first = pixdim_at + struct.calcsize(pixdim_type)  # pixdim[1]: pixdim[0] is qfac
                    return "pixdim", struct.unpack_from(f"{order}{axes}{pixdim_type}", head, first)
    except (OSError, EOFError, struct.error, zlib.error):  # damaged: reported by the readers
        return None
    return None


# NIfTI header size → (offset of dim[0], its type, offset of pixdim[0], its type).
_NIFTI_LAYOUTS = {348: (40, "h", 76, "f"), 540: (16, "q", 104, "d")}


def write_mgh(image: sitk.Image, path: str | Path) -> None:
    """Write a 3D SimpleITK image as MGH (``.mgz``: compressed); a voxel type MGH lacks is widened."""
    import nibabel

    if image.GetDimension() != 3:
        raise ImageError(f"{path}: MGH holds 3D images; write this {image.GetDimension()}D image as .nii.gz")
    array, affine = _indexed(image)
    nibabel.save(nibabel.MGHImage(array.astype(_mgh_type(array), copy=False), affine), str(path))


def _mgh_type(values: np.ndarray) -> np.dtype:
    """The MGH voxel type holding ``values`` exactly (float64 is rounded to float32): MGH stores uint8, int16,
    int32 and float32 voxels, and uint16 with a recent nibabel."""
    from nibabel.freesurfer.mghformat import data_type_codes

    if values.dtype in {np.dtype(t).newbyteorder("=") for t in data_type_codes.value_set("dtype")}:
        return values.dtype
    if values.dtype.kind == "f":
        return np.dtype("float32")
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for candidate in ("int16", "int32"):
        if np.iinfo(candidate).min <= lo and hi <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    raise ImageError(f"values {lo}..{hi} do not fit MGH's 32-bit integers; write .nii.gz or .nrrd instead")


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
