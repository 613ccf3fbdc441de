"""Reading and writing images with their physical geometry; atomic file output."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import nibabel_io
from .errors import AtlassegError, ImageError

log = logging.getLogger("atlasseg")

_INTEGER_TYPES = {
    sitk.sitkUInt8,
    sitk.sitkInt8,
    sitk.sitkUInt16,
    sitk.sitkInt16,
    sitk.sitkUInt32,
    sitk.sitkInt32,
    sitk.sitkUInt64,
    sitk.sitkInt64,
}


def _read(path: Path) -> sitk.Image:
    path = Path(path)
    source = _source(path)
    if not isinstance(source, list):  # a DICOM series' grid is checked on the image: its header is many files
        read_geometry(path)  # the header's grid, before the reader turns a bad spacing into a plausible one
    if nibabel_io.is_mgh(path):
        return nibabel_io.read_mgh(path)
    try:
        image = sitk.ReadImage(source)
    except RuntimeError as err:
        raise _read_error(path, err) from None
    if isinstance(source, list):
        check_geometry(Geometry.of(image), path)
    return image


def _source(path: Path) -> str | list[str]:
    """What SimpleITK reads for ``path``: the file itself, or the files of the DICOM series it names."""
    if path.is_dir() or names_dicom_series(path):
        return dicom_files(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty")
    return str(path)


_SERIES_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


def names_dicom_series(path: Path) -> bool:
    """True for a path shaped ``FOLDER/<SeriesInstanceUID>`` that is no file: one DICOM series of a folder
    holding several (:func:`dicom_files` checks that the folder holds it)."""
    path = Path(path)
    return not path.exists() and bool(_SERIES_UID.fullmatch(path.name)) and path.parent.is_dir()


def dicom_files(path: Path) -> list[str]:
    """The files, in slice order, of the DICOM series in folder ``path`` (which must hold exactly one),
    or of the series ``path`` names as ``FOLDER/<SeriesInstanceUID>``."""
    path = Path(path)
    folder, chosen = (path, None) if path.is_dir() else (path.parent, path.name)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if chosen is None and not series:
        raise ImageError(f"{path}: is a directory holding no DICOM series (expected an image file or a DICOM folder)")
    if chosen is None and len(series) > 1:
        listing = "; ".join(_describe_series(folder, uid) for uid in series)
        raise ImageError(f"{path}: holds {len(series)} DICOM series ({listing}); name one as {path}/<series UID>")
    if chosen is not None and chosen not in series:
        raise ImageError(f"{path}: file not found (nor a DICOM series of {folder})")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen or series[0]))


def _describe_series(folder: Path, uid: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
        description = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        description = ""
    return f"{uid}{f' {description!r}' if description else ''}, {len(files)} files"


def _read_error(path: Path, err: RuntimeError) -> ImageError:
    """SimpleITK's multi-line exception as one line naming the file."""
    reason = str(err).strip().splitlines()
    detail = next((line for line in reason if "Exception" not in line and line.strip()), "unreadable")
    if "orthonormal direction cosines" in detail:
        return ImageError(
            f"{path}: header fields sform and qform give no orthonormal direction (the voxel axes are "
            "sheared); resample the image onto an orthogonal grid"
        )
    if "Unable to determine ImageIO reader" in detail:
        return ImageError(
            f"{path}: cannot read image (no reader recognises it: damaged, not an image, or a wrong extension; "
            "use .nii.gz, .nrrd, .mha, .mgz or a DICOM folder)"
        )
    return ImageError(f"{path}: cannot read image ({detail.strip()[:200]})")


