"""One image pair (``atlasseg register``, ``atlasseg.register``): read from files, registered in memory, written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..config import RegistrationConfig
from ..errors import ImageError
from ..imageio import check_intensities, normalize_intensity, write_image
from ..propagation import propagate_intensities, propagate_labels
from ..registration import (
    Masks,
    RegistrationDiverged,
    jacobian_determinant,
    read_landmarks,
    register,
    save_displacement_field,
    save_transform,
)
from .jobs import timed
from .outputs import write_json
from .sources import FILES, Sources

REGISTER_OUTPUTS = ("warped.nii.gz", "transform.h5", "displacement.nii.gz", "jacobian.nii.gz", "record.json")


@dataclass(frozen=True)
class Pair:
    """One image pair read and checked, ready to register in memory (:func:`register_pair`)."""

    fixed: sitk.Image
    moving: sitk.Image
    labels: sitk.Image | None  # of ``moving``
    masks: Masks | None
    landmarks: tuple[np.ndarray, np.ndarray] | None  # (fixed points, moving points)
    config: RegistrationConfig  # with the landmarks initialisation when there are landmarks
    record: dict  # what the record says of the inputs and the config


def read_pair(
    fixed_path: Path,
    moving_path: Path,
    config: RegistrationConfig,
    *,
    labels_path: Path | None = None,
    fixed_mask: Path | None = None,
    moving_mask: Path | None = None,
    fixed_landmarks: Path | None = None,
    moving_landmarks: Path | None = None,
    sources: Sources = FILES,
) -> Pair:
    """Read and check one image pair, its moving labels, masks and landmarks from files (or, for those ``sources``
    holds, as held in memory; landmarks are files)."""
    for path in (fixed_path, moving_path):  # the whole file: complete, finite (also in NIfTI), not constant
        check_intensities(sources.name(path), sources.voxels(path))
    fixed, moving = sources.intensities(fixed_path), sources.intensities(moving_path)
    labels = sources.labels(labels_path, like=moving, like_path=moving_path) if labels_path is not None else None
    masks = None
    if fixed_mask is not None or moving_mask is not None:  # each on (snapped onto) its image's grid
        masks = Masks(
            *(
                None if mask is None else sources.labels(mask, like=image, like_path=path)
                for mask, path, image in ((fixed_mask, fixed_path, fixed), (moving_mask, moving_path, moving))
            )
        )
    landmarks = None
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ImageError("landmarks are needed for both images (--fixed-landmarks and --moving-landmarks)")
    if fixed_landmarks is not None:
        landmarks = (read_landmarks(fixed_landmarks, image=fixed), read_landmarks(moving_landmarks, image=moving))
        if config.affine.initialization != "landmarks":
            config = dataclasses.replace(config, affine=dataclasses.replace(config.affine, initialization="landmarks"))
    record = {"fixed": str(fixed_path), "moving": str(moving_path), "config": dataclasses.asdict(config)}
    return Pair(fixed, moving, labels, masks, landmarks, config, record)


def register_pair(pair: Pair) -> tuple[sitk.Transform, sitk.Image, sitk.Image | None, dict]:
    """Register ``pair`` in memory: the transform (fixed-space points → moving-space points), the moving image
    and labels (None without labels) on the fixed grid, and the record. Raises
    :class:`~atlasseg.registration.RegistrationDiverged` (carrying the registration's record) as ``register``."""
    config, record = pair.config, dict(pair.record)
    with timed(record, "seconds"):
        transform, record["registration"] = register(
            normalize_intensity(pair.fixed, method=config.normalization),
            normalize_intensity(pair.moving, method=config.normalization),
            config=config,
            masks=pair.masks,
            landmarks=pair.landmarks,
        )
    record["seconds"] = round(record["seconds"], 3)
    record["status"] = "ok"
    warped_labels = None if pair.labels is None else propagate_labels(pair.labels, transform, pair.fixed)
    return transform, propagate_intensities(pair.moving, transform, pair.fixed), warped_labels, record


def register_files(
    fixed_path: Path, moving_path: Path, config: RegistrationConfig, *, out_dir: Path, **inputs: Path | None
) -> dict:
    """Register one image pair from files (:func:`read_pair`, whose keyword arguments ``inputs`` are: labels,
    masks, landmarks; then :func:`register_pair`); write the results into ``out_dir``.

    Writes ``warped.nii.gz`` (the moving image on the fixed grid), ``transform.h5``
    (fixed-space points → moving-space points, readable by ``SimpleITK.ReadTransform``
    and ANTs), ``displacement.nii.gz`` (the same mapping as a displacement field on
    the fixed grid), ``jacobian.nii.gz`` (its Jacobian determinant), ``record.json``
    and, given moving labels, ``warped_labels.nii.gz``. A registration that fails its
    checks writes only ``record.json`` (with the reason) and raises.
    """
    return register_and_write(read_pair(fixed_path, moving_path, config, **inputs), out_dir)[3]


def register_and_write(pair: Pair, out_dir: Path) -> tuple[sitk.Transform, sitk.Image, sitk.Image | None, dict]:
    """:func:`register_pair`, with its results written into ``out_dir`` as :func:`register_files` says."""
    try:
        transform, warped, warped_labels, record = register_pair(pair)
    except RegistrationDiverged as err:
        write_json(
            out_dir / "record.json",
            {
                **pair.record,
                "status": err.record.get("status", "diverged"),
                "reason": str(err),
                "registration": err.record,
            },
        )
        raise
    write_image(warped, out_dir / "warped.nii.gz")
    save_transform(transform, out_dir / "transform.h5")
    save_displacement_field(transform, pair.fixed, out_dir / "displacement.nii.gz")
    write_image(jacobian_determinant(transform, pair.fixed), out_dir / "jacobian.nii.gz")
    if warped_labels is not None:
        write_image(warped_labels, out_dir / "warped_labels.nii.gz")
    write_json(out_dir / "record.json", record)
    return transform, warped, warped_labels, record
