"""Synthetic labelled multi-subject dataset for demos, tests and benchmarks.

Every subject is the same analytic phantom ("anatomy") seen through its own random
affine transform and smooth deformation, with its own intensity gain and offset, a
smooth multiplicative bias field and Gaussian noise. Labels and intensities are both
computed from the phantom at the subject's warped physical coordinates, so they are
consistent by construction.

The phantom, in physical coordinates (mm) centred on the origin, with the last axis
"up":

====  ==========  =========  =====================================================
label name        intensity  shape
====  ==========  =========  =====================================================
1     head        0.4        ellipsoid (ellipse in 2D) filling about 60 % of the FOV
2     left_lobe   0.7        ellipsoid, ``x < 0``; touches label 3 on ``x = 0``
3     right_lobe  1.0        ellipsoid, ``x >= 0``; touches label 2 on ``x = 0``
4     nodule      0.2        small sphere (disc in 2D), radius 6 mm
5     band        0.9        thin curved shell (arc in 2D), 5.6 mm thick (3 voxels)
====  ==========  =========  =====================================================

Background is 0. Labels 2-5 lie inside the head.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import yaml
from scipy import ndimage

from .imageio import atomic_write_text, write_image

__all__ = ["demo_label_names", "make_demo_dataset"]

_LABEL_NAMES = ((1, "head"), (2, "left_lobe"), (3, "right_lobe"), (4, "nodule"), (5, "band"))
# Clean intensity of each label, indexed by label value (0 = background).
_INTENSITY = np.array([0.0, 0.4, 0.7, 1.0, 0.2, 0.9])

# Field of view (mm, per axis) and default voxels per axis, by dimension.
_FOV_MM = {2: 144.0, 3: 112.0}
_DEFAULT_SIZE = {2: 96, 3: 64}
# Every third subject gets this factor on the spacing of its last axis (fewer slices, same FOV).
_ANISOTROPY = 1.6

# Random subject variation.
_MAX_ROTATION_DEG = 10.0
_MIN_ROTATION_DEG = 4.0  # magnitudes are drawn in [min, max] so no subject is trivially aligned
_SCALE_RANGE = (0.9, 1.1)
_MAX_TRANSLATION_MM = 4.0
_MIN_TRANSLATION_MM = 2.0
_DISPLACEMENT_MM = (2.0, 3.0)  # range of the largest displacement of the smooth deformation
_DISPLACEMENT_SMOOTHING_MM = 12.0  # Gaussian sigma of the deformation field
_MAX_ORIGIN_OFFSET_MM = 3.0
_GAIN_RANGE = (0.7, 1.4)
_OFFSET_RANGE = (-0.05, 0.05)
_BIAS_AMPLITUDE = (0.10, 0.15)  # largest relative deviation of the bias field
_NOISE_FRACTION = 0.03  # noise sigma as a fraction of the intensity range
_PARTIAL_VOLUME_SIGMA_VOXELS = 0.6


def demo_label_names() -> dict[int, str]:
    """Return the phantom's label names.

    Returns
    -------
    dict of int to str
        ``{1: "head", 2: "left_lobe", 3: "right_lobe", 4: "nodule", 5: "band"}``;
        a new dict on every call.
    """
    return dict(_LABEL_NAMES)


def make_demo_dataset(
    out_dir,
    *,
    dim: int = 3,
    n_atlases: int = 6,
    n_targets: int = 2,
    seed: int = 0,
    size: int | None = None,
) -> pathlib.Path:
    """Write a synthetic labelled multi-subject dataset and its data_manifest.yaml; return the manifest path.

    Subjects ``case_001``, ``case_002``, ... (atlases first, then targets) are
    written as ``images/<id>.nii.gz`` (float32) and ``labels/<id>.nii.gz`` (uint8)
    under `out_dir`; an image and its label map share one grid. Each subject has
    its own origin (random offset of up to 3 mm per axis) and identity direction;
    every third subject (``case_003``, ``case_006``, ...) has a 1.6 times coarser
    spacing along its last axis, with fewer slices, so the field of view is the same.
    The manifest lists label names, atlases and targets (targets with their
    ground-truth labels), paths relative to `out_dir`. Every file is written
    atomically (temporary name in the same folder, then rename).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Folder to write into; created if missing. Existing files of the same
        names are replaced.
    dim : {2, 3}
        Image dimension.
    n_atlases : int
        Number of atlas subjects, at least 1.
    n_targets : int
        Number of target subjects, at least 0.
    seed : int
        Seed of ``numpy.random.default_rng``; the same arguments give
        identical voxel arrays and geometry.
    size : int, optional, voxels
        Voxels per axis of the isotropic subjects, at least 16. The field of
        view is fixed (112 mm in 3D, 144 mm in 2D), so the spacing is
        field of view / `size`. Default 64 in 3D (1.75 mm) and 96 in 2D (1.5 mm).

    Returns
    -------
    pathlib.Path
        Path of ``out_dir/data_manifest.yaml``.

    Raises
    ------
    ValueError
        If `dim`, `n_atlases`, `n_targets` or `size` is out of range.
    """
    if dim not in _FOV_MM:
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    if n_atlases < 1:
        raise ValueError(f"n_atlases must be at least 1, got {n_atlases!r}")
    if n_targets < 0:
        raise ValueError(f"n_targets must be at least 0, got {n_targets!r}")
    if size is None:
        size = _DEFAULT_SIZE[dim]
    if size < 16:
        raise ValueError(f"size must be at least 16 voxels, got {size!r}")

    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    entries = []
    for index in range(n_atlases + n_targets):
        case_id = f"case_{index + 1:03d}"
        grid = _subject_grid(dim=dim, size=size, anisotropic=(index % 3 == 2), rng=rng)
        image, labels = _make_subject(grid=grid, rng=rng)
        image_rel = f"images/{case_id}.nii.gz"
        labels_rel = f"labels/{case_id}.nii.gz"
        write_image(image, out / image_rel)
        write_image(labels, out / labels_rel)
        entries.append({"id": case_id, "image": image_rel, "labels": labels_rel})

    manifest = {
        "labels": demo_label_names(),
        "atlases": entries[:n_atlases],
        "targets": entries[n_atlases:],
    }
    manifest_path = out / "data_manifest.yaml"
    atomic_write_text(manifest_path, yaml.safe_dump(manifest, sort_keys=False, default_flow_style=None))
    return manifest_path


@dataclass(frozen=True)
class _Grid:
    """A subject's voxel grid: sizes in numpy (last axis first) order, geometry in ITK (x first) order."""

    shape: tuple[int, ...]  # numpy order, voxels
    spacing: tuple[float, ...]  # ITK order, mm
    origin: tuple[float, ...]  # ITK order, mm

    @property
    def dim(self) -> int:
        return len(self.shape)