def check_scalar(image, path) -> None:
    """Refuse a vector image, or one that is not 2D/3D (an image, or a header's :class:`Geometry`)."""
    grid = image if isinstance(image, Geometry) else Geometry.of(image)
    if grid.components != 1:
        raise ImageError(
            f"{path}: has {grid.components} components per voxel; a scalar image is needed (extract one channel first)"
        )
    if grid.dimension not in (2, 3):
        raise ImageError(
            f"{path}: is {grid.dimension}D (size {grid.size}); 2D and 3D images are "
            "supported (extract one volume first)"
        )


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz")) and path.is_file()


def read_voxels(path: str | Path) -> np.ndarray:
    """The voxels of a whole scalar 2D/3D image file, exactly as stored (any axis order).

    NIfTI is read with nibabel: SimpleITK reads a truncated NIfTI without complaint (the
    missing voxels become 0) and turns NaN and infinities into 0 (ITK before 6), while
    nibabel reads the bytes as they are and fails on a short file. :func:`atlasseg.pipeline.check_inputs`
    runs these checks once per file before any work.
    """
    path = Path(path)
    if not _is_nifti(path):
        image = _read(path)
        check_scalar(image, path)
        return sitk.GetArrayFromImage(image)
    check_scalar(read_geometry(path), path)
    import nibabel

    try:
        return np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as err:  # nibabel raises OSError, EOFError, zlib.error, ValueError, ... on damaged files
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ImageError(f"{path}: truncated or corrupt NIfTI file ({detail}); re-export or re-download it") from None


def voxel_fingerprint(path: str | Path, values: np.ndarray) -> tuple:
    """A cheap fingerprint of an image's voxel values, given as :func:`read_voxels` returns them: its shape, least
    and largest value and 64 values at fixed places, in SimpleITK's array order (so the same for one image stored
    in any format or voxel type). Equal images have equal fingerprints; :func:`same_voxels` settles the rest."""
    array = np.asarray(values)
    if _is_nifti(Path(path)):  # nibabel's index order [i, j, k(, 1)]
        while array.ndim > 3 and array.shape[-1] == 1:
            array = array[..., 0]
        array = array.T
    places = np.unravel_index(np.linspace(0, array.size - 1, 64).astype(np.int64), array.shape)
    return array.shape, float(array.min()), float(array.max()), tuple(array[places].astype(np.float64).tolist())


def same_voxels(a: sitk.Image, b: sitk.Image) -> bool:
    """True when two images (as :func:`read_image` returns them) hold the same voxel values on the same array shape."""
    first, second = (sitk.GetArrayViewFromImage(image) for image in (a, b))
    return first.shape == second.shape and bool(np.array_equal(first, second))


def check_intensities(path: str | Path, values: np.ndarray) -> None:
    """Refuse NaN/infinite or constant intensities (nothing to register), naming the file."""
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ImageError(
            f"{path}: holds {bad} NaN or infinite intensities; replace them (e.g. with 0 outside the body)"
        )
    lo, hi = (float(values.min()), float(values.max())) if np.size(values) else (0.0, 0.0)
    if lo == hi:
        raise ImageError(f"{path}: every voxel is {lo:g} (a constant image has nothing to register); wrong file?")


def check_label_values(path: str | Path, values: np.ndarray) -> np.ndarray:
    """The label values present (0 included), after refusing non-integer and negative values."""
    if values.dtype.kind == "f" and (not np.isfinite(values).all() or not np.array_equal(values, np.round(values))):
        raise ImageError(f"{path}: label map holds non-integer values; labels must be whole numbers")
    present = np.unique(values)
    if present.size and present[0] < 0:
        raise ImageError(
            f"{path}: label map holds negative values ({present[0]:g}); labels must be >= 0 (0 is background)"
        )
    return present.astype(np.int64)


def read_image(path: str | Path) -> sitk.Image:
    """Read an intensity image as float32, geometry intact (:func:`as_intensities`)."""
    return as_intensities(_read(Path(path)), Path(path))


