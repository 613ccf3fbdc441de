"""Reading and writing images with their physical geometry; atomic file output."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import ImageError

_INTEGER_TYPES = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
}


def _read(path: Path) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not series:
                raise ImageError(f"{path}: is a directory without a DICOM series")
            return sitk.ReadImage(series)
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: file is empty")
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()
        detail = next((line for line in reason if "Exception" not in line and line.strip()), "unreadable")
        raise ImageError(f"{path}: cannot read image ({detail.strip()[:200]})") from None


def _check_scalar(image: sitk.Image, path: Path) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar image is needed")
    if image.GetDimension() not in (2, 3):
        raise ImageError(f"{path}: is {image.GetDimension()}D; 2D and 3D images are supported")


def read_image(path: str | Path) -> sitk.Image:
    """Read an intensity image as float32, geometry intact."""
    image = _read(Path(path))
    _check_scalar(image, Path(path))
    image = sitk.Cast(image, sitk.sitkFloat32)
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise ImageError(f"{path}: holds NaN or infinite intensities")
    return image


def read_labels(path: str | Path) -> sitk.Image:
    """Read a label map as an integer image; float files must hold whole numbers."""
    path = Path(path)
    image = _read(path)
    _check_scalar(image, path)
    if image.GetPixelID() in _INTEGER_TYPES:
        return image
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        raise ImageError(f"{path}: label map holds non-integer values; labels must be whole numbers")
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
        components = image.GetNumberOfComponents() if isinstance(image, sitk.ImageFileReader) else image.GetNumberOfComponentsPerPixel()
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()), components)

    @property
    def dimension(self) -> int:
        return len(self.size)

    def describe(self) -> str:
        return f"size {self.size}, spacing {_fmt(self.spacing)}, origin {_fmt(self.origin)}"


def read_geometry(path: str | Path) -> Geometry:
    """Geometry of an image file from its header alone (the voxels are not read)."""
    path = Path(path)
    if path.is_dir() or not path.exists() or path.stat().st_size == 0:
        return Geometry.of(_read(path))  # raises the precise error, or reads a DICOM folder
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageError(f"{path}: cannot read image ({str(err).strip().splitlines()[-1][:200]})") from None
    return Geometry.of(reader)


def same_grid(a, b, *, tolerance: float = 1e-4) -> bool:
    """True when two images (or geometries) share size, spacing, origin and direction within ``tolerance``."""
    a = a if isinstance(a, Geometry) else Geometry.of(a)
    b = b if isinstance(b, Geometry) else Geometry.of(b)
    return (
        a.size == b.size
        and np.allclose(a.spacing, b.spacing, atol=tolerance)
        and np.allclose(a.origin, b.origin, atol=tolerance)
        and np.allclose(a.direction, b.direction, atol=tolerance)
    )


def check_same_grid(image, labels, *, image_path, labels_path) -> None:
    """Raise ``ImageError`` naming both files when an image and its labels lie on different grids."""
    if not same_grid(image, labels):
        image = image if isinstance(image, Geometry) else Geometry.of(image)
        labels = labels if isinstance(labels, Geometry) else Geometry.of(labels)
        raise ImageError(
            f"{labels_path}: label map grid ({labels.describe()}) differs from its image {image_path} ({image.describe()})"
        )


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


def _tmp_in(folder: Path, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    return tmp


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


def atomic_write(path: str | Path, write: Callable[[str], None], *, what: str) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (same extension), then rename it into place.

    A failed or interrupted write leaves the previous ``path`` (if any) untouched and no temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_in(path.parent, _suffix(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except RuntimeError as err:
        raise ImageError(f"{path}: cannot write {what} ({str(err).strip().splitlines()[-1][:200]})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_image(image: sitk.Image, path: str | Path, *, compress: bool = True) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=compress), what="image")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_in(path.parent, path.suffix)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
