"""Landmark point files and the landmark initialisation of the affine stage.

Points are physical coordinates in ITK's convention (LPS, mm), one row per
landmark, paired between the two images by their order. Accepted files:

- ``.csv``: one point per row, ``x,y[,z]``; a header row naming the columns
  ``x``, ``y`` (``z``) is allowed, other columns (e.g. a name) are ignored.
  Coordinates are LPS, as ITK and SimpleITK report them.
- ``.fcsv`` (3D Slicer markups): the ``CoordinateSystem`` header is honoured;
  RAS points (Slicer's default) are converted to LPS.
- ITK / elastix point text (``.txt``): a first line ``point`` (physical) or
  ``index`` (voxel indices, converted through the image's geometry), then the
  number of points, then one point per line.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import ImageError, RegistrationError


def read_landmarks(path: str | Path, *, image: sitk.Image | None = None) -> np.ndarray:
    """Points (n × dim, LPS mm) from a landmark file; ``image`` converts ``index`` files to physical points."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ImageError(f"{path}: cannot read landmarks: {err}") from None
    try:
        if path.suffix.lower() == ".fcsv":
            points = _fcsv(text)
        elif path.suffix.lower() == ".csv":
            points = _csv(text)
        else:
            points = _itk_points(text, image)
    except (ValueError, IndexError) as err:
        raise ImageError(f"{path}: not a landmark file ({err})") from None
    if points.ndim != 2 or len(points) == 0 or points.shape[1] not in (2, 3):
        raise ImageError(f"{path}: expected one 2D or 3D point per row, got an array of shape {points.shape}")
    if not np.isfinite(points).all():
        raise ImageError(f"{path}: landmark coordinates must be finite numbers")
    return points


def _csv(text: str) -> np.ndarray:
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    head = [c.strip().lower() for c in rows[0]]
    if "x" in head:
        columns = [head.index(c) for c in ("x", "y", "z") if c in head]
        rows = rows[1:]
    else:
        columns = list(range(len(rows[0])))
    return np.array([[float(r[c]) for c in columns] for r in rows])


def _fcsv(text: str) -> np.ndarray:
    lps = False
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                lps = value.strip().upper() in ("LPS", "1")
            continue
        if line.strip():
            rows.append([float(v) for v in line.split(",")[1:4]])
    points = np.array(rows)
    return points if lps else points * np.array([-1.0, -1.0, 1.0])


def _itk_points(text: str, image: sitk.Image | None) -> np.ndarray:
    lines = [line.split() for line in text.splitlines() if line.strip()]
    kind = lines[0][0].lower()
    if kind not in ("point", "index"):
        raise ValueError("first line must be 'point' or 'index'")
    count = int(lines[1][0])
    points = np.array([[float(v) for v in line] for line in lines[2 : 2 + count]])
    if len(points) != count:
        raise ValueError(f"header says {count} points, found {len(points)}")
    if kind == "index":
        if image is None:
            raise ValueError("'index' points need the image they index")
        points = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in points])
    return points


def landmark_transform(fixed_points: np.ndarray, moving_points: np.ndarray) -> sitk.Transform:
    """The rigid transform best mapping each fixed point onto its moving point (least squares)."""
    if fixed_points.shape != moving_points.shape:
        raise RegistrationError(
            f"landmarks do not pair up: {len(fixed_points)} fixed points of dimension {fixed_points.shape[1]}, "
            f"{len(moving_points)} moving points of dimension {moving_points.shape[1]}"
        )
    dim = fixed_points.shape[1]
    if len(fixed_points) < dim:
        raise RegistrationError(f"landmark initialisation needs at least {dim} point pairs, got {len(fixed_points)}")
    base = sitk.VersorRigid3DTransform() if dim == 3 else sitk.Euler2DTransform()
    return sitk.LandmarkBasedTransformInitializer(
        base, fixedLandmarks=fixed_points.ravel().tolist(), movingLandmarks=moving_points.ravel().tolist()
    )