def as_intensities(image: sitk.Image, name) -> sitk.Image:
    """A scalar 2D/3D image as float32 intensities, geometry intact; ``name`` (its file, or the argument that held
    it) names it in errors."""
    check_scalar(image, name)
    image = sitk.Cast(image, sitk.sitkFloat32)
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise ImageError(f"{name}: holds NaN or infinite intensities")
    return image


def read_labels(path: str | Path, *, like=None, like_path=None) -> sitk.Image:
    """Read a label map as an integer image (:func:`as_labels`)."""
    return as_labels(_read(Path(path)), Path(path), like=like, like_path=like_path)


def as_labels(image: sitk.Image, name, *, like=None, like_path=None) -> sitk.Image:
    """A label map as an integer image; a floating-point one must hold whole numbers. ``name`` (its file, or the
    argument that held it) names it in errors. ``image`` itself is left as it was.

    With ``like`` (the image it belongs to, or its :class:`Geometry`), a grid that differs from it by floating-point
    noise only is snapped onto it (see :func:`check_same_grid`); a larger difference is an error naming
    ``like_path``.
    """
    check_scalar(image, name)
    if like is not None:
        image = sitk.Image(image)  # SimpleITK copies on write: the caller's image keeps its grid
        snap_grid(image, like, path=name, like_path=like_path)
    if image.GetPixelID() in _INTEGER_TYPES:
        return image
    values = sitk.GetArrayViewFromImage(image)
    check_label_values(name, values)
    lo, hi = float(values.min()), float(values.max())
    target = sitk.sitkUInt8 if lo >= 0 and hi <= 255 else sitk.sitkUInt16 if lo >= 0 and hi <= 65535 else sitk.sitkInt32
    return sitk.Cast(image, target)