def _subject_grid(*, dim: int, size: int, anisotropic: bool, rng: np.random.Generator) -> _Grid:
    """Grid covering the fixed field of view, centred on the phantom up to a random offset."""
    fov = _FOV_MM[dim]
    spacing = [fov / size] * dim
    sizes_itk = [size] * dim
    if anisotropic:
        sizes_itk[-1] = int(round(size / _ANISOTROPY))
        spacing[-1] = fov / sizes_itk[-1]
    offset = rng.uniform(-_MAX_ORIGIN_OFFSET_MM, _MAX_ORIGIN_OFFSET_MM, size=dim)
    origin = [-(n - 1) / 2.0 * s + o for n, s, o in zip(sizes_itk, spacing, offset)]
    return _Grid(
        shape=tuple(sizes_itk[::-1]),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
    )


def _make_subject(*, grid: _Grid, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """Sample the phantom on `grid` under a random affine and deformation; return (image, labels)."""
    dim = grid.dim
    # Physical coordinates of every voxel, ITK axis order first: shape (dim, *grid.shape), mm.
    axes = [grid.origin[a] + grid.spacing[a] * np.arange(grid.shape[dim - 1 - a], dtype=np.float64) for a in range(dim)]
    points = np.stack(np.meshgrid(*axes[::-1], indexing="ij")[::-1])

    matrix, translation = _random_affine(dim=dim, rng=rng)
    displacement = _random_displacement(grid=grid, rng=rng)
    # Pull back: the subject shows the phantom at p = A^-1 (x + u(x) - t).
    moved = (points + displacement).reshape(dim, -1) - translation[:, None]
    canonical = np.linalg.solve(matrix, moved)
    labels = _phantom_labels(canonical).reshape(grid.shape)

    clean = ndimage.gaussian_filter(_INTENSITY[labels], _PARTIAL_VOLUME_SIGMA_VOXELS)
    gain = rng.uniform(*_GAIN_RANGE)
    offset = rng.uniform(*_OFFSET_RANGE)
    bias = _random_bias(points=points, rng=rng)
    noise = rng.normal(0.0, _NOISE_FRACTION * gain, size=grid.shape)
    intensity = (gain * clean * bias + offset + noise).astype(np.float32)

    return _to_sitk(intensity, grid), _to_sitk(labels.astype(np.uint8), grid)


def _random_affine(*, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rotation times anisotropic scaling about the phantom centre, and a translation (mm)."""
    n_angles = 1 if dim == 2 else 3
    magnitudes = np.deg2rad(rng.uniform(_MIN_ROTATION_DEG, _MAX_ROTATION_DEG, size=n_angles))
    angles = magnitudes * rng.choice([-1.0, 1.0], size=n_angles)
    if dim == 2:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        rotation = np.array([[c, -s], [s, c]])
    else:
        rotation = np.eye(3)
        for axis, angle in enumerate(angles):
            i, j = [k for k in range(3) if k != axis]
            r = np.eye(3)
            c, s = np.cos(angle), np.sin(angle)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            rotation = r @ rotation
    scaling = np.diag(rng.uniform(*_SCALE_RANGE, size=dim))
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    translation = direction * rng.uniform(_MIN_TRANSLATION_MM, _MAX_TRANSLATION_MM)
    return rotation @ scaling, translation


def _random_displacement(*, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Smooth random displacement field, shape (dim, *grid.shape), ITK axis order, mm."""
    sigma_voxels = [_DISPLACEMENT_SMOOTHING_MM / s for s in grid.spacing[::-1]]
    field = np.stack(
        [
            ndimage.gaussian_filter(rng.standard_normal(grid.shape), sigma_voxels, mode="reflect")
            for _ in range(grid.dim)
        ]
    )
    largest = np.sqrt((field**2).sum(axis=0)).max()
    return field * (rng.uniform(*_DISPLACEMENT_MM) / largest)


def _random_bias(*, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative bias field (second-order polynomial), values within 1 +- 10-15 %."""
    dim = points.shape[0]
    half_fov = _FOV_MM[dim] / 2.0
    u = points / half_fov  # about [-1, 1] over the field of view
    terms = [u[a] for a in range(dim)]
    terms += [u[a] * u[b] for a in range(dim) for b in range(a, dim)]
    coefficients = rng.uniform(-1.0, 1.0, size=len(terms))
    poly = sum(c * t for c, t in zip(coefficients, terms))
    poly = poly - poly.mean()
    return 1.0 + poly * (rng.uniform(*_BIAS_AMPLITUDE) / np.abs(poly).max())


def _inside_ellipsoid(p: np.ndarray, center, semi_axes) -> np.ndarray:
    """Boolean mask of points `p` (dim, N), mm, inside an axis-aligned ellipsoid."""
    c = np.asarray(center, dtype=np.float64)[:, None]
    r = np.asarray(semi_axes, dtype=np.float64)[:, None]
    return (((p - c) / r) ** 2).sum(axis=0) <= 1.0


def _phantom_labels(p: np.ndarray) -> np.ndarray:
    """Label of the phantom at canonical points `p` (dim, N), mm; uint8 array of length N."""
    dim = p.shape[0]
    x, up = p[0], p[-1]
    if dim == 3:
        head = _inside_ellipsoid(p, (0.0, 0.0, 0.0), (34.0, 40.0, 30.0))
        left = _inside_ellipsoid(p, (-11.0, 4.0, 0.0), (12.0, 16.0, 12.0)) & (x < 0.0)
        right = _inside_ellipsoid(p, (11.0, 4.0, 0.0), (12.0, 16.0, 12.0)) & (x >= 0.0)
        nodule = _inside_ellipsoid(p, (0.0, -24.0, -8.0), (6.0, 6.0, 6.0))
        shell_center = np.array([0.0, 0.0, -30.0])[:, None]
        lateral = (np.abs(x) < 22.0) & (np.abs(p[1]) < 24.0)
    else:
        head = _inside_ellipsoid(p, (0.0, 0.0), (34.0, 40.0))
        left = _inside_ellipsoid(p, (-11.0, 0.0), (12.0, 16.0)) & (x < 0.0)
        right = _inside_ellipsoid(p, (11.0, 0.0), (12.0, 16.0)) & (x >= 0.0)
        nodule = _inside_ellipsoid(p, (0.0, -26.0), (6.0, 6.0))
        shell_center = np.array([0.0, -28.0])[:, None]
        lateral = np.abs(x) < 24.0
    # Band: part of a spherical shell (circular arc in 2D), radius 50 mm, 5.6 mm thick, above the lobes;
    # at least 2 voxels thick even along the coarse axis of an anisotropic 3D subject (2.8 mm).
    radius = np.sqrt(((p - shell_center) ** 2).sum(axis=0))
    band = (np.abs(radius - 50.0) <= 2.8) & lateral & (up > 0.0) & head

    labels = np.zeros(p.shape[1], dtype=np.uint8)
    labels[head] = 1
    labels[left] = 2
    labels[right] = 3
    labels[nodule] = 4
    labels[band] = 5
    return labels


def _to_sitk(array: np.ndarray, grid: _Grid) -> sitk.Image:
    """Wrap a numpy array (numpy axis order) as a SimpleITK image on `grid`, identity direction."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(np.eye(grid.dim).ravel().tolist())
    return image