@dataclass(frozen=True)
class Geometry:
    """The physical grid of an image: voxel count, spacing (mm), origin (mm), direction cosines."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1

    @classmethod
    def of(cls, image) -> "Geometry":
        """Geometry of a ``SimpleITK.Image`` (or of a reader after ``ReadImageInformation``)."""
        components = (
            image.GetNumberOfComponents()
            if isinstance(image, sitk.ImageFileReader)
            else image.GetNumberOfComponentsPerPixel()
        )
        return cls(
            tuple(image.GetSize()),
            tuple(image.GetSpacing()),
            tuple(image.GetOrigin()),
            tuple(image.GetDirection()),
            components,
        )

    @property
    def dimension(self) -> int:
        return len(self.size)

    def describe(self) -> str:
        return f"size {self.size}, spacing {_fmt(self.spacing)}, origin {_fmt(self.origin)}"


def read_geometry(path: str | Path) -> Geometry:
    """Geometry of an image file (or DICOM series) from its header alone (the voxels are not read), after
    :func:`check_geometry`."""
    path = Path(path)
    source = _source(path)
    stored = nibabel_io.stored_spacing(path) if _is_nifti(path) or nibabel_io.is_mgh(path) else None
    if stored is not None:
        _check_spacing(stored[1], path, stored[0])
    if nibabel_io.is_mgh(path):
        geometry = Geometry(*nibabel_io.mgh_grid(path))
    elif isinstance(source, list):
        geometry = _series_geometry(path, source)
    else:
        geometry = Geometry.of(_header(path, source))
    check_geometry(geometry, path)
    return geometry


# The header fields that hold (voxel spacing, direction cosines), by file name ending.
_HEADER_FIELDS = {
    (".nii", ".nii.gz"): ("pixdim", "sform/qform"),
    (".mha", ".mhd"): ("ElementSpacing", "TransformMatrix"),
    (".nrrd", ".nhdr"): ("space directions (or spacings)", "space directions"),
    nibabel_io.MGH_SUFFIXES: ("delta", "Mdc"),
}


def _header_fields(path: Path) -> tuple[str, str]:
    name = path.name.lower()
    found = next((fields for endings, fields in _HEADER_FIELDS.items() if name.endswith(endings)), None)
    if found is None and (path.is_dir() or names_dicom_series(path)):
        return "PixelSpacing (or the slice positions)", "ImageOrientationPatient"
    return found or ("spacing", "direction")


def _check_spacing(spacing, path: Path, field: str) -> None:
    values = np.asarray(spacing, float)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        axis = int(np.argmax(bad))
        raise ImageError(
            f"{path}: header field {field} gives voxel spacing {values[axis]:g} along axis {axis} "
            f"(spacing {_fmt(values)}); every spacing must be a positive number of mm: fix the header "
            "(e.g. with SimpleITK's SetSpacing) or re-export the image"
        )


def check_geometry(geometry: "Geometry", path: str | Path) -> None:
    """Refuse a grid that is not physical: a voxel spacing that is zero, negative or not finite, or direction
    cosines that are not an orthonormal matrix (sheared or scaled axes), naming the file and its header field."""
    path = Path(path)
    spacing_field, direction_field = _header_fields(path)
    _check_spacing(geometry.spacing, path, spacing_field)
    n = geometry.dimension
    direction = np.asarray(geometry.direction, float).reshape(n, n)
    if (
        not np.isfinite(direction).all()
        or np.abs(direction.T @ direction - np.eye(n)).max() > nibabel_io.ORTHONORMAL_TOLERANCE
    ):
        raise ImageError(
            f"{path}: header field {direction_field} holds direction cosines that are not orthonormal "
            f"({_fmt(direction.ravel())}: the voxel axes are sheared or not unit length); fix the "
            "header or resample the image onto an orthogonal grid"
        )


def _header(path: Path, file: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise _read_error(path, err) from None
    return reader


def _series_geometry(path: Path, files: list[str]) -> Geometry:
    """A DICOM series' grid from its first and last slices' headers, as ITK's series reader makes it:
    slice spacing and the third axis from the distance and direction between their positions."""
    first = Geometry.of(_header(path, files[0]))
    if len(files) == 1:
        return first
    step = np.subtract(Geometry.of(_header(path, files[-1])).origin, first.origin)
    distance = float(np.linalg.norm(step))
    if first.dimension != 3 or distance == 0:
        return Geometry.of(_read(path))  # slices without distinct positions: as the reader stacks them
    direction = np.asarray(first.direction).reshape(3, 3)
    direction[:, 2] = step / distance
    return dataclasses.replace(
        first,
        size=(*first.size[:2], len(files)),
        spacing=(*first.spacing[:2], distance / (len(files) - 1)),
        direction=tuple(direction.ravel().tolist()),
    )


# Grid tolerances, as fractions of the smallest voxel spacing (origin, spacing) or absolute (direction
# cosines). Below _EXACT two grids are the same (ITK's own check uses 1e-6); up to _SNAP they differ by
# floating-point noise (a NIfTI qform stored in float32, a resampling tool's rounding) and are snapped with a
# warning; beyond, they are different grids.
_EXACT = 1e-6
_SNAP = 1e-3


def same_grid(a, b, *, tolerance: float = _EXACT) -> bool:
    """True when two images (or geometries) share size, spacing, origin and direction within ``tolerance``
    (a fraction of the smallest voxel spacing for spacing and origin; absolute for direction cosines)."""
    a = a if isinstance(a, Geometry) else Geometry.of(a)
    b = b if isinstance(b, Geometry) else Geometry.of(b)
    if a.size != b.size:
        return False
    voxel = tolerance * min(min(a.spacing), min(b.spacing))
    return (
        np.allclose(a.spacing, b.spacing, rtol=0, atol=voxel)
        and np.allclose(a.origin, b.origin, rtol=0, atol=voxel)
        and np.allclose(a.direction, b.direction, rtol=0, atol=tolerance)
    )


def check_same_grid(image, labels, *, image_path, labels_path, warn: bool = True) -> None:
    """Raise ``ImageError`` naming both files when an image and its labels lie on different grids.

    Differences below 0.1 % of a voxel (origin, spacing) and 0.001 in the direction cosines are
    floating-point noise: a warning (with ``warn``), and readers given ``like=`` snap the grid.
    """
    if same_grid(image, labels):
        return
    image = image if isinstance(image, Geometry) else Geometry.of(image)
    labels = labels if isinstance(labels, Geometry) else Geometry.of(labels)
    if not same_grid(image, labels, tolerance=_SNAP):
        raise ImageError(
            f"{labels_path}: label map grid ({labels.describe()}) differs from its image {image_path} ({image.describe()})"
        )
    if warn:
        shift = max(
            np.abs(np.subtract(image.origin, labels.origin)).max(),
            np.abs(np.subtract(image.spacing, labels.spacing)).max(),
        )
        turn = np.abs(np.subtract(image.direction, labels.direction)).max()
        log.warning(
            "%s: grid differs from its image %s by floating-point noise (origin/spacing %.2g mm, direction %.2g); "
            "snapped onto the image's grid",
            labels_path,
            image_path,
            shift,
            turn,
        )


def snap_grid(image: sitk.Image, like, *, path, like_path=None) -> None:
    """Give ``image`` the grid of ``like`` (an image or a Geometry) when they differ by floating-point noise
    only (the warning comes from :func:`check_same_grid` in the input checks); raise when they differ more."""
    grid = like if isinstance(like, Geometry) else Geometry.of(like)
    if same_grid(grid, image):
        return
    check_same_grid(grid, image, image_path=like_path or "", labels_path=path, warn=False)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def normalize_intensity(image: sitk.Image, *, method: str = "percentile") -> sitk.Image:
    """Map intensities to a common scale: the 0.5th–99.5th percentiles to [0, 1], clipped.

    Scanners and file conventions differ by orders of magnitude; comparing images
    (selection, registration metrics, fusion weights) needs a shared scale.
    """
    if method == "none":
        return image
    values = sitk.GetArrayViewFromImage(image)
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    array = np.clip((values.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's own is 0600


def _tmp_in(folder: Path, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=suffix)
    try:
        os.fchmod(fd, _FILE_MODE)  # outputs readable by whoever may read the folder, as any new file
    finally:
        os.close(fd)
    return tmp


def remove_temporaries(folder: Path) -> int:
    """Delete the temporaries that writes killed before their rename left under ``folder``; returns how many."""
    stale = [p for p in Path(folder).rglob(TMP_PREFIX + "*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


def atomic_write(path: str | Path, write: Callable[[str], None], *, what: str) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (same extension), then rename it into place.

    A failed or interrupted write leaves the previous ``path`` (if any) untouched and no temporary behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_in(path.parent, _suffix(path))
    except OSError as err:
        raise _write_error(path, what, err) from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except RuntimeError as err:
        raise ImageError(f"{path}: cannot write {what} ({str(err).strip().splitlines()[-1][:200]})") from None
    except OSError as err:
        raise _write_error(path, what, err) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_image(image: sitk.Image, path: str | Path, *, compress: bool = True) -> None:
    """Write atomically (a temporary file in the same folder, then rename), in the format the extension names:
    NIfTI, NRRD, MetaImage, FreeSurfer MGH/MGZ, or any other SimpleITK writes."""
    if nibabel_io.is_mgh(Path(path)):
        atomic_write(path, lambda tmp: nibabel_io.write_mgh(image, tmp), what="image")
    else:
        atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=compress), what="image")


def _write_error(path: Path, what: str, err: OSError) -> AtlassegError:
    hint = "; free some space and run again (finished outputs are kept)" if err.errno == errno.ENOSPC else ""
    return AtlassegError(f"{path}: cannot write {what} ({err.strerror or err}){hint}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_in(path.parent, path.suffix)
    except OSError as err:
        raise _write_error(path, "file", err) from None
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, "file", err) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
